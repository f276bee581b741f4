"""Tables of runs paired by seed (the 600-step studies, the GPU study): every comparison is
paired, since runs of one seed share the data order, the head's initialisation and the dropout
masks, so ``SRLoRA - other`` is taken seed by seed and reported as its mean with a 95%
Student-t interval over the seeds (:func:`srlora.experiments.stats.paired`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .rundata import dynamics_row, load_runs
from .runs import train_losses
from .stats import fmt, fmt_paired, mean_std, paired


def runs_of(root: Path, variants: dict[str, tuple[str, str]], task: str = "") -> dict[str, list[dict[str, Any]]]:
    out = {label: load_runs(root, cell.format(task=task), method) for label, (cell, method) in variants.items()}
    return {label: rs for label, rs in out.items() if rs}


def by_seed(runs: list[dict[str, Any]], key: str) -> dict[int, float]:
    if key == "early":
        return {r["seed"]: r["early_train_loss"] for r in runs}
    return {r["seed"]: r["final"][key] for r in runs}


def variant_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    first = next(iter(runs.values()))[0]
    metrics = [k for k in first["final"] if k not in ("step", "eval_loss")]
    head = ["variant", "seeds", *metrics, "early loss (first 25%) ↓", "final dev loss ↓", "wall s / run"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in runs.items():
        cells = [label, str(len(rs)), *[fmt(mean_std([r["final"][k] for r in rs])) for k in metrics]]
        cells += [
            fmt(mean_std([r["early_train_loss"] for r in rs])),
            fmt(mean_std([r["final"]["eval_loss"] for r in rs])),
        ]
        cells.append(f"{statistics.fmean(r['wall_s'] for r in rs):.0f}")
        md.append("| " + " | ".join(cells) + " |")
    return [*md, ""]


def paired_table(runs: dict[str, list[dict[str, Any]]], pairs: list[tuple[str, str]]) -> list[str]:
    headline = next(iter(runs.values()))[0]["headline_metric"]
    md = [
        f"| comparison (paired by seed) | Δ {headline} [95% interval] | Δ early loss [95% interval] |",
        "|---|---|---|",
    ]
    for a, b in pairs:
        if a in runs and b in runs:
            d_metric = paired(by_seed(runs[a], headline), by_seed(runs[b], headline))
            d_early = paired(by_seed(runs[a], "early"), by_seed(runs[b], "early"))
            md.append(f"| {a} − {b} | {fmt_paired(d_metric)} | {fmt_paired(d_early)} |")
    return [*md, ""]


def dynamics_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = [row for label, rs in runs.items() if "SRLoRA" in label and (row := dynamics_row(label, rs))]
    if not rows:
        return []
    return [
        "| run | seeds | switches / layer | directions used | initial kept | re-evicted |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def slot_figures(
    root: Path, name: str, runs: dict[str, list[dict[str, Any]]], spectrum: str, gradient: str
) -> list[str]:
    from . import plots

    fig_dir = root / "docs/results"
    curves = {label: [train_losses(r["_dir"]) for r in rs] for label, rs in runs.items()}
    png = plots.plot_loss_curves(curves, fig_dir / f"long_{name}_loss.png", f"{name}, 600 steps: training loss")
    md = [f"![{name} loss](results/{png.name})", ""]
    for label in (spectrum, gradient):
        rs = runs.get(label) or []
        hist_path = rs[0]["_dir"] / "history.json" if rs else None
        if hist_path is None or not hist_path.is_file():
            continue
        history = json.loads(hist_path.read_text())
        layers = plots.layers_of(history)
        layer = layers[len(layers) // 2]
        tag = label.split()[-1]
        act = plots.plot_active_intervals(history, layer, fig_dir / f"long_{name}_{tag}_active_intervals.png")
        md += [
            f"Directions each slot held in `{layer}`, {label} (seed {rs[0]['seed']}):",
            "",
            f"![{label}](results/{act.name})",
            "",
        ]
    return md
