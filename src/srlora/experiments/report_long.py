"""docs/RESULTS.md, the 600-step study (issue 13): its sections, one function each.

Every comparison is paired: runs of one seed share the data order, the head's
initialisation and the dropout masks, so ``SRLoRA - other`` is taken seed by seed and
reported as its mean with a 95% Student-t interval over the seeds (:func:`stats.paired`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .config import PRESETS
from .rundata import dynamics_row, load_runs, section_key
from .runs import train_losses
from .stats import beyond, fmt, fmt_paired, mean_std, paired
from .study import (
    PAPER_REGIME,
    RANK_CANDIDATES,
    RANK_CHOSEN,
    RANK_PILOT,
    Job,
    is_finished,
    long_jobs,
    rank_jobs,
    rank_pilot_jobs,
)

PAPER_TITLE = "## 600 steps, paper regime: MiniLM, r = 8, r_target = 64"
RANK_TITLE = "## 600 steps, rank-bound regime: {task}"
DECISION_TITLE = "## 600 steps, the default direction policy"
COMMANDS_TITLE = "### Commands of the 600-step runs"

# variant label -> (cell, method), per regime
PAPER_VARIANTS = {
    "LoRA": ("long-{task}", "lora"),
    "PiSSA": ("long-{task}", "pissa"),
    "SRLoRA spectrum": ("long-{task}", "srlora"),
    "SRLoRA gradient": ("long-{task}-gradient", "srlora"),
    "SRLoRA spectrum, reset all scores": ("long-{task}-scores-all", "srlora"),
}
RANK_VARIANTS = {
    "LoRA r=2": ("{task}-r2", "lora"),
    "PiSSA r=2": ("{task}-r2", "pissa"),
    "SRLoRA r=2 spectrum": ("{task}-r2", "srlora"),
    "SRLoRA r=2 gradient": ("{task}-r2-gradient", "srlora"),
    "LoRA r=8": ("{task}-r8", "lora"),
    "LoRA r=32": ("{task}-r32", "lora"),
}


def _runs(root: Path, variants: dict[str, tuple[str, str]], task: str = "") -> dict[str, list[dict[str, Any]]]:
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


def _figures(root: Path, name: str, runs: dict[str, list[dict[str, Any]]], spectrum: str, gradient: str) -> list[str]:
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


def section_paper(root: Path) -> list[str]:
    q = PRESETS["quick"]
    md = [
        PAPER_TITLE,
        "",
        f"`srlora study --part long`: MiniLM on `mr` and `mr-reg`, 600 AdamW steps (peak lr {q['lr']:g}, 60 warm-up "
        f"steps, linear decay), batch {q['batch_size']}, r = alpha = {q['r']}; SRLoRA r_target = 64, gamma = 0.5: "
        'r\' = 4 pairs per switch, 14 switches, t_interval = 42. `gradient` is `direction_policy="gradient"` '
        "(docs/METHOD.md section 6), capturing the 19 steps before each switch. Dev: a fixed 1,000-example "
        "subset, evaluated after the last step. The runs of one seed share data order, head initialisation and "
        "dropout masks; each comparison is the mean of the per-seed differences with its 95% Student-t "
        "interval (an interval that excludes 0 is a difference beyond the seed-to-seed noise).",
        "",
    ]
    any_runs = False
    for task in PAPER_REGIME:
        runs = _runs(root, PAPER_VARIANTS, task)
        if not runs:
            continue
        any_runs = True
        pairs = [
            ("SRLoRA spectrum", "LoRA"),
            ("SRLoRA spectrum", "PiSSA"),
            ("SRLoRA gradient", "LoRA"),
            ("SRLoRA gradient", "PiSSA"),
            ("SRLoRA gradient", "SRLoRA spectrum"),
            ("SRLoRA spectrum, reset all scores", "SRLoRA spectrum"),
        ]
        md += [f"### {task}", "", *variant_table(runs), *paired_table(runs, pairs), *dynamics_table(runs)]
        md += _figures(root, task, runs, "SRLoRA spectrum", "SRLoRA gradient")
    return md if any_runs else []


def section_pilot(root: Path) -> list[str]:
    """LoRA at several ranks on each candidate task, first seed: where does the rank limit learning?"""
    rows = []
    for task, ranks in RANK_PILOT.items():
        prefix = RANK_CANDIDATES[task][0]
        cells = {k: (f"{prefix}-r{k}", "lora") for k in ranks}
        if task in PAPER_REGIME:
            cells[8] = (f"long-{task}", "lora")  # the paper-regime LoRA run: the same but for an unused r_target
        found = {}
        for k, (cell, method) in sorted(cells.items()):
            rs = [r for r in load_runs(root, cell, method) if r["seed"] == 1]
            if rs:
                found[k] = rs[0]
        if found:
            headline = next(iter(found.values()))["headline_metric"]
            values = ", ".join(f"r = {k}: {r['final'][headline]:.3f}" for k, r in found.items())
            rows.append(f"| {task} | {headline} | {values} |")
    if not rows:
        return []
    return [
        "Pilot (`srlora study --part rank-pilot`, LoRA, seed 1, 600 steps, s = 1): where does the rank limit learning?",
        "",
        "| task | dev metric | LoRA at rank r |",
        "|---|---|---|",
        *rows,
        "",
    ]


def rank_tasks(root: Path) -> list[str]:
    """The rank-bound regime's tasks to report: the chosen one, then every other candidate
    with runs beyond its LoRA pilot (``srlora study --part rank --rank-task T``)."""
    out = [RANK_CHOSEN]
    for task, (prefix, _) in RANK_CANDIDATES.items():
        if task != RANK_CHOSEN and set(_runs(root, RANK_VARIANTS, prefix)) - {"LoRA r=2"}:
            out.append(task)
    return out


def section_rank(root: Path, task: str = RANK_CHOSEN) -> list[str]:
    prefix, options = RANK_CANDIDATES[task]
    runs = _runs(root, RANK_VARIANTS, prefix)
    pilot = section_pilot(root) if task == RANK_CHOSEN else []
    if not runs and not pilot:
        return []
    md = [
        RANK_TITLE.format(task=task),
        "",
        f"`srlora study --part rank --rank-task {task}`: `{task}` ({' '.join(options) or 'the quick preset'}), "
        "600 AdamW steps "
        "with 60 warm-up steps, the quick preset otherwise; scaling s = alpha / r = 1 at every rank, so only the "
        "rank differs. SRLoRA at r = 2 with r_target = 32: r' = 1, 30 switches, t_interval = 20. The question: how "
        "much of the gap between LoRA at r = 2 and at r = 8 does SRLoRA close?",
        "",
        *pilot,
    ]
    if not runs:
        return md
    md += variant_table(runs)
    pairs = [
        ("LoRA r=8", "LoRA r=2"),
        ("LoRA r=32", "LoRA r=2"),
        ("SRLoRA r=2 spectrum", "LoRA r=2"),
        ("SRLoRA r=2 spectrum", "PiSSA r=2"),
        ("SRLoRA r=2 gradient", "LoRA r=2"),
        ("SRLoRA r=2 gradient", "PiSSA r=2"),
        ("SRLoRA r=2 gradient", "SRLoRA r=2 spectrum"),
        ("SRLoRA r=2 spectrum", "LoRA r=8"),
        ("SRLoRA r=2 gradient", "LoRA r=8"),
    ]
    md += paired_table(runs, pairs)
    md += gap_closed(runs, next(iter(runs.values()))[0]["headline_metric"])
    md += dynamics_table(runs)
    md += _figures(root, f"rank-{task}", runs, "SRLoRA r=2 spectrum", "SRLoRA r=2 gradient")
    return md


def gap_closed(runs: dict[str, list[dict[str, Any]]], metric: str = "accuracy") -> list[str]:
    """How much of the LoRA r = 2 to r = 8 gap each r = 2 variant closes, only where the gap
    itself is beyond the seed noise (its paired interval excludes 0)."""
    if not {"LoRA r=2", "LoRA r=8"} <= set(runs):
        return []
    acc = {label: by_seed(rs, metric) for label, rs in runs.items()}
    gap = paired(acc["LoRA r=8"], acc["LoRA r=2"])
    lines = [f"Gap between LoRA at r = 8 and at r = 2: {fmt_paired(gap)} {metric}."]
    if not gap[1] > 0:  # NaN (one seed) or an interval that reaches 0
        lines.append(
            "Its interval does not exclude 0: the rank limit is not established beyond the seed noise, so no "
            "share of the gap closed is reported; read the paired differences above."
        )
        return [" ".join(lines), ""]
    for label in ("PiSSA r=2", "SRLoRA r=2 spectrum", "SRLoRA r=2 gradient"):
        if label in acc:
            gain = paired(acc[label], acc["LoRA r=2"])
            lines.append(f"{label} closes {gain[0] / gap[0]:.0%} of it (mean gain over LoRA r=2 / mean gap).")
    return [" ".join(lines), ""]


def section_decision(root: Path) -> list[str]:
    """The rule of issue 13: "gradient" becomes the default only if it beats "spectrum" beyond
    the paired interval on at least two tasks and loses beyond it on none."""
    verdicts = []
    cells = [(task, f"long-{task}", f"long-{task}-gradient") for task in PAPER_REGIME]
    prefix = RANK_CANDIDATES[RANK_CHOSEN][0]
    cells.append((f"{RANK_CHOSEN} (r=2)", f"{prefix}-r2", f"{prefix}-r2-gradient"))
    for task, spectrum_cell, gradient_cell in cells:
        spectrum, gradient = load_runs(root, spectrum_cell, "srlora"), load_runs(root, gradient_cell, "srlora")
        if not spectrum or not gradient:
            continue
        headline = spectrum[0]["headline_metric"]
        d = paired(by_seed(gradient, headline), by_seed(spectrum, headline))
        verdicts.append((task, headline, d, beyond(d)))
    if not verdicts:
        return []
    wins = sum(v == 1 for *_, v in verdicts)
    losses = sum(v == -1 for *_, v in verdicts)
    default = "gradient" if wins >= 2 and losses == 0 else "spectrum"
    md = [
        DECISION_TITLE,
        "",
        'Rule (issue 13): `direction_policy="gradient"` becomes the default only if it beats `"spectrum"` '
        "by more than the paired 95% interval on at least two tasks without losing beyond it on any.",
        "",
        "| task | Δ (gradient − spectrum) [95% interval] | beyond the interval |",
        "|---|---|---|",
    ]
    for task, headline, d, v in verdicts:
        md.append(f"| {task} | {headline} {fmt_paired(d)} | {'win' if v > 0 else 'loss' if v < 0 else 'no'} |")
    md += [
        "",
        f'Measured: {wins} win(s), {losses} loss(es) over {len(verdicts)} task(s): the default is `"{default}"`.',
        "",
    ]
    return md


def long_study_all_jobs(seeds: list[int]) -> list[Job]:
    """Every run of the 600-step study (paper regime, rank pilot, rank-bound regime of every
    candidate task), each once, in the study's order."""
    rank = [j for task in RANK_CANDIDATES for j in rank_jobs(seeds, task)]
    return list({j.out: j for j in long_jobs(seeds) + rank_pilot_jobs(seeds) + rank}.values())


