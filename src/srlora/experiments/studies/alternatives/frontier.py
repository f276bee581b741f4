"""Learning against forgetting on the absorption task: LoRA's curve through its runs
(:func:`curve_at`), each run against it, each method's absorption at a forgetting budget, and
the plot of every method on both forgetting texts."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from .jobs import LABELS, OPTIONS, SAME_TRAINING, option_jobs, option_of

FORGETTING = (("prose", "prose"), ("news", "news"))  # the general texts whose loss measures forgetting


def mib(entry: dict[str, Any]) -> str:
    """A run's trainable-state memory in MiB, as a table shows it (``n/a``: a run without the count)."""
    memory = entry.get("memory")
    return f"{memory['trainable_state_bytes'] / 2**20:,.1f}" if memory else "n/a"


def with_options_and_curve(
    everything: list[dict[str, Any]], screen: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The screen's seed-1 runs with SRLoRA's options, and LoRA's runs that trace its curve (the
    absorption study's ladder, r = 2, 8, 32, and the screen's LoRA runs)."""
    options = {job.name for job in option_jobs()}
    screened = {e["name"] for e in screen}  # a swept option's run at the old rate is in both
    runs = screen + [e for e in everything if e["name"] in options - screened and e["config"]["seed"] == 1]
    lora = [e for e in everything if e["name"] in ("lora-r2", "lora-r8", "lora-r32") and e["config"]["seed"] == 1]
    lora += [e for e in screen if e["config"]["method"] == "lora"]
    return runs, lora


def curve_at(lora: list[dict[str, Any]], chunks: float, key: str) -> float | None:
    """LoRA's curve's loss on text ``key`` at ``chunks`` nats on held-out chunks: linear between
    LoRA's two runs around it (``None`` outside their span, or where they lack the text)."""
    points = sorted((e["evals"][-1]["held_chunks"], e["evals"][-1][key]) for e in lora if key in e["evals"][-1])
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= chunks <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (chunks - x0) / (x1 - x0)
    return None


def verdict_table(runs: list[dict[str, Any]], lora: list[dict[str, Any]]) -> list[str]:
    """Every run but LoRA's among ``runs`` (:func:`_with_options_and_curve`) against LoRA's curve
    through ``lora`` and against every run with no more memory."""
    mine = [e for e in runs if e["config"]["method"] != "lora"]
    if not mine or len(lora) < 2:
        return []
    md = [
        "",
        "### Each run against LoRA's curve and against what fits in its memory: seed 1",
        "",
        "*Above the curve*: the run's loss on that text minus LoRA's curve's at the same absorption "
        "(linear between LoRA's runs around it; + forgets more; n/a: outside the span of LoRA's runs). "
        "*Better for less*: runs with no more memory that absorb at least as much and forget no more "
        "on both texts.",
        "",
        "| run | memory (MiB) | held-out chunks | above the curve: prose | news | better for less |",
        "|---|---|---|---|---|---|",
    ]
    for e in sorted(mine, key=lambda e: (list(LABELS).index(e["config"]["method"]), e["name"])):
        final, memory = e["evals"][-1], e["memory"]["trainable_state_bytes"]
        gaps = []
        for key in ("prose", "news"):
            curve = curve_at(lora, final["held_chunks"], key) if key in final else None
            gaps.append("n/a" if curve is None else f"{final[key] - curve:+.3f}")
        better = [
            o["name"]
            for o in runs + lora
            if o is not e
            and o.get("memory") is not None
            and o["memory"]["trainable_state_bytes"] <= memory
            and all(k in o["evals"][-1] and o["evals"][-1][k] <= final[k] for k in ("held_chunks", "prose", "news"))
        ]
        md.append(
            f"| {e['name']} | {mib(e)} | {final['held_chunks']:.3f} | {gaps[0]} | {gaps[1]} | "
            + (", ".join(sorted(set(better))) or "none")
            + " |"
        )
    return md


