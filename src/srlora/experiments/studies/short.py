"""The 150-step comparison: LoRA, PiSSA and SRLoRA (and SRLoRA adaptive) on four tasks, the
ablations of SRLoRA's choices on mr, and the switch dynamics of every SRLoRA run.

    srlora study --part main        # the 4-task x 4-variant table (3 seeds)
    srlora study --part ablations   # the mr ablations

Every run is one ``srlora train`` command (:class:`~srlora.experiments.jobs.Job`, the quick
preset). The sections it writes: setup, main table (one per task, with its plots), wins /
ties / losses, ablations, switch dynamics, wall time and commands, and the paper-scale
configuration that was not run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ...schedule import SwitchSchedule
from ..config import PRESETS, RunConfig
from ..jobs import Job, is_finished, run_jobs
from ..paper import GLUE_SCORES, VIT_SCORES
from ..rundata import RenderContext, Section, dynamics_row, load_runs
from ..runs import train_losses
from ..stats import fmt, mean_std, verdict

TASKS: dict[str, list[str]] = {
    "mr": [],
    "mr-reg": [],
    "imdb": [],
    "fashion-mnist": ["--lr", "1e-3", "--max-train", "20000", "--image-size", "56"],
}


# Closest task of the paper (its tables: GLUE dev with DeBERTa-v3-base, ViT for MNIST).
PAPER: dict[str, tuple[str, dict[str, str]]] = {
    "mr": ("SST-2 acc", GLUE_SCORES["sst2"]),
    "mr-reg": ("STS-B Pearson/Spearman", GLUE_SCORES["stsb"]),
    "imdb": ("SST-2 acc", GLUE_SCORES["sst2"]),
    "fashion-mnist": ("MNIST acc (ViT)", {"pissa": "-", **VIT_SCORES["mnist"]}),
}


ABLATIONS: dict[str, tuple[str, list[str]]] = {
    # cell: (what changes against the default SRLoRA run on mr, extra options)
    "mr-reset-zero": ("optimizer_reset=zero (Adam moments zeroed, not seeded)", ["--optimizer-reset", "zero"]),
    "mr-reset-none": ("optimizer_reset=none (Adam moments kept: reset off)", ["--optimizer-reset", "none"]),
    "mr-gamma0.25": ("gamma=0.25 (r'=2 pairs per switch, every 12 steps)", ["--gamma", "0.25"]),
    "mr-gamma1.0": ("gamma=1.0 (all 8 pairs per switch, every 50 steps)", ["--gamma", "1.0"]),
    "mr-rtarget64": ("r_target=64 (r'=4, every 10 steps)", ["--r-target", "64"]),
    "mr-scores-all": ("reset_scores=all (every pair's scores reset at a switch)", ["--reset-scores", "all"]),
}


VARIANTS = [("lora", "LoRA"), ("pissa", "PiSSA"), ("srlora", "SRLoRA")]


ABLATIONS_TITLE = "## Ablations on mr (SRLoRA, against its default)"


def main_jobs(seeds: list[int]) -> list[Job]:
    jobs = []
    for seed in seeds:
        for task, extra in TASKS.items():
            jobs += [Job(task, task, m, seed, extra) for m in ("lora", "pissa", "srlora")]
            jobs.append(Job(f"{task}-adaptive", task, "srlora", seed, [*extra, "--adaptive-switch"]))
    return jobs


def ablation_jobs(seeds: list[int]) -> list[Job]:
    return [Job(cell, "mr", "srlora", seed, extra) for seed in seeds for cell, (_, extra) in ABLATIONS.items()]


def main_variants(task: str) -> dict[str, tuple[str, str]]:
    """A main-table row label -> the (cell, method) of its runs."""
    return {**{label: (task, method) for method, label in VARIANTS}, "SRLoRA adaptive": (f"{task}-adaptive", "srlora")}


def ablation_variants() -> dict[str, tuple[str, str]]:
    """An ablation-table row label -> the (cell, method) of its runs."""
    rows = {
        "LoRA (reference)": ("mr", "lora"),
        "SRLoRA default (seed reset, gamma 0.5, r_target 32, recycled)": ("mr", "srlora"),
    }
    return rows | {desc: (cell, "srlora") for cell, (desc, _) in ABLATIONS.items()}


def variant_runs(root: Path, task: str) -> dict[str, list[dict[str, Any]]]:
    return {label: load_runs(root, cell, method) for label, (cell, method) in main_variants(task).items()}


def rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root / "docs"))


def section_setup(seeds: list[int]) -> list[str]:
    q = RunConfig.from_flat(PRESETS["quick"])
    srl = q.srlora_config()
    budget = srl.budget(q.r)
    schedule = SwitchSchedule.build(budget, q.max_steps, None)
    at = schedule.steps()
    dropped = (
        f" (the schedule drops switch {', '.join(str(k) for k in range(len(at) + 1, schedule.num_switches + 1))}, "
        "which would fall on or after the last step)"
        if len(at) < schedule.num_switches
        else ""
    )
    return [
        "## Setup",
        "",
        f"The quick preset: {q.max_steps} AdamW steps, batch {q.batch_size}, peak lr {q.lr:g} with "
        f"{q.warmup_steps} warm-up steps and linear",
        f"decay, LoRA r={q.r}, alpha={q.alpha:g} on every Linear of the encoder (attention and MLP), the task head",
        f"trained in full; SRLoRA r_target={srl.r_target}, gamma={srl.gamma}: r'={budget.r_prime} pairs per switch, "
        f"N_switch={schedule.num_switches}, t_interval={schedule.interval},",
        f"so switches at steps {', '.join(map(str, at))}{dropped},",
        f"optimizer_reset={srl.optimizer_reset}. The adaptive variant switches a layer once its {budget.r_prime} "
        "lowest-scoring pairs",
        f"have stayed the same for {srl.adaptive_patience} steps (bounded by the EMA warm-up and 2 t_interval; "
        "METHOD.md",
        "section 5), within the same budget. The three methods share the model, head initialisation, data",
        "order and trainable parameters; only the adapter's initialisation and SRLoRA's switches differ.",
        "Text: all-MiniLM-L6-v2 (`srlora fetch minilm`, 6 layers, hidden 384), 64 tokens. Images: DINOv2-S at",
        f"56 px (16 patches), lr 1e-3, a fixed 20k-image training subset. Dev: a fixed {q.max_eval}-example",
        "subset, evaluated once after the last step. `early loss` is the mean training loss over the",
        "first 25% of steps (the paper's headline claim is a faster early fall of the training loss).",
        "Mean ± standard deviation over seeds " + ", ".join(map(str, seeds)) + ".",
        "",
        "Verdicts compare SRLoRA's mean with the other method's: a **win** or **loss** when the",
        "difference is more than twice its standard error (sqrt(s1²/n1 + s2²/n2)), else a **tie**;",
        "the signed difference is positive where SRLoRA is better (higher metric, lower loss).",
        "With 3 seeds this is a coarse test, and with some twenty comparisons about one win or loss",
        "is expected from noise alone.",
        "",
    ]


def section_task(root: Path, task: str, verdict_lines: list[str]) -> list[str]:
    """One task's table, its loss plots and SRLoRA's active intervals; appends the task's
    verdicts to ``verdict_lines``."""
    from .. import plots

    fig_dir = root / "docs/results"
    runs = variant_runs(root, task)
    any_run = next((r for rs in runs.values() for r in rs), None)
    if any_run is None:
        return [f"### {task}", "", "(not run yet)", ""]
    headline = any_run["headline_metric"]
    metrics = [k for k in any_run["final"] if k not in ("step", "eval_loss")]
    paper_name, paper = PAPER[task]
    head = ["method", "seeds", *metrics, "early loss ↓", "final dev loss ↓", "trainable", "wall s / run"]
    head.append(f"paper ({paper_name})")
    md = [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stats: dict[str, dict[str, tuple[float, float, int]]] = {}
    for label, rs in runs.items():
        if not rs:
            continue
        st = {k: mean_std([r["final"][k] for r in rs]) for k in metrics}
        st["early"] = mean_std([r["early_train_loss"] for r in rs])
        st["eval_loss"] = mean_std([r["final"]["eval_loss"] for r in rs])
        stats[label] = st
        method = {"LoRA": "lora", "PiSSA": "pissa"}.get(label, "srlora")
        cells = [label, str(len(rs)), *[fmt(st[k]) for k in metrics], fmt(st["early"]), fmt(st["eval_loss"])]
        cells += [f"{rs[0]['trainable_params']:,}", f"{statistics.fmean(r['wall_s'] for r in rs):.0f}"]
        cells.append(paper.get(method, "") if label != "SRLoRA adaptive" else "")
        md.append("| " + " | ".join(cells) + " |")
    md.append("")
    for me in ("SRLoRA", "SRLoRA adaptive"):
        for other in ("LoRA", "PiSSA", "SRLoRA"):
            if other == me or me not in stats or other not in stats:
                continue
            verdict_lines.append(
                f"| {task} | {me} vs {other} | {verdict(stats[me][headline], stats[other][headline], True)} | "
                f"{verdict(stats[me]['early'], stats[other]['early'], False)} |"
            )
    curves = {label: [train_losses(r["_dir"]) for r in rs] for label, rs in runs.items() if rs}
    loss_png = plots.plot_loss_curves(curves, fig_dir / f"{task}_loss.png", f"{task}: training loss")
    early = {k: [c[: max(1, len(c) // 4)] for c in v] for k, v in curves.items()}
    early_png = plots.plot_loss_curves(early, fig_dir / f"{task}_loss_early.png", f"{task}: first 25% of steps")
    md += [f"![{task} loss]({rel(loss_png, root)})", f"![{task} early loss]({rel(early_png, root)})", ""]
    srl = runs.get("SRLoRA") or []
    if srl and (srl[0]["_dir"] / "history.json").is_file():
        history = json.loads((srl[0]["_dir"] / "history.json").read_text())
        layers = plots.layers_of(history)
        layer = layers[len(layers) // 2]
        act = plots.plot_active_intervals(history, layer, fig_dir / f"{task}_active_intervals.png")
        var = plots.plot_interval_variance(history, fig_dir / f"{task}_interval_variance.png")
        md += [
            f"Active intervals of SRLoRA's directions in `{layer}` (seed {srl[0]['seed']}), and the variance",
            "of the interval lengths per layer (the paper's Figures 5 and 4):",
            "",
            f"![{task} active intervals]({rel(act, root)})",
            f"![{task} interval variance]({rel(var, root)})",
            "",
        ]
    return md


def section_verdicts(verdict_lines: list[str]) -> list[str]:
    return [
        "### Wins, ties and losses",
        "",
        "| task | comparison | final dev headline metric | early loss (lower is better) |",
        "|---|---|---|---|",
        *verdict_lines,
        "",
    ]


def section_ablations(root: Path) -> list[str]:
    from .. import plots

    md = [ABLATIONS_TITLE, ""]
    base = load_runs(root, "mr", "srlora")
    head = ["variant", "seeds", "accuracy", "early loss ↓", "final dev loss ↓"]
    head += ["accuracy vs default", "early vs default"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [
        (desc, base if (cell, method) == ("mr", "srlora") else load_runs(root, cell, method))
        for desc, (cell, method) in ablation_variants().items()
    ]
    b_acc = mean_std([r["final"]["accuracy"] for r in base])
    b_early = mean_std([r["early_train_loss"] for r in base])
    for desc, rs in rows:
        acc = mean_std([r["final"]["accuracy"] for r in rs])
        early = mean_std([r["early_train_loss"] for r in rs])
        ev = mean_std([r["final"]["eval_loss"] for r in rs])
        vs = ["", ""] if rs is base else [verdict(acc, b_acc, True), verdict(early, b_early, False)]
        md.append("| " + " | ".join([desc, str(len(rs)), fmt(acc), fmt(early), fmt(ev), *vs]) + " |")
    md.append("")
    ab_curves = {"default": [train_losses(r["_dir"]) for r in base]} if base else {}
    for cell in ABLATIONS:
        rs = load_runs(root, cell, "srlora")
        if rs:
            ab_curves[cell.removeprefix("mr-")] = [train_losses(r["_dir"]) for r in rs]
    if ab_curves:
        png = plots.plot_loss_curves(ab_curves, root / "docs/results/mr_ablations_loss.png", "mr: SRLoRA ablations")
        md += [f"![mr ablations]({rel(png, root)})", ""]
    return md


def section_dynamics(root: Path) -> list[str]:
    md = [
        "## Switch dynamics (SRLoRA runs)",
        "",
        "Means over layers and seeds, from each run's `history.json`: switches per layer, singular",
        "directions used per layer, how many of the 8 initial top directions are still trainable at",
        "the end, and the share of evictions (a layer's second switch on) that hit a direction the",
        "layer's previous switch had just brought in.",
        "",
        "| run | seeds | switches / layer | directions used | initial kept | re-evicted |",
        "|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        for label, cell in (("default", task), ("adaptive", f"{task}-adaptive")):
            row = dynamics_row(f"{task} {label}", load_runs(root, cell, "srlora"))
            md += [row] if row else []
    for cell in ABLATIONS:
        row = dynamics_row(cell, load_runs(root, cell, "srlora"))
        md += [row] if row else []
    return [*md, ""]


def span_minutes(root: Path, jobs: list[Job]) -> str:
    """Wall-clock from the first run's start (its config.json) to the last one's end."""
    if not jobs:
        return "n/a"
    start = min((root / j.out / "config.json").stat().st_mtime for j in jobs)
    end = max((root / j.out / "results.json").stat().st_mtime for j in jobs)
    return f"{(end - start) / 60:.0f} min"


def section_commands(root: Path, seeds: list[int], done: list[Job]) -> list[str]:
    mains, ablations = main_jobs(seeds), ablation_jobs(seeds)
    done_main = [j for j in done if j in mains]
    missing = [j for j in mains + ablations if j not in done]
    total = sum(json.loads((root / j.out / "results.json").read_text())["wall_s"] for j in done)
    perf_files = (root / "runs/study/perf").glob("*.json")
    perf_s = sum(json.loads(path.read_text()).get("benchmark_wall_s", 0.0) for path in perf_files)
    md = [
        "## Wall time and commands",
        "",
        f"Performance benchmarks: {perf_s / 60:.0f} min, one after another on an otherwise idle machine.",
        f"Training: {len(done)} runs, {total / 60:.0f} min of run time in all (each run's own training and",
        "evaluation, one thread); two at a time, the main table took "
        f"{span_minutes(root, done_main)} and the ablations "
        f"{span_minutes(root, [j for j in done if j in ablations])} of wall-clock time (first start",
        "to last finish).",
        "",
        "Every run, as a command (from the repository root, with `.venv/bin` on `PATH`):",
        "",
        "```",
        *[j.command() for j in done],
        "```",
        "",
    ]
    if missing:
        md += ["Not run (yet): `srlora study` runs these next.", "", "```", *[j.command() for j in missing]]
        md += ["```", ""]
    return md


def section_paper_scale(root: Path, done_main: list[Job]) -> list[str]:
    return [
        "## Paper-scale configuration (not run here)",
        "",
        "The same study with the paper's early-convergence window (2,000 steps) and its larger",
        "exploration budget (r_target=256), evaluated every 250 steps:",
        "",
        "```",
        *[
            f"srlora compare --task {t} --preset quick --max-steps 2000 --warmup-steps 100 --r-target 256 "
            f"--eval-every 250 --seeds 1,2,3 --out runs/long-{t}{' ' + ' '.join(x) if x else ''}"
            for t, x in TASKS.items()
        ],
        "```",
        "",
        long_estimate(root, done_main),
        "",
        "The paper trains DeBERTa-v3-base on GLUE for 10-50 epochs (docs/METHOD.md section 4). That is days of",
        "this 2-core machine per task, and neither the model nor GLUE can be fetched here. Where both",
        "are at hand (GLUE in the official TSV layout: `GLUE/SST-2/train.tsv`, ...; a GPU):",
        "",
        "```",
        *[
            f"srlora compare --task {t} --data-dir GLUE --preset paper-{t} --seeds 1,2,3 --out runs/paper-{t}"
            for t in ("sst2", "mrpc", "cola", "qnli", "rte", "stsb")
        ],
        "```",
        "",
    ]


def long_estimate(root: Path, done_main: list[Job]) -> str:
    """Wall time of the 2,000-step study, extrapolated from the measured main-table runs."""
    results = [json.loads((root / j.out / "results.json").read_text()) for j in done_main]
    if not results:
        return ""
    per_step = statistics.fmean(r["wall_s"] / r["steps"] for r in results)
    runs = len(TASKS) * 3 * 3
    return (
        f"At the {per_step:.2f} s per step measured here (one thread, evaluation included), those "
        f"{runs} runs would take about {runs * 2000 * per_step / 3600 / 2:.0f} h with two at a time: "
        "too long for this study, so they were not run."
    )


def render(root: Path, seeds: list[int], keep: Any) -> tuple[list[str], list[Job]]:
    """This study's sections, and its finished runs. ``keep(fresh, has_runs)``: the fresh
    section, or the current doc's text of it where its runs are not on this machine."""
    mains, ablations = main_jobs(seeds), ablation_jobs(seeds)
    done = [j for j in mains + ablations if is_finished(j, root)]
    done_main = [j for j in done if j in mains]
    have_main, have_ablations = bool(done_main), any(j in ablations for j in done)
    md = keep(section_setup(seeds), have_main)
    if have_main:
        verdict_lines: list[str] = []
        main_md = ["## Main table", ""]
        for task in TASKS:
            main_md += section_task(root, task, verdict_lines)
        md += main_md + section_verdicts(verdict_lines)
    else:
        md += keep(["## Main table"], False)
    md += keep(section_ablations(root), have_ablations)
    md += keep(section_dynamics(root), have_main or have_ablations)
    return md, done


