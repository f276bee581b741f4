"""The paper's regime at 600 steps: MiniLM on mr and mr-reg, r = 8, r_target = 64,
LoRA, PiSSA and SRLoRA (both direction policies; the paper's score reset on mr), 3 seeds
paired by seed.

    srlora study --part long

Every run is one ``srlora train`` command (:class:`~srlora.experiments.jobs.Job`). This module
also writes what the 600-step runs share: the default direction policy's decision (paper
regime and the rank-bound regime, :mod:`srlora.experiments.studies.rank_bound`) and the list
of every 600-step command (:func:`render_long`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import PRESETS
from ..jobs import LONG_COMMON, Job, is_finished, run_jobs
from ..rundata import RenderContext, Section, load_runs
from ..stats import beyond, fmt_paired, paired
from ..tables import by_seed, dynamics_table, paired_table, runs_of, slot_figures, variant_table
from .rank_bound import RANK_CANDIDATES, RANK_CHOSEN, rank_jobs, rank_pilot_jobs

# The paper's regime: MiniLM, r=8, r_target=64 (r'=4: 14 switches, t_interval 42).
PAPER_REGIME: dict[str, list[str]] = {"mr": ["--r-target", "64"], "mr-reg": ["--r-target", "64"]}


# cell suffix -> (method, options, tasks it runs on)
JOB_VARIANTS: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    "": ("lora", [], ("mr", "mr-reg")),
    "/pissa": ("pissa", [], ("mr", "mr-reg")),
    "/srlora": ("srlora", [], ("mr", "mr-reg")),
    "-gradient": ("srlora", ["--direction-policy", "gradient"], ("mr", "mr-reg")),
    "-scores-all": ("srlora", ["--reset-scores", "all"], ("mr",)),
}


def long_jobs(seeds: list[int]) -> list[Job]:
    """The paper regime at 600 steps: LoRA, PiSSA, SRLoRA (spectrum, gradient) on mr and mr-reg,
    and the paper's score reset on mr; seeds outermost, so that whole seeds finish first."""
    jobs = []
    for seed in seeds:
        for task, regime in PAPER_REGIME.items():
            for suffix, (method, extra, tasks) in JOB_VARIANTS.items():
                if task in tasks:
                    cell = f"long-{task}" + ("" if suffix.startswith("/") or not suffix else suffix)
                    jobs.append(Job(cell, task, method, seed, [*regime, *extra], common=LONG_COMMON))
    return jobs


PAPER_TITLE = "## 600 steps, paper regime: MiniLM, r = 8, r_target = 64"


DECISION_TITLE = "## 600 steps, the default direction policy"


COMMANDS_TITLE = "### Commands of the 600-step runs"


# variant label -> (cell, method); {task} is the task
ROWS = {
    "LoRA": ("long-{task}", "lora"),
    "PiSSA": ("long-{task}", "pissa"),
    "SRLoRA spectrum": ("long-{task}", "srlora"),
    "SRLoRA gradient": ("long-{task}-gradient", "srlora"),
    "SRLoRA spectrum, reset all scores": ("long-{task}-scores-all", "srlora"),
}


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
        runs = runs_of(root, ROWS, task)
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
        md += slot_figures(root, task, runs, "SRLoRA spectrum", "SRLoRA gradient")
    return md if any_runs else []


def section_decision(root: Path) -> list[str]:
    """The decision rule: "gradient" becomes the default only if it beats "spectrum" beyond
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
        'Rule: `direction_policy="gradient"` becomes the default only if it beats `"spectrum"` '
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


def _paper(ctx: RenderContext) -> list[str]:
    return ctx.kept(PAPER_TITLE, section_paper(ctx.root), cut=COMMANDS_TITLE)


def _decision(ctx: RenderContext) -> list[str]:
    """The decision, then every 600-step run's command (listed afresh, from every run known)."""
    md = ctx.kept(DECISION_TITLE, section_decision(ctx.root), cut=COMMANDS_TITLE)
    ctx.train_runs += [j for j in long_study_all_jobs(ctx.seeds) if is_finished(j, ctx.root)]
    return md + section_long_commands(ctx.root, ctx.seeds)


# The doc's places this study writes (srlora.experiments.studies.DOC_ORDER puts them in order;
# the rank-bound regime's sections sit between them).
SECTIONS: dict[str, Section] = {"paper": _paper, "decision": _decision}


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """This study's run-table rows: (section, task) -> {row label: (cell, method)}."""
    return {
        (PAPER_TITLE.removeprefix("## "), task): {
            label: (cell.format(task=task), method) for label, (cell, method) in ROWS.items()
        }
        for task in ("mr", "mr-reg")
    }


PARTS = {"long": lambda root, seeds, ns: run_jobs(long_jobs(seeds), ns.jobs, root)}