def plot_frontier(runs: list[dict[str, Any]], lora: list[dict[str, Any]], path: Path) -> Path | None:
    """Each forgetting text's loss against held-out-chunk loss for every seed-1 run of the
    screen and of SRLoRA's options (``runs``), with LoRA's curve: its runs (``lora``) joined in
    order of learning."""
    from ...plots import pyplot, save_figure

    if len(runs) < 2:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.6))
    for ax, (key, label) in zip(axes, FORGETTING, strict=True):
        curve = sorted((e for e in lora if key in e["evals"][-1]), key=lambda e: e["evals"][-1]["held_chunks"])
        if len(curve) >= 2:
            xs, ys = [e["evals"][-1]["held_chunks"] for e in curve], [e["evals"][-1][key] for e in curve]
            ax.plot(xs, ys, "k--", lw=1, label="LoRA's curve")
        for method in LABELS:
            points = [e for e in runs if e["config"]["method"] == method and not option_of(e)]
            points = [e for e in points if key in e["evals"][-1]]
            if points:
                xs = [e["evals"][-1]["held_chunks"] for e in points]
                dots = ax.scatter(xs, [e["evals"][-1][key] for e in points], s=22, label=LABELS[method])
                if method != "lora":  # LoRA's runs are the curve itself
                    _sweep_line(ax, points, key, dots.get_facecolor()[0])
        stars = plt.get_cmap("Dark2").colors  # not the methods' colours: a star is no method's run
        for tag, colour in zip(OPTIONS, stars, strict=False):  # every learning rate of a swept one
            points = [e for e in runs if option_of(e) == tag and key in e["evals"][-1]]
            if points and tag not in SAME_TRAINING:
                xs = [e["evals"][-1]["held_chunks"] for e in points]
                ys = [e["evals"][-1][key] for e in points]
                ax.scatter(xs, ys, marker="*", s=70, color=colour, label=OPTIONS[tag].what)
                _sweep_line(ax, points, key, colour)
        start = runs[0]["evals"][0]  # step 0: the untrained model, the same in every run
        if key in start:
            ax.scatter([start["held_chunks"]], [start[key]], marker="x", c="k", s=40, label="untrained")
        ax.set_xlabel("held-out chunks (nats/token): learnt, lower is better")
        ax.set_ylabel(f"{label} (nats/token): forgotten, lower is better")
        ax.invert_xaxis()
    # one legend below both panels (the same runs in the same colours on each), clear of the points
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.022 * ((len(labels) + 2) // 3), 1, 1))
    return save_figure(fig, path)


def _sweep_line(ax: Any, runs: list[dict[str, Any]], key: str, colour: Any) -> None:
    """A method's r = 2 runs joined in order of learning rate: the path :func:`at_budget` reads."""
    sweep = sorted((e for e in runs if e["config"]["r"] == 2), key=lambda e: e["config"]["lr"])
    if len(sweep) >= 2:
        xs, ys = [e["evals"][-1]["held_chunks"] for e in sweep], [e["evals"][-1][key] for e in sweep]
        ax.plot(xs, ys, color=colour, lw=0.8, alpha=0.6)


# Forgetting budgets: nats per token over the untrained model's loss on each general text.
BUDGETS = (0.05, 0.1, 0.2)


def at_budget(path: list[tuple[float, float]], budget: float) -> tuple[float, bool] | None:
    """The least held-out-chunk loss along ``path`` whose forgetting stays within ``budget``.

    ``path``: a method's runs in order of learning rate, ``(held-out chunks, forgetting loss)``
    each, joined linearly between neighbouring rates (the runs are the only measured points; a
    segment's rates are 2.5x apart). Along a segment both losses are linear in one parameter, so
    the best admissible point is one of its runs or the point where it crosses ``budget``.
    Returns ``(chunks, open)``, ``open`` when the path's last run is still within the budget (a
    higher rate might absorb more for it), or ``None`` when even its first run forgets more. A
    run that diverged (a loss not finite) is over every budget, and no segment crosses at it."""
    best: float | None = None
    for x, f in path:  # the runs themselves
        if math.isfinite(x) and f <= budget and (best is None or x < best):
            best = x
    for (x0, f0), (x1, f1) in itertools.pairwise(path):  # where a segment crosses the budget
        if all(map(math.isfinite, (x0, f0, x1, f1))) and min(f0, f1) < budget < max(f0, f1):
            x = x0 + (x1 - x0) * (budget - f0) / (f1 - f0)
            best = x if best is None else min(best, x)
    return None if best is None else (best, path[-1][1] <= budget)


def budget_table(paths: dict[str, list[dict[str, Any]]], untrained: dict[str, float]) -> list[str]:
    """Each method's absorption at each forgetting budget of :data:`BUDGETS` on both texts
    (:func:`at_budget`), ``paths`` its seed-1 runs by label in order of learning rate; the best
    of each column in bold."""
    columns = [(key, b) for key, _ in FORGETTING for b in BUDGETS if key in untrained]
    if not paths or not columns:
        return []
    cells: dict[str, list[tuple[float, bool] | None]] = {}
    for what, runs in paths.items():
        finals = [e["evals"][-1] for e in runs]
        cells[what] = [
            at_budget([(f["held_chunks"], f[key]) for f in finals if key in f], untrained[key] + b)
            for key, b in columns
        ]
    best = [min((c[i][0] for c in cells.values() if c[i] is not None), default=None) for i in range(len(columns))]
    md = [
        "",
        "### What each method learns at a forgetting budget: seed 1, r = 2",
        "",
        "Held-out chunks (nats per token, lower is better) at the learning rate where the method's "
        "forgetting reaches the budget: nats per token over the untrained model's loss on that text, "
        "linear between its two neighbouring rates of the sweep. *open*: its highest rate run is "
        "still within the budget (a higher one might learn more); *over*: its lowest rate already "
        "forgets more. The same budget for every method is the comparison at matched forgetting; "
        "the screen's own choice (the best held-out chunks at any forgetting) is the table above.",
        "",
        "| method | memory (MiB) | " + " | ".join(f"{key} +{b:g}" for key, b in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for what, row in cells.items():
        text = []
        for i, cell in enumerate(row):
            if cell is None:
                text.append("over")
                continue
            value = f"{cell[0]:.3f}"
            value = f"**{value}**" if cell[0] == best[i] else value
            text.append(value + (" (open)" if cell[1] else ""))
        md.append(f"| {what} | {mib(paths[what][0])} | " + " | ".join(text) + " |")
    return md
