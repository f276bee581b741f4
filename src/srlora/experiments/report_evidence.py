"""docs/RESULTS.md sections on where more directions pay (issue 20): the known-rank benchmark
and the corpus-absorption task. Both render from committed data alone
(``docs/results/known_rank.jsonl``, ``docs/results/absorb.json``), which the study's parts
refresh from ``runs/`` when those runs are on this machine."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .stats import fmt, fmt_paired, mean_std, paired

KNOWN_RANK = "docs/results/known_rank.jsonl"
ABSORB = "docs/results/absorb.json"


# ---------------------------------------------------------------------------- known rank
def refresh_known_rank(root: Path) -> None:
    """Copy the study's results (``runs/known-rank/results.jsonl``) into docs/results, when there."""
    src = root / "runs/known-rank/results.jsonl"
    if src.is_file():
        shutil.copyfile(src, root / KNOWN_RANK)


def load_known_rank(root: Path) -> list[dict[str, Any]]:
    path = root / KNOWN_RANK
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_cell(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """``{cell: {label: {seed: row}}}``."""
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        out[row["cell"]][row["label"]][row["spec"]["seed"]] = row
    return out


def _errors(runs: dict[int, dict[str, Any]]) -> dict[int, float]:
    return {seed: row["error"] for seed, row in runs.items()}


def best_srlora(labels: dict[str, dict[int, dict[str, Any]]]) -> tuple[str, dict[int, dict[str, Any]]] | None:
    """The SRLoRA variant with the lowest mean error in a cell (chosen on the same seeds it
    is reported on: an optimistic pick, which the per-interval columns put in context)."""
    srl = {k: v for k, v in labels.items() if k.startswith("srlora")}
    if not srl:
        return None
    return min(srl.items(), key=lambda kv: statistics.fmean(r["error"] for r in kv[1].values()))


def cell_row(cell: str, labels: dict[str, dict[int, dict[str, Any]]]) -> str:
    """One row of the map: the rank-r floor, LoRA at r, 4r, 8r, PiSSA at r, SRLoRA at each
    interval (gamma 0.5), and the best SRLoRA against LoRA at r and 4r (paired by seed)."""
    any_run = next(iter(next(iter(labels.values())).values()))
    r = any_run["spec"]["r"]
    floor = [r_["floor_r"] for r_ in labels.get(f"lora r={r}", {}).values() if r_["floor_r"] is not None]
    cells = [cell, f"{statistics.fmean(floor):.3f}" if floor else "-"]
    for k in (r, 4 * r, 8 * r):
        cells.append(fmt(mean_std(list(_errors(labels.get(f"lora r={k}", {})).values()))))
    cells.append(fmt(mean_std(list(_errors(labels.get(f"pissa r={r}", {})).values()))))
    half = sorted(
        ((int(label.split("T=")[1].split()[0]), runs) for label, runs in labels.items() if "gamma=0.5" in label),
        key=lambda x: x[0],
    )
    cells.append(", ".join(f"{t}: {statistics.fmean(_errors(runs).values()):.3f}" for t, runs in half))
    best = best_srlora(labels)
    if best is None:
        return "| " + " | ".join([*cells, "-", "-", "-"]) + " |"
    label, runs = best
    cells.append(label.removeprefix(f"srlora r={r} ") + f": {fmt(mean_std(list(_errors(runs).values())))}")
    for k in (r, 4 * r):
        cells.append(fmt_paired(paired(_errors(runs), _errors(labels.get(f"lora r={k}", {})))))
    return "| " + " | ".join(cells) + " |"


def fused_pairs_fit(rows: list[dict[str, Any]], min_interval: int = 30) -> tuple[float, int]:
    """Least-squares slope ``c`` of ``log(error) = -c * pairs_fused`` over the one-layer SRLoRA
    runs (random targets, Gaussian spectrum) with intervals of at least ``min_interval``
    steps and error above 0.01 (below, the float floor bends the line): how fast the error
    falls per fused pair, and the number of runs it rests on."""
    xs, ys = [], []
    for row in rows:
        spec = row["spec"]
        if spec["method"] != "srlora" or spec["layers"] != 1 or spec["target"] != "random":
            continue
        if spec["spectrum"] != "gauss" or spec["interval"] < min_interval or row["error"] <= 0.01:
            continue
        pairs = row["switches"] * max(1, round(spec["gamma"] * spec["r"]))
        xs.append(pairs)
        ys.append(-math.log(row["error"]))
    if not xs:
        return math.nan, 0
    return sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs), len(xs)