def render_commands(root: Path, seeds: list[int], done: list[Job], keep: Any) -> list[str]:
    """The wall time and commands section, and the paper-scale configuration's (after the cost
    section in the doc); ``keep`` as in :func:`render`."""
    done_main = [j for j in done if j in main_jobs(seeds)]
    commands = keep(section_commands(root, seeds, done), bool(done))
    return commands + keep(section_paper_scale(root, done_main), bool(done_main))


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """This study's run-table rows: (section, subsection) -> {row label: (cell, method)}."""
    out: dict[tuple[str, str | None], dict[str, tuple[str, str]]] = {("Main table", t): main_variants(t) for t in TASKS}
    out[ABLATIONS_TITLE.removeprefix("## "), None] = ablation_variants()
    return out


def _results(ctx: RenderContext) -> list[str]:
    md, done = render(ctx.root, ctx.seeds, ctx.keep)
    ctx.train_runs += done
    return md


def _commands(ctx: RenderContext) -> list[str]:
    done = [j for j in main_jobs(ctx.seeds) + ablation_jobs(ctx.seeds) if is_finished(j, ctx.root)]
    return render_commands(ctx.root, ctx.seeds, done, ctx.keep)


# The doc's places this study writes (srlora.experiments.studies.DOC_ORDER puts them in order).
SECTIONS: dict[str, Section] = {"results": _results, "commands": _commands}


def _run(jobs: Any) -> Any:
    def part(root: Path, seeds: list[int], ns: Any) -> None:
        run_jobs(jobs(seeds), ns.jobs, root)

    return part


PARTS = {"main": _run(main_jobs), "ablations": _run(ablation_jobs)}