def section_long_commands(root: Path, seeds: list[int]) -> list[str]:
    """Every 600-step run's command: those finished here and those in the committed
    ``docs/results/runs.json`` (``runs/`` is not committed), in the study's order."""
    jobs = long_study_all_jobs(seeds)
    index = root / "docs/results/runs.json"
    wall = {e["command"]: e["wall_s"] for e in (json.loads(index.read_text()) if index.is_file() else [])}
    for j in jobs:
        if is_finished(j, root):
            wall[j.command()] = json.loads((root / j.out / "results.json").read_text())["wall_s"]
    done = [j.command() for j in jobs if j.command() in wall]
    if not done:
        return []
    total = sum(wall[c] for c in done)
    return [
        COMMANDS_TITLE,
        "",
        f"{len(done)} runs, {total / 3600:.1f} h of run time in all (two at a time, one thread each):",
        "",
        "```",
        *done,
        "```",
        "",
    ]


def render_long(root: Path, seeds: list[int], old: dict[str, list[str]]) -> list[str]:
    """The 600-step study's sections; a section with no run here keeps its text from ``old``
    (looked up by its whole title: the rank-bound sections of two tasks share their first words;
    a rank-bound section whose variant runs are not here keeps its text even if pilot runs are)."""
    md: list[str] = []
    with_runs = rank_tasks(root)
    for title, fresh in (
        (PAPER_TITLE, section_paper(root)),
        *((RANK_TITLE.format(task=task), _rank_fresh(root, task, task in with_runs, old)) for task in RANK_CANDIDATES),
        (DECISION_TITLE, section_decision(root)),
    ):
        whole = title.removeprefix("## ")
        kept = old.get(whole, [] if title.startswith(RANK_TITLE[:20]) else old.get(section_key(title), []))
        if COMMANDS_TITLE in kept:  # the commands are listed afresh below, from every run known
            kept = kept[: kept.index(COMMANDS_TITLE)]
        md += fresh or kept
    md += section_long_commands(root, seeds)
    return md


def _rank_fresh(root: Path, task: str, reported: bool, old: dict[str, list[str]]) -> list[str]:
    """The rank-bound section of ``task`` from the runs here, or [] to keep the old text: its
    variant runs are not here, and it has one (a pilot table alone would replace it)."""
    if not reported:
        return []
    has_variants = bool(_runs(root, RANK_VARIANTS, RANK_CANDIDATES[task][0]))
    if not has_variants and RANK_TITLE.format(task=task).removeprefix("## ") in old:
        return []
    return section_rank(root, task)
