"""The rank-bound regime at 600 steps: a task where the number of trainable ranks
limits learning (scaling s = alpha / r = 1 at every rank), LoRA at r = 2, 8, 32, PiSSA and
SRLoRA (both direction policies) at r = 2.

    srlora study --part rank-pilot        # LoRA at several r on each candidate task, seed 1
    srlora study --part rank [--rank-task T]

Every run is one ``srlora train`` command (:class:`~srlora.experiments.jobs.Job`); the section
(one per task with runs) pairs the variants by seed. Its commands are listed with the paper
regime's (:mod:`srlora.experiments.studies.paper_regime`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..jobs import LONG_COMMON, Job, run_jobs
from ..rundata import RenderContext, Section, load_runs
from ..stats import fmt_paired, paired
from ..tables import by_seed, dynamics_table, paired_table, runs_of, slot_figures, variant_table

# The rank-bound regime: a task where the number of trainable ranks limits learning, scaling
# s = alpha / r = 1 at every rank. The pilot (LoRA at several r, first seed) picks the task.
RANK_TASK = ["--lr", "1e-3", "--max-train", "20000", "--image-size", "56"]


RANK_CANDIDATES: dict[str, tuple[str, list[str]]] = {  # task: (cell prefix, task options)
    "fashion-mnist": ("rank", RANK_TASK),
    "mr": ("rank-mr", []),
    "mr-reg": ("rank-mr-reg", []),
}


RANK_PILOT: dict[str, tuple[int, ...]] = {"fashion-mnist": (1, 2, 8, 32), "mr": (2,), "mr-reg": (2,)}


RANK_CHOSEN = "fashion-mnist"
PAPER_REGIME_TASKS = ("mr", "mr-reg")  # their paper-regime LoRA runs (r = 8) are the pilot's r = 8


def rank_cells(prefix: str) -> dict[str, tuple[list[str], list[tuple[str, list[str]]]]]:
    """cell: (options, [(method, extra options)]) of the rank-bound regime."""

    def r(k: int) -> list[str]:
        return ["--r", str(k), "--alpha", str(k)]

    return {
        f"{prefix}-r2": ([*r(2), "--r-target", "32"], [("lora", []), ("pissa", []), ("srlora", [])]),
        f"{prefix}-r2-gradient": ([*r(2), "--r-target", "32", "--direction-policy", "gradient"], [("srlora", [])]),
        f"{prefix}-r8": (r(8), [("lora", [])]),
        f"{prefix}-r32": (r(32), [("lora", [])]),
        f"{prefix}-r1": (r(1), [("lora", [])]),
    }


def rank_jobs(seeds: list[int], task: str = RANK_CHOSEN) -> list[Job]:
    """The rank-bound regime at 600 steps on ``task``: LoRA at r = 2, 8, 32, PiSSA at r = 2 and
    SRLoRA at r = 2 with r_target 32 (both direction policies)."""
    prefix, options = RANK_CANDIDATES[task]
    jobs = []
    for seed in seeds:
        for cell, (cell_options, methods) in rank_cells(prefix).items():
            if cell.endswith("-r1"):
                continue
            for method, extra in methods:
                jobs.append(Job(cell, task, method, seed, [*options, *cell_options, *extra], LONG_COMMON))
    return jobs


def rank_pilot_jobs(seeds: list[int]) -> list[Job]:
    """LoRA at the ranks of :data:`RANK_PILOT` on each candidate task, first seed only: where
    does the rank limit learning? (LoRA at r = 8 on mr and mr-reg is the paper-regime run.)"""
    jobs = []
    for task, ranks in RANK_PILOT.items():
        prefix, options = RANK_CANDIDATES[task]
        cells = rank_cells(prefix)
        for k in ranks:
            cell_options, _ = cells[f"{prefix}-r{k}"]
            jobs.append(Job(f"{prefix}-r{k}", task, "lora", seeds[0], [*options, *cell_options], LONG_COMMON))
    return jobs


RANK_TITLE = "## 600 steps, rank-bound regime: {task}"


# variant label -> (cell, method); {task} is the task's cell prefix
ROWS = {
    "LoRA r=2": ("{task}-r2", "lora"),
    "PiSSA r=2": ("{task}-r2", "pissa"),
    "SRLoRA r=2 spectrum": ("{task}-r2", "srlora"),
    "SRLoRA r=2 gradient": ("{task}-r2-gradient", "srlora"),
    "LoRA r=8": ("{task}-r8", "lora"),
    "LoRA r=32": ("{task}-r32", "lora"),
}


def section_pilot(root: Path) -> list[str]:
    """LoRA at several ranks on each candidate task, first seed: where does the rank limit learning?"""
    rows = []
    for task, ranks in RANK_PILOT.items():
        prefix = RANK_CANDIDATES[task][0]
        cells = {k: (f"{prefix}-r{k}", "lora") for k in ranks}
        if task in PAPER_REGIME_TASKS:
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
        if task != RANK_CHOSEN and set(runs_of(root, ROWS, prefix)) - {"LoRA r=2"}:
            out.append(task)
    return out


def section_rank(root: Path, task: str = RANK_CHOSEN) -> list[str]:
    prefix, options = RANK_CANDIDATES[task]
    runs = runs_of(root, ROWS, prefix)
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
    md += slot_figures(root, f"rank-{task}", runs, "SRLoRA r=2 spectrum", "SRLoRA r=2 gradient")
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


def rank_fresh(root: Path, task: str, reported: bool, old: dict[str, list[str]]) -> list[str]:
    """The rank-bound section of ``task`` from the runs here, or [] to keep the old text: its
    variant runs are not here, and it has one (a pilot table alone would replace it)."""
    if not reported:
        return []
    has_variants = bool(runs_of(root, ROWS, RANK_CANDIDATES[task][0]))
    if not has_variants and RANK_TITLE.format(task=task).removeprefix("## ") in old:
        return []
    return section_rank(root, task)


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """This study's run-table rows: (section, None) -> {row label: (cell, method)}."""
    return {
        (RANK_TITLE.format(task=task).removeprefix("## "), None): {
            label: (cell.format(task=prefix), method) for label, (cell, method) in ROWS.items()
        }
        for task, (prefix, _) in RANK_CANDIDATES.items()
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """This study's own option of ``srlora study``."""
    ap.add_argument(
        "--rank-task",
        choices=list(RANK_CANDIDATES),
        default=RANK_CHOSEN,
        help="The task of --part rank (the rank-bound regime); the report shows every task that has runs.",
    )


PARTS = {
    "rank-pilot": lambda root, seeds, ns: run_jobs(rank_pilot_jobs(seeds), ns.jobs, root),
    "rank": lambda root, seeds, ns: run_jobs(rank_jobs(seeds, ns.rank_task), ns.jobs, root),
}


def _rank(ctx: RenderContext) -> list[str]:
    """Each candidate task's section (a task with no run here keeps its text, by whole title:
    the sections of two tasks share their first words)."""
    with_runs = rank_tasks(ctx.root)
    md: list[str] = []
    for task in RANK_CANDIDATES:
        fresh = rank_fresh(ctx.root, task, task in with_runs, ctx.old)
        md += ctx.kept(RANK_TITLE.format(task=task), fresh, whole_only=True)
    return md


SECTIONS: dict[str, Section] = {"rank": _rank}
