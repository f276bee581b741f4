"""What enters at a switch (issue 24): new pairs that point where the loss needs them and learn
as fast as the pairs they replace, measured where LoRA's rank binds (corpus absorption).

    srlora study --part new-pairs-screen   # seed 1: the diagnosis and every option (~25 min a run)
    srlora study --part new-pairs          # the best option on 3 seeds, paired with PiSSA and LoRA

SRLoRA r = 2 with both pairs recycled every 40 steps (the known-rank rule; 9 switches) is the
baseline; each option changes one thing about the pairs that enter (docs/METHOD.md section 7):

* where they point: W0's next singular directions (the paper) or the top singular vectors of
  the gradient summed over the window before the switch (``direction_policy="gradient_subspace"``);
* how large they enter: their own singular value (the paper), or ``entry_scale`` times the
  layer's first pairs' (which does not shrink with the spectrum);
* what the optimizer keeps of the recycled slots (``optimizer_reset``).

The baseline and the main options run with ``--diagnose``
(:mod:`srlora.experiments.new_pairs_diagnosis`): the loss before and after each switch, and
the alignment, size and speed of the pairs that enter and leave.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from ..absorb import AbsorbConfig
from ..jobs import LONG_COMMON, Job, is_finished, run_jobs
from ..stats import fmt, fmt_paired, mean_std, paired
from .absorption import STEPS, AbsorbJob

INTERVAL = 40
# The variant confirmed on 3 seeds (chosen from the screen: docs/RESULTS.md, section "What enters at a switch").
BEST = "srlora-r2-T40-g1-gsub"


def srlora(gamma: float = 1.0, **entry: object) -> AbsorbConfig:
    """SRLoRA r = 2, a switch every 40 steps, as many directions as the 9 switches bring in."""
    r_prime = round(2 * gamma)
    r_target = 2 + r_prime * ((STEPS - 1) // INTERVAL)
    return AbsorbConfig("srlora", 2, r_target, switch_interval=INTERVAL, gamma=gamma, steps=STEPS, **entry)  # type: ignore[arg-type]


# name: (config, diagnosed)
VARIANTS: dict[str, tuple[AbsorbConfig, bool]] = {
    "srlora-r2-T40-g1": (srlora(), True),  # the baseline of issue 20
    "srlora-r2-T40-g1-w0scale1": (srlora(entry_scale=1.0), True),  # (b): W0's directions, the first pairs' scale
    "srlora-r2-T40-g1-gsub": (srlora(direction_policy="gradient_subspace"), True),  # (a) + (b)
    "srlora-r2-T40-g1-gsub-s0.25": (srlora(direction_policy="gradient_subspace", entry_scale=0.25), False),
    "srlora-r2-T40-g1-gsub-s0.05": (srlora(direction_policy="gradient_subspace", entry_scale=0.05), False),
    "srlora-r2-T40-g0.5-gsub": (srlora(0.5, direction_policy="gradient_subspace"), False),
    "srlora-r2-T40-g1-reset-none": (srlora(optimizer_reset="none"), False),  # (c): the moments kept
    "srlora-r2-T40": (srlora(0.5), False),  # the paper's gamma
}


def screen_jobs(seed: int = 1) -> list[AbsorbJob]:
    """Every variant on one seed (PiSSA r = 2 and LoRA r = 2 / 8 / 32 are the absorption study's)."""
    return [
        AbsorbJob(name, dataclasses.replace(cfg, seed=seed), diagnose) for name, (cfg, diagnose) in VARIANTS.items()
    ]


def confirm_jobs(seeds: list[int], best: str) -> list[AbsorbJob]:
    """``best`` and the baselines it is compared with, paired by seed: PiSSA r = 2, LoRA r = 2
    and LoRA r = 8 on every seed."""
    jobs: list[AbsorbJob] = []
    cfg, diagnose = VARIANTS[best]
    for seed in seeds:
        jobs.append(AbsorbJob(best, dataclasses.replace(cfg, seed=seed), diagnose and seed == seeds[0]))
        for method, r in (("pissa", 2), ("lora", 2), ("lora", 8)):
            jobs.append(AbsorbJob(f"{method}-r{r}", AbsorbConfig(method, r, steps=STEPS, seed=seed)))
    return jobs


# ---------------------------------------------------------------------------- the paper regime
# What the chosen entry costs where the rank does not bind: the paper-regime study's runs
# (MiniLM, r = 8, r_target = 64, 600 steps), with the new pairs along the gradient's subspace.
PAPER_ENTRY = ["--direction-policy", "gradient_subspace"]
PAPER_TASKS = {"mr": "accuracy", "mr-reg": "pearson"}
PAPER_ROWS = {  # row label -> (cell, method); {task}: the task
    "LoRA": ("long-{task}", "lora"),
    "PiSSA": ("long-{task}", "pissa"),
    "SRLoRA spectrum": ("long-{task}", "srlora"),
    "SRLoRA gradient subspace": ("long-{task}-gsub", "srlora"),
}
PAPER_TITLE = "What it costs in the paper's regime (MiniLM, r = 8, r_target = 64, 600 steps)"


def paper_regime_jobs(seeds: list[int]) -> list[Job]:
    return [
        Job(f"long-{task}-gsub", task, "srlora", seed, ["--r-target", "64", *PAPER_ENTRY], common=LONG_COMMON)
        for seed in seeds
        for task in PAPER_TASKS
    ]


def _paper_regime_table(root: Path, seeds: list[int]) -> list[str]:
    """Per task: each row's runs (from docs/results/runs.json and the runs here), and the chosen
    entry against LoRA, PiSSA and the paper's entries, paired by seed."""
    index = root / "docs/results/runs.json"
    entries = json.loads(index.read_text()) if index.is_file() else []
    finals = {(e["cell"], e["method"], e["seed"]): e["final"] for e in entries}
    for job in paper_regime_jobs(seeds):
        if is_finished(job, root):
            finals[job.cell, job.method, job.seed] = json.loads((root / job.out / "results.json").read_text())["final"]
    md: list[str] = []
    for task, metric in PAPER_TASKS.items():
        rows = {
            label: {s: f[metric] for (c, m, s), f in finals.items() if (c, m) == (cell.format(task=task), method)}
            for label, (cell, method) in PAPER_ROWS.items()
        }
        if not rows["SRLoRA gradient subspace"]:
            continue
        md += [
            f"### {PAPER_TITLE}: {task}",
            "",
            "`srlora study --part new-pairs-long` (the other rows: the paper-regime study).",
        ]
        md += ["", f"| variant | seeds | {metric} |", "|---|---|---|"]
        md += [f"| {label} | {len(v)} | {fmt(mean_std(list(v.values())))} |" for label, v in rows.items() if v]
        md += ["", f"| comparison (paired by seed) | Δ {metric} [95% interval] |", "|---|---|"]
        for other in ("LoRA", "PiSSA", "SRLoRA spectrum"):
            diff = fmt_paired(paired(rows["SRLoRA gradient subspace"], rows[other]))
            md.append(f"| SRLoRA gradient subspace − {other} | {diff} |")
        md.append("")
    return md


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """This study's run-table rows (the paper-regime tables): (section, subsection) -> rows."""
    return {
        (TITLE.removeprefix("## "), f"{PAPER_TITLE}: {task}"): {
            label: (cell.format(task=task), method) for label, (cell, method) in PAPER_ROWS.items()
        }
        for task in PAPER_TASKS
    }


# ---------------------------------------------------------------------------- the known-rank map
KNOWN_RANK_FILE = "runs/known-rank/new_pairs.jsonl"
KNOWN_RANK_ENTRIES: dict[str, dict[str, object]] = {
    "paper": {},
    "w0 scale 1": {"entry_scale": 1.0},
    "gradient subspace": {"direction_policy": "gradient_subspace"},
    "gradient subspace, scale 0.25": {"direction_policy": "gradient_subspace", "entry_scale": 0.25},
}


def known_rank_specs(seeds: list[int]) -> list[tuple[str, object]]:
    """SRLoRA r = 2, gamma 1, T = 30 and 60, on one layer learning a rank-16 and a rank-64
    target in 2,000 steps, with each entry: how much of what is left does a fused pair remove,
    against the greedy bound (each pair the largest remaining component)?"""
    from ..known_rank import KnownRankRun

    specs = []
    for K in (16, 64):
        for T in (30, 60):
            for entry in KNOWN_RANK_ENTRIES.values():
                for seed in seeds:
                    spec = KnownRankRun("srlora", 2, K, steps=2000, interval=T, gamma=1.0, seed=seed, **entry)  # type: ignore[arg-type]
                    specs.append((f"K{K}-N2000", spec))
    return specs


def run_known_rank(root: Path, seeds: list[int]) -> None:
    from ..known_rank import run_specs

    run_specs(root / KNOWN_RANK_FILE, known_rank_specs(seeds))  # type: ignore[arg-type]


PARTS = {
    "new-pairs-screen": lambda root, seeds, ns: run_jobs(screen_jobs(seeds[0]), ns.jobs, root),
    "new-pairs-confirm": lambda root, seeds, ns: run_jobs(confirm_jobs(seeds, BEST), ns.jobs, root),
    "new-pairs-known-rank": lambda root, seeds, ns: run_known_rank(root, seeds),
    "new-pairs-long": lambda root, seeds, ns: run_jobs(paper_regime_jobs(seeds), ns.jobs, root),
}


# ---------------------------------------------------------------------------- the doc's section
TITLE = "## What enters at a switch: new pairs where the rank binds"
LADDER = ("lora-r2", "lora-r8", "lora-r32")
BASELINES = ("pissa-r2", *LADDER)
KNOWN_RANK_DOC = "docs/results/new_pairs_known_rank.jsonl"


def _final(e: dict[str, Any], key: str) -> float:
    return e[key] if key == "train_loss_tail" else e["evals"][-1][key]


def ladder_prose(ladder: list[tuple[float, float]], chunks: float) -> float:
    """The prose loss of the LoRA ladder (``[(held-out chunks, prose)]`` of r = 2, 8, 32)
    interpolated at a held-out-chunk loss (linear between the rungs, extended past the ends):
    the learning-forgetting frontier of Biderman et al. (2024)."""
    pts = sorted(ladder)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if chunks <= x1 or (x1, y1) == pts[-1]:
            return y0 + (y1 - y0) * (chunks - x0) / (x1 - x0)
    return pts[0][1]


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for e in rows:
        out.setdefault(e["name"], {})[e["config"]["seed"]] = e
    return out


def _diagnosis_table(by_name: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Per diagnosed run (seed 1): means over its switches of what the diagnosis records."""
    keys = [
        ("alignment_entering", "entering"),
        ("alignment_leaving", "leaving"),
        ("alignment_best_rank1", "best rank-1"),
        ("sigma_entering", "sigma in"),
        ("sigma_leaving", "sigma out"),
        ("speed_first_steps", "speed, first 5 steps"),
        ("speed_last_steps", "speed, last 5 steps"),
        ("learnt_share_of_update", "learnt / update"),
    ]
    md = [
        "| run (seed 1) | switches | max abs(loss after − before) | alignment: "
        + " | ".join(label for _, label in keys)
        + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    found = False
    for name, runs in by_name.items():
        rows = runs.get(1, {}).get("diagnosis")
        if not rows:
            continue
        found = True
        jump = max(abs(r["loss_after"] - r["loss_before"]) for r in rows)
        cells = [name, str(sum(r["switched_layers"] > 0 for r in rows)), f"{jump:.1e}"]
        for key, _ in keys:
            vals = [r[key] for r in rows if r[key] == r[key]]  # NaN where not measured (first switch)
            cells.append(f"{statistics.fmean(vals):.3g}" if vals else "n/a")
        md.append("| " + " | ".join(cells) + " |")
    return md if found else []


def _around_switches(by_name: dict[str, dict[int, dict[str, Any]]], width: int = 5) -> list[str]:
    """The training loss in the ``width`` steps before and after each switch, against PiSSA's on the
    same batches (seed 1): what a switch costs the next steps."""
    pissa = by_name.get("pissa-r2", {}).get(1)
    if pissa is None or "losses" not in pissa:
        return []
    md = [
        f"| run (seed 1) | loss − PiSSA's, {width} steps before each switch | {width} steps after | change |",
        "|---|---|---|---|",
    ]
    for name, runs in by_name.items():
        e = runs.get(1)
        if not name.startswith("srlora") or e is None or "losses" not in e:
            continue
        T = e["config"]["switch_interval"] or INTERVAL
        steps = range(T, len(e["losses"]), T)
        # losses[i] is the loss of step i + 1, before its update; the switch after step t
        before = [e["losses"][t - k] - pissa["losses"][t - k] for t in steps for k in range(1, width + 1)]
        after = [
            e["losses"][t + k] - pissa["losses"][t + k] for t in steps for k in range(width) if t + k < len(e["losses"])
        ]
        b, a = statistics.fmean(before), statistics.fmean(after)
        md.append(f"| {name} | {b:+.3f} | {a:+.3f} | {a - b:+.3f} |")
    return md


def _screen_table(by_name: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Seed 1 of every run: the three evaluation sets, the frontier's excess forgetting, the
    share of the LoRA r = 2 -> 32 gap closed, the update's effective rank."""
    seed1 = {n: r[1] for n, r in by_name.items() if 1 in r}
    if not all(n in seed1 for n in LADDER):
        return []
    ladder = [(_final(seed1[n], "held_chunks"), _final(seed1[n], "prose")) for n in LADDER]
    lo, hi = _final(seed1["lora-r2"], "held_chunks"), _final(seed1["lora-r32"], "held_chunks")
    md = [
        "| run (seed 1) | held-out chunks | held-out docs | prose | prose − LoRA ladder at the same chunks "
        "| LoRA r=2→32 gap closed | update's effective rank |",
        "|---|---|---|---|---|---|---|",
    ]
    order = [n for n in BASELINES if n in seed1] + [n for n in VARIANTS if n in seed1]
    for name in order:
        e = seed1[name]
        chunks, prose = _final(e, "held_chunks"), _final(e, "prose")
        excess = prose - ladder_prose(ladder, chunks)
        cells = [name, f"{chunks:.3f}", f"{_final(e, 'held_docs'):.3f}", f"{prose:.3f}", f"{excess:+.3f}"]
        cells += [f"{(lo - chunks) / (lo - hi):.0%}", f"{e['effective_rank_mean']:.1f}"]
        md.append("| " + " | ".join(cells) + " |")
    return md


def _confirm_table(by_name: dict[str, dict[int, dict[str, Any]]], best: str) -> list[str]:
    """``best`` against PiSSA r = 2, LoRA r = 2 and LoRA r = 8, paired by seed."""
    if best not in by_name or len(by_name[best]) < 2:
        return []
    metrics = (("held_chunks", "held-out chunks"), ("held_docs", "held-out docs"), ("prose", "prose"))
    md = [
        f"| {best} − … (seeds) | " + " | ".join(label for _, label in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for other in ("pissa-r2", "lora-r2", "lora-r8"):
        if other not in by_name:
            continue
        seeds = sorted(set(by_name[best]) & set(by_name[other]))
        cells = []
        for key, _ in metrics:
            a = {s: _final(by_name[best][s], key) for s in seeds}
            b = {s: _final(by_name[other][s], key) for s in seeds}
            cells.append(fmt_paired(paired(a, b)))
        md.append(f"| {other} ({', '.join(map(str, seeds))}) | " + " | ".join(cells) + " |")
    return md


def _known_rank_table(root: Path) -> list[str]:
    """Error left on the target per entry (mean ± std over seeds), and how many pairs each
    fuses before a tenth of the target is left, against the greedy bound (each pair the
    largest remaining component: the rank at which the target's tail holds a tenth, less r)."""
    path = root / KNOWN_RANK_DOC
    if not path.is_file():
        return []
    from ..known_rank import KnownRankRun, best_rank_error, make_problem

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    labels = {json.dumps(v, sort_keys=True): k for k, v in KNOWN_RANK_ENTRIES.items()}
    cells: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        spec = row["spec"]
        entry = {k: spec[k] for k in ("direction_policy", "entry_scale") if spec.get(k) not in (None, "spectrum")}
        label = labels.get(json.dumps(entry, sort_keys=True), "?")
        cells.setdefault((spec["K"], spec["interval"], label), []).append(row)
    md = [
        "| K | T | entry | seeds | error left | pairs fused in all | pairs fused until a tenth is left "
        "| greedy bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = list(KNOWN_RANK_ENTRIES)
    for (K, T, label), runs in sorted(cells.items(), key=lambda kv: (*kv[0][:2], order.index(kv[0][2]))):
        spec = KnownRankRun(**runs[0]["spec"])
        _, dWs = make_problem(spec)
        greedy = next(j for j in range(spec.width + 1) if best_rank_error(dWs[0], j) <= 0.1) - spec.r
        reach = [_pairs_until(r, spec, 0.1) for r in runs]
        reached = [x for x in reach if x is not None]
        until = (
            f"{statistics.fmean(reached):.0f}"
            if len(reached) == len(reach)
            else f"not reached in {len(reach) - len(reached)} of {len(reach)}"
        )
        md.append(
            f"| {K} | {T} | {label} | {len(runs)} | {fmt(mean_std([r['error'] for r in runs]), 4)} | "
            f"{spec.r_prime * runs[0]['switches']} | {until} | {max(0, greedy)} |"
        )
    return md


def _pairs_until(row: dict[str, Any], spec: Any, level: float) -> int | None:
    """Pairs fused when the run's error curve first reaches ``level`` (None: never)."""
    for step, err in row["curve"]:
        if err <= level:
            return step // spec.interval * spec.r_prime
    return None


def plot_frontier(by_name: dict[str, dict[int, dict[str, Any]]], path: Path) -> Path | None:
    """Prose loss (forgetting) against held-out-chunk loss (learning) of every run, each seed a
    point, the LoRA ladder's seed-1 rungs joined: the learning-forgetting frontier."""
    from ..plots import pyplot, save_figure

    ladder = [by_name[n][1] for n in LADDER if 1 in by_name.get(n, {})]
    if len(ladder) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([_final(e, "held_chunks") for e in ladder], [_final(e, "prose") for e in ladder], "k--", lw=1)
    for name, runs in by_name.items():
        xs = [_final(e, "held_chunks") for e in runs.values()]
        ys = [_final(e, "prose") for e in runs.values()]
        ax.scatter(xs, ys, label=name, s=22, marker="s" if name in BASELINES else "o")
    ax.set_xlabel("held-out chunks (nats/token): learnt, lower is better")
    ax.set_ylabel("prose (nats/token): forgotten, lower is better")
    ax.invert_xaxis()
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def render(root: Path, old: dict[str, list[str]], seeds: list[int]) -> list[str]:
    """The section from the committed data (``docs/results/absorb.json``, the known-rank runs of
    :data:`KNOWN_RANK_DOC`); the current doc's text of it where neither is here."""
    from ..rundata import section_key
    from .absorption import load_absorb

    src = root / KNOWN_RANK_FILE
    if src.is_file():
        shutil.copyfile(src, root / KNOWN_RANK_DOC)
    by_name = _by_name([e for e in load_absorb(root) if e["name"] in (*BASELINES, *VARIANTS)])
    if not any(n in by_name for n in VARIANTS) and not (root / KNOWN_RANK_DOC).is_file():
        return old.get(section_key(TITLE), [])
    md = [TITLE, "", NOTES_HERE, ""]
    parts = [
        (
            "Diagnosis at the switches (`--diagnose`, seed 1; medians over layers, means over switches)",
            _diagnosis_table(by_name),
        ),
        ("The training loss around the switches, against PiSSA r = 2 on the same batches", _around_switches(by_name)),
        ("Every option on seed 1, against PiSSA r = 2 and the LoRA ladder", _screen_table(by_name)),
        (
            f"The chosen option, `{BEST}`, on 3 seeds paired (95% t-interval; negative = lower loss)",
            _confirm_table(by_name, BEST),
        ),
        (
            "On the known-rank map (one 128-wide layer, r = 2, gamma 1, 2,000 steps; "
            "`srlora study --part new-pairs-known-rank`)",
            _known_rank_table(root),
        ),
    ]
    for title, table in parts:
        if table:
            md += [f"### {title}", "", *table, ""]
    if plot_frontier(by_name, root / "docs/results/new_pairs_frontier.png") is not None:
        md += [
            "The learning-forgetting frontier (Biderman et al. 2024): every run's prose loss against its",
            "held-out-chunk loss; the dashed line joins the LoRA ladder (r = 2, 8, 32, seed 1). Below the line is",
            "forgetting less than LoRA does for the same absorption.",
            "",
            "![learning-forgetting frontier](results/new_pairs_frontier.png)",
            "",
        ]
    md += _paper_regime_table(root, seeds)
    commands = [e["command"] for name in (*VARIANTS, *BASELINES) for e in by_name.get(name, {}).values()]
    md += [
        "Commands (absorption runs; each run's figures are in `docs/results/absorb.json`):",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    return md


NOTES_HERE = (
    "`srlora study --part new-pairs-screen`, then `--part new-pairs-confirm`: SmolLM2-135M absorbing TRL's "
    "source (the absorption study's task), SRLoRA r = 2 with both pairs recycled every 40 steps; each option "
    "changes what enters at a switch (docs/METHOD.md section 7)."
)
