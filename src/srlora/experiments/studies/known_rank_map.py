"""Where more directions pay: the known-rank benchmark's map. One layer (or a GELU
stack) learns a target update of known rank K; LoRA at r, 4r, 8r, PiSSA and SRLoRA over
intervals (:mod:`srlora.experiments.known_rank`, the runner).

    srlora study --part known-rank       # 648 runs, 3 seeds, one thread (resumable)

The runs go to ``runs/known-rank/results.jsonl`` (one line each), copied into
``docs/results/known_rank.jsonl``, from which the section renders.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..rundata import RenderContext, Section
from ..stats import fmt, fmt_paired, mean_std, paired

KNOWN_RANK = "docs/results/known_rank.jsonl"


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
    from ..plots import pyplot, save_figure

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
    from ..known_rank import __doc__ as doc

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


def run(root: Path, seeds: list[int]) -> None:
    """The map's runs that are missing."""
    from ..known_rank import run_study

    run_study(root / "runs/known-rank", seeds)


PARTS = {"known-rank": lambda root, seeds, ns: run(root, seeds)}


def _map(ctx: RenderContext) -> list[str]:
    refresh_known_rank(ctx.root)  # the runs here into docs/results/known_rank.jsonl first
    return section_known_rank(ctx.root)


SECTIONS: dict[str, Section] = {"map": _map}


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """This study's run-table rows built from ``srlora train`` runs: none."""
    return {}