def plot_map(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Final error against the number of switches, one panel per K (one layer, random
    targets), one line per step budget; LoRA at r, 4r and 8r as horizontal lines."""
    from .plots import pyplot, save_figure

    cells = by_cell(rows)
    ks = sorted({int(c.split("-")[0][1:]) for c in cells if c.count("-") == 1})
    if not ks:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.4), squeeze=False)
    for ax, K in zip(axes[0], ks, strict=True):
        for cell, labels in sorted(cells.items()):
            if not cell.startswith(f"K{K}-N") or cell.count("-") != 1:
                continue
            pts = sorted(
                (statistics.fmean(r["switches"] for r in runs.values()), statistics.fmean(_errors(runs).values()))
                for label, runs in labels.items()
                if label.startswith("srlora") and "gamma=0.5" in label
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"SRLoRA r=2, N={cell.split('-N')[1]}")
        labels = cells.get(f"K{K}-N2000", {})
        for k, style in ((2, ":"), (8, "--"), (16, "-.")):
            runs = labels.get(f"lora r={k}")
            if runs:
                err = max(statistics.fmean(_errors(runs).values()), 1e-3)  # 0 (exact) drawn at the floor
                ax.axhline(err, color="grey", linestyle=style, label=f"LoRA r={k}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(1e-3, 1.5)
        ax.set_title(f"target rank K = {K}")
        ax.set_xlabel("switches in the run (min(N / T, budget))")
        ax.set_ylabel("relative error")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _cell_order(cell: str) -> tuple[int, int, int, str]:
    """K, then the one-layer random cells by step budget, then the variants."""
    parts = cell.split("-")
    return int(parts[0][1:]), len(parts), int(parts[1][1:]), cell


def section_known_rank(root: Path) -> list[str]:
    rows = load_known_rank(root)
    md = ["## When more directions pay: a known-rank benchmark", ""]
    if not rows:
        return [*md, "Not run yet: `srlora study --part known-rank`.", ""]
    from .known_rank import __doc__ as doc

    cells = by_cell(rows)
    seeds = sorted({r["spec"]["seed"] for r in rows})
    wall = sum(r["wall_s"] for r in rows) / 60
    md += [
        f"Command: `srlora study --part known-rank` (the same runs: `python benchmarks/known_rank.py --study`); "
        f"{len(rows)} runs, seeds {', '.join(map(str, seeds))}, {wall:.0f} min of one thread on this project's "
        f"2-core CPU. Every run's figures: `{KNOWN_RANK}`.",
        "",
        (doc or "").split("\n\n", 1)[1].split("    python")[0].strip(),
        "",
        "Adapters at rank r = 2 (s = 1), AdamW at 2e-3 with a cosine decay, batch 64, width 128; SRLoRA's "
        "r_target is set so that it switches every T steps until the end (r' = 1 at gamma 0.5, r' = 2 at gamma 1).",
        "",
        "| cell | best rank-2 error | LoRA r=2 | LoRA r=8 (4r) | LoRA r=16 (8r) | PiSSA r=2 | SRLoRA r=2 by "
        "interval T (mean) | best SRLoRA | best − LoRA r=2 (95% CI) | best − LoRA r=8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(cells, key=_cell_order)
    md += [cell_row(cell, cells[cell]) for cell in order]
    c, n = fused_pairs_fit(rows)
    plot = plot_map(rows, root / "docs/results/known_rank_map.png")
    md += [""]
    if plot is not None:
        md += ["![error against the number of switches](results/known_rank_map.png)", ""]
    if n:
        md += [
            f"Fit over the {n} one-layer SRLoRA runs with T ≥ 30 (random targets, Gaussian spectrum): "
            f"error ≈ exp(−{c:.4f} × pairs fused), i.e. each fused pair removes {100 * (1 - math.exp(-c)):.1f}% of "
            f"what is left to learn, whatever K.",
            "",
        ]
    return md


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
    from .absorb import AbsorbConfig
    from .studies.absorption import AbsorbJob

    path = root / ABSORB
    entries = {e["out"]: e for e in (json.loads(path.read_text()) if path.is_file() else [])}
    for res_path in sorted((root / "runs/absorb").glob("*/seed*/results.json")):
        r = json.loads(res_path.read_text())
        job = AbsorbJob(res_path.parent.parent.name, AbsorbConfig(**r["config"]))
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
        }
    if entries:
        from ..atomic import atomic_write_json

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
    path = root / ABSORB
    return json.loads(path.read_text()) if path.is_file() else []


def _final(entry: dict[str, Any], key: str) -> float:
    return entry[key] if key == "train_loss_tail" else entry["evals"][-1][key]


def section_absorb(root: Path) -> list[str]:
    rows = load_absorb(root)
    md = ["## The real task where LoRA's rank is short: corpus absorption", ""]
    if not rows:
        return [*md, "Not run yet: `srlora study --part absorb-pilot`, then `--part absorb`.", ""]
    from .absorb import __doc__ as doc

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
    srl = next((n for n in names if n.startswith("srlora")), None)
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
    from .plots import pyplot, save_figure

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
