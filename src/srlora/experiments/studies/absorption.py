"""Corpus absorption where LoRA's rank is short: SmolLM2-135M learning TRL's source.

    srlora study --part absorb          # the runs that are missing (~25 min each, two at a time)

Each run is one ``srlora absorb`` command (:mod:`srlora.experiments.absorb`, the runner),
into ``runs/absorb/<name>/seed<s>/``.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..absorb import AbsorbConfig, finished, is_run_of
from ..jobs import run_jobs
from ..rundata import RenderContext, Section
from ..stats import fmt, fmt_paired, mean_std, paired

STEPS = 400
# SRLoRA on this task, from the known-rank benchmark's rule (docs/RESULTS.md): the error falls
# with the number of pairs fused as long as each pair is trained for ~30 steps or more, so
# recycle both pairs (gamma = 1) every 40 steps: 9 switches, 18 pairs fused per layer.
SRLORA_INTERVAL = 40
SRLORA_GAMMA = 1.0
BASELINE = f"srlora-r2-T{SRLORA_INTERVAL}-g{SRLORA_GAMMA:g}"  # the run the paired differences compare


@dataclass
class AbsorbJob:
    """One absorption run of ``srlora study --part absorb``: ``srlora absorb`` with ``config``."""

    name: str
    config: AbsorbConfig
    diagnose: bool = False  # srlora absorb --diagnose (srlora.experiments.new_pairs_diagnosis)

    @property
    def out(self) -> Path:
        return Path("runs/absorb") / self.name / f"seed{self.config.seed}"

    def argv(self) -> list[str]:
        defaults = AbsorbConfig()
        argv = ["absorb"]
        for f in dataclasses.fields(AbsorbConfig):
            value = getattr(self.config, f.name)
            if f.name == "srlora":
                for name, option in value.items():  # SRLoRAConfig's own options (a flag where boolean)
                    flag = f"--{name.replace('_', '-')}"
                    if isinstance(option, bool):
                        argv.append(flag if option else f"--no-{name.replace('_', '-')}")
                    else:
                        argv += [flag, str(option)]
            elif f.name in ("method", "r", "seed", "steps") or value != getattr(defaults, f.name):
                argv += [f"--{f.name.replace('_', '-')}", str(value)]
        return [*argv, "--threads", "1", *(["--diagnose"] if self.diagnose else []), "--out", str(self.out)]

    def command(self) -> str:
        return "srlora " + shlex.join(self.argv())

    def finished(self, root: Path) -> bool:
        """Finished earlier: its run here (``runs/absorb``, the runner's rule), or its record in
        the committed ``docs/results/absorb.json`` with the same configuration, every evaluation
        set and the memory count (``runs/`` need not outlive the machine it ran on)."""
        return finished(root / self.out, self.config) or any(
            e["out"] == str(self.out) and committed_as(e, self.config) for e in load_absorb(root)
        )


def absorb_jobs(seeds: list[int], pilot: bool = False) -> list[AbsorbJob]:
    """The pilot (LoRA r = 2 and r = 32, first seed: is the rank short?), then LoRA r = 8,
    and PiSSA, SRLoRA and LoRA at r = 2 on every seed (paired by seed: same data order)."""
    first = seeds[0]
    jobs = [
        AbsorbJob("lora-r2", AbsorbConfig("lora", 2, steps=STEPS, seed=first)),
        AbsorbJob("lora-r32", AbsorbConfig("lora", 32, steps=STEPS, seed=first)),
    ]
    if pilot:
        return jobs
    jobs.append(AbsorbJob("lora-r8", AbsorbConfig("lora", 8, steps=STEPS, seed=first)))
    # The same interval at gamma 0.5 (one pair per switch), first seed: what gamma = 1 adds.
    half = AbsorbConfig("srlora", 2, 2 + (STEPS - 1) // SRLORA_INTERVAL, switch_interval=SRLORA_INTERVAL, steps=STEPS)
    jobs.append(AbsorbJob(f"srlora-r2-T{SRLORA_INTERVAL}", dataclasses.replace(half, seed=first)))
    r_prime = round(2 * SRLORA_GAMMA)
    r_target = 2 + r_prime * ((STEPS - 1) // SRLORA_INTERVAL)
    for seed in seeds:
        jobs.append(AbsorbJob("pissa-r2", AbsorbConfig("pissa", 2, steps=STEPS, seed=seed)))
        srlora = AbsorbConfig(
            "srlora", 2, r_target, switch_interval=SRLORA_INTERVAL, gamma=SRLORA_GAMMA, steps=STEPS, seed=seed
        )
        jobs.append(AbsorbJob(f"srlora-r2-T{SRLORA_INTERVAL}-g{SRLORA_GAMMA:g}", srlora))
        if seed != first:
            jobs.append(AbsorbJob("lora-r2", AbsorbConfig("lora", 2, steps=STEPS, seed=seed)))
    return jobs


ABSORB = "docs/results/absorb.json"


# ---------------------------------------------------------------------------- absorption
METRICS = (
    ("train_loss_tail", "train (last 10%)"),
    ("held_chunks", "held-out chunks"),
    ("held_docs", "held-out docs"),
    ("prose", "prose"),
)


def refresh_absorb(root: Path) -> None:
    """Collect the absorption runs under ``runs/absorb`` into docs/results/absorb.json (kept:
    entries of runs not on this machine). Per run: its command, the evaluations, the wall
    time, and each layer's update spectrum summary."""

    path = root / ABSORB
    entries = {e["out"]: e for e in (json.loads(path.read_text()) if path.is_file() else [])}
    for res_path in sorted((root / "runs/absorb").glob("*/seed*/results.json")):
        r = json.loads(res_path.read_text())
        job = AbsorbJob(res_path.parent.parent.name, AbsorbConfig(**r["config"]), diagnose="diagnosis" in r)
        spectra = r["spectra"]
        entries[str(job.out)] = {
            "out": str(job.out),
            "name": job.name,
            "command": job.command(),
            "config": r["config"],
            "corpus": r["corpus"],
            "train_loss_tail": r["train_loss_tail"],
            "evals": r["evals"],
            "effective_rank_mean": r["effective_rank_mean"],
            "rank90_mean": r["rank90_mean"],
            "effective_rank_by_layer": {k: v["effective_rank"] for k, v in spectra.items()},
            "sv_mean_normalised": _mean_profile(spectra),
            "switches": r["switches"],
            "directions_used_mean": r["directions_used_mean"],
            "wall_s": r["wall_s"],
            "train_s": r["train_s"],
            **({"memory": r["memory"]} if "memory" in r else {}),
            "losses": [round(x, 5) for x in r["losses"]],
            **({"diagnosis": r["diagnosis"]} if "diagnosis" in r else {}),
        }
    if entries:
        from ...atomic import atomic_write_json

        atomic_write_json(path, sorted(entries.values(), key=lambda e: e["out"]))


def _mean_profile(spectra: dict[str, Any], keep: int = 32) -> list[float]:
    """The mean over layers of each layer's singular values divided by its largest."""
    rows = [v["sv"][:keep] for v in spectra.values() if v["sv"]]
    if not rows:
        return []
    out = []
    for i in range(keep):
        vals = [row[i] / row[0] for row in rows if len(row) > i and row[0] > 0]
        out.append(statistics.fmean(vals) if vals else 0.0)
    return out


def load_absorb(root: Path) -> list[dict[str, Any]]:
    """The committed absorption runs (``docs/results/absorb.json``)."""
    path = root / ABSORB
    return json.loads(path.read_text()) if path.is_file() else []


def committed_as(entry: dict[str, Any], cfg: AbsorbConfig) -> bool:
    """Whether a committed run (an entry of ``docs/results/absorb.json``) is the finished run of
    ``cfg`` (:func:`~srlora.experiments.absorb.is_run_of`, the rule for a run's results.json)."""
    digest = AbsorbConfig(**entry["config"]).digest()
    return is_run_of(digest, entry["evals"][-1], "memory" in entry, cfg)


def _final(entry: dict[str, Any], key: str) -> float:
    return entry[key] if key == "train_loss_tail" else entry["evals"][-1][key]


def section_absorb(root: Path) -> list[str]:
    own = {job.name for job in absorb_jobs([1, 2, 3])}  # the new-pairs study's runs have their own section
    rows = [e for e in load_absorb(root) if e["name"] in own]
    md = ["## The real task where LoRA's rank is short: corpus absorption", ""]
    if not rows:
        return [*md, "Not run yet: `srlora study --part absorb-pilot`, then `--part absorb`.", ""]
    from ..absorb import __doc__ as doc

    names = sorted({e["name"] for e in rows}, key=lambda n: (n.split("-")[0] != "lora", n))
    by_name: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
    for e in rows:
        by_name[e["name"]][e["config"]["seed"]] = e
    base = rows[0]["evals"][0]  # step 0: the untrained model, the same in every run
    hours = sum(e["wall_s"] for e in rows) / 3600
    md += [
        (doc or "").split("\n\n", 2)[2].strip(),
        "",
        f"Each run: {rows[0]['config']['steps']} steps of {rows[0]['config']['batch']} x "
        f"{rows[0]['config']['block']} tokens, AdamW {rows[0]['config']['lr']:g} (warm-up "
        f"{rows[0]['config']['warmup']}, cosine to 10%), alpha = r; training set "
        f"{rows[0]['corpus']['train_blocks']} blocks, evaluation sets of {rows[0]['config']['eval_blocks']} blocks. "
        f"{len(rows)} runs, {hours:.1f} h of one thread on this project's 2-core CPU; every run's figures and "
        f"command in `{ABSORB}`. The untrained model: held-out chunks {base['held_chunks']:.3f}, held-out "
        f"documents {base['held_docs']:.3f}, prose {base['prose']:.3f} nats per token.",
        "",
        "| method | seeds | " + " | ".join(label for _, label in METRICS) + " | update's effective rank | "
        "switches / layer | wall time |",
        "|---|---|" + "---|" * (len(METRICS) + 3),
    ]
    for name in names:
        runs = list(by_name[name].values())
        cells = [name, str(len(runs))]
        cells += [fmt(mean_std([_final(e, key) for e in runs])) for key, _ in METRICS]
        cells.append(fmt(mean_std([e["effective_rank_mean"] for e in runs]), 2))
        cells.append(f"{statistics.fmean(e['switches'] / len(e['effective_rank_by_layer']) for e in runs):.1f}")
        cells.append(f"{statistics.fmean(e['wall_s'] for e in runs) / 60:.0f} min")
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Paired by seed (same data order), 95% t-interval; negative = lower loss for the first method:", ""]
    md += ["| difference | " + " | ".join(label for _, label in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    srl = BASELINE if BASELINE in names else None
    for a, b in ((srl, "pissa-r2"), (srl, "lora-r2"), ("pissa-r2", "lora-r2")):
        if a is None or a not in by_name or b not in by_name:
            continue
        diffs = []
        for key, _ in METRICS:
            da = {s: _final(e, key) for s, e in by_name[a].items()}
            db = {s: _final(e, key) for s, e in by_name[b].items()}
            diffs.append(fmt_paired(paired(da, db)))
        md.append(f"| {a} − {b} | " + " | ".join(diffs) + " |")
    md += ["", *gap_closed(by_name), ""]
    plot = plot_absorb(by_name, root / "docs/results/absorb.png")
    if plot is not None:
        md += ["![held-out chunk loss and update spectra](results/absorb.png)", ""]
    return md


def gap_closed(by_name: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The share of the LoRA r = 2 -> r = 32 gap (seed 1) each r = 2 method closes, per metric."""
    lo, hi = by_name.get("lora-r2", {}).get(1), by_name.get("lora-r32", {}).get(1)
    if lo is None or hi is None:
        return []
    out = ["Share of the LoRA r = 2 → r = 32 gap closed (seed 1's pilot gap; means over seeds):", ""]
    for name, runs in by_name.items():
        if "-r2" not in name or name == "lora-r2":  # the rank-2 methods (srlora-r2-T40-g1 too)
            continue
        parts = []
        for key, label in METRICS[:3]:
            gap = _final(lo, key) - _final(hi, key)
            mean = statistics.fmean(_final(e, key) for e in runs.values())
            lora = statistics.fmean(_final(e, key) for e in by_name["lora-r2"].values())
            parts.append(f"{label} {100 * (lora - mean) / gap:.0f}%" if gap > 0 else f"{label} n/a")
        out.append(f"- {name}: " + ", ".join(parts))
    return out


def plot_absorb(by_name: dict[str, dict[int, dict[str, Any]]], path: Path) -> Path | None:
    """Held-out chunk loss against steps (mean over seeds), and the mean normalised singular
    values of the learnt update."""
    from ..plots import pyplot, save_figure

    if not by_name:
        return None
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, runs in by_name.items():
        first = next(iter(runs.values()))
        steps = [ev["step"] for ev in first["evals"]]
        loss = [statistics.fmean(e["evals"][i]["held_chunks"] for e in runs.values()) for i in range(len(steps))]
        ax1.plot(steps, loss, marker="o", label=name)
        prof = first["sv_mean_normalised"]
        ax2.plot(range(1, len(prof) + 1), prof, marker=".", label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("held-out chunk loss (nats/token)")
    ax2.set_xlabel("singular value index")
    ax2.set_ylabel("sigma_i / sigma_1 of W_t + sBA - W0 (mean over layers, seed 1)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


PARTS = {
    "absorb-pilot": lambda root, seeds, ns: run_jobs(absorb_jobs(seeds, pilot=True), ns.jobs, root),
    "absorb": lambda root, seeds, ns: run_jobs(absorb_jobs(seeds), ns.jobs, root),
}


def _absorb(ctx: RenderContext) -> list[str]:
    refresh_absorb(ctx.root)  # the runs here into docs/results/absorb.json first (later studies read it)
    return section_absorb(ctx.root)


SECTIONS: dict[str, Section] = {"absorb": _absorb}


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """This study's run-table rows built from ``srlora train`` runs: none."""
    return {}
