"""The results study: runs what is missing, then writes docs/RESULTS.md.

    .venv/bin/python scripts/study.py                  # everything (resumable; 1 h 47 min on 2 cores)
    .venv/bin/python scripts/study.py --part perf      # only the performance benchmarks
    .venv/bin/python scripts/study.py --part main      # only the 4-task x 4-variant table
    .venv/bin/python scripts/study.py --part ablations # only the MR ablations
    .venv/bin/python scripts/study.py --part render    # only rewrite docs/RESULTS.md from runs/study

Every training run is one ``srlora train`` command (printed, and written into the doc),
into ``runs/study/<cell>/<method>/seed<s>/``, the folder layout of ``srlora compare``.
A run that finished with the same configuration is kept, so the study can be stopped
(Ctrl-C) and started again; ``srlora compare --resume --out runs/study/<cell> ...``
summarises any cell on its own. Training runs go ``--jobs`` at a time with one thread
each (on 2 cores, two single-thread runs do ~1.5x the steps of one two-thread run).
The performance benchmarks run first, alone, so that no training run disturbs them.

The text between the ``notes`` markers of an existing docs/RESULTS.md is kept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srlora.cli import PAPER_GLUE, _mean_std, _run_values, build_parser, finished_run
from srlora.experiment import PRESETS, RunConfig, atomic_write_text, train_losses
from srlora.schedule import SwitchSchedule

ROOT = Path(__file__).resolve().parents[1]
SRLORA = [sys.executable, "-m", "srlora.cli"]
NOTES_BEGIN, NOTES_END = "<!-- notes: kept when this file is regenerated -->", "<!-- end of notes -->"

# The quick preset (150 steps, r=8, r_target=32, gamma=0.5, batch 16, 1000 dev examples),
# evaluated once, at the last step. Fashion-MNIST: DINOv2-S at 56 px, a larger learning
# rate for its fresh 10-class head, and a fixed 20k-image training subset.
COMMON = ["--preset", "quick", "--eval-every", "1000"]
TASKS: dict[str, list[str]] = {
    "mr": [],
    "mr-reg": [],
    "imdb": [],
    "fashion-mnist": ["--lr", "1e-3", "--max-train", "20000", "--image-size", "56"],
}
# Closest task of the paper (SPEC section 5; GLUE dev with DeBERTa-v3-base, ViT for MNIST).
PAPER = {
    "mr": ("SST-2 acc", PAPER_GLUE["sst2"]),
    "mr-reg": ("STS-B Pearson/Spearman", PAPER_GLUE["stsb"]),
    "imdb": ("SST-2 acc", PAPER_GLUE["sst2"]),
    "fashion-mnist": ("MNIST acc (ViT)", {"lora": "98.89", "pissa": "-", "srlora": "94.83"}),
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
PERF = [
    # (name, options of benchmarks/step_overhead.py)
    ("minilm-rt64", ["--r-target", "64", "--steps", "20"]),
    ("minilm-rt16", ["--r-target", "16", "--steps", "6"]),
    ("minilm-rt128", ["--r-target", "128", "--steps", "6"]),
    ("minilm-rt256", ["--r-target", "256", "--steps", "6"]),
    ("base-rt64", ["--base-size", "--r-target", "64", "--steps", "5"]),
    ("base-rt256", ["--base-size", "--r-target", "256", "--steps", "2"]),
]


@dataclass
class Job:
    cell: str
    task: str
    method: str
    seed: int
    extra: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path("runs/study") / self.cell / self.method / f"seed{self.seed}"

    def argv(self) -> list[str]:
        return [
            "train",
            "--task",
            self.task,
            "--method",
            self.method,
            "--seed",
            str(self.seed),
            *COMMON,
            *self.extra,
            "--out",
            str(self.out),
        ]

    def config(self) -> RunConfig:
        """The run's configuration, as ``srlora train`` builds it from :meth:`argv`."""
        return RunConfig(method=self.method, **_run_values(build_parser().parse_args(self.argv()), None))

    def command(self) -> str:
        return "srlora " + shlex.join(self.argv())


def main_jobs(seeds: list[int]) -> list[Job]:
    jobs = []
    for seed in seeds:
        for task, extra in TASKS.items():
            jobs += [Job(task, task, m, seed, extra) for m in ("lora", "pissa", "srlora")]
            jobs.append(Job(f"{task}-adaptive", task, "srlora", seed, [*extra, "--adaptive-switch"]))
    return jobs


def ablation_jobs(seeds: list[int]) -> list[Job]:
    return [Job(cell, "mr", "srlora", seed, extra) for seed in seeds for cell, (_, extra) in ABLATIONS.items()]


def is_finished(job: Job) -> bool:
    """Finished earlier with the same configuration (the rule of ``srlora compare --resume``)."""
    return finished_run(ROOT / job.out, job.config()) is not None


def run_jobs(jobs: list[Job], n_jobs: int) -> None:
    from tqdm.auto import tqdm

    todo = [j for j in jobs if not is_finished(j)]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs finished earlier; running {len(todo)}", file=sys.stderr)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(job: Job) -> tuple[Job, int]:
        (ROOT / job.out).mkdir(parents=True, exist_ok=True)
        with open(ROOT / job.out / "train.log", "w") as log:
            rc = subprocess.call([*SRLORA, *job.argv()], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return job, rc

    failed = []
    with ThreadPoolExecutor(n_jobs) as pool, tqdm(total=len(todo), desc="study runs", unit="run") as bar:
        futures = [pool.submit(one, j) for j in todo]
        for fut in as_completed(futures):
            job, rc = fut.result()
            if rc != 0:
                failed.append(job)
                tqdm.write(f"FAILED (rc {rc}): {job.command()}  -> {job.out / 'train.log'}")
            bar.update(1)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed; see their train.log. Run the study again to retry them.")


def run_perf() -> None:
    out = ROOT / "runs/study/perf"
    out.mkdir(parents=True, exist_ok=True)
    for name, opts in PERF:
        path = out / f"{name}.json"
        if path.is_file():
            print(f"perf {name}: measured earlier, kept ({path})", file=sys.stderr)
            continue
        cmd = [sys.executable, "benchmarks/step_overhead.py", *opts, "--json", str(path)]
        print("$ python " + shlex.join(cmd[1:]), file=sys.stderr)
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        data = json.loads(path.read_text())
        data["command"] = "python " + shlex.join(cmd[1:-2])
        data["benchmark_wall_s"] = time.perf_counter() - started
        atomic_write_text(path, json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


def load_runs(cell: str, method: str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((ROOT / "runs/study" / cell / method).glob("seed*/results.json")):
        r = json.loads(path.read_text())
        if not r.get("interrupted") and r["final"] is not None:
            r["_dir"] = path.parent
            rows.append(r)
    return rows


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """``srlora compare``'s mean and standard deviation, and the number of seeds."""
    return (*_mean_std(values), len(values))


def fmt(ms: tuple[float, float, int], digits: int = 3) -> str:
    m, s, n = ms
    return "n/a" if n == 0 else f"{m:.{digits}f} ± {s:.{digits}f}"


def verdict(a: tuple[float, float, int], b: tuple[float, float, int], higher_is_better: bool) -> str:
    """``win``/``loss`` when the means differ by more than twice the standard error of
    the difference (sqrt(s_a^2/n_a + s_b^2/n_b)), else ``tie``."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < 2 or nb < 2:
        return "n/a (fewer than 2 seeds)"
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    d = ma - mb if higher_is_better else mb - ma
    word = "tie" if abs(d) <= 2 * se else ("win" if d > 0 else "loss")
    return f"{word} ({'+' if d >= 0 else ''}{d:.3f}, 2·se {2 * se:.3f})"


VARIANTS = [("lora", "LoRA"), ("pissa", "PiSSA"), ("srlora", "SRLoRA")]


def variant_runs(task: str) -> dict[str, list[dict[str, Any]]]:
    out = {label: load_runs(task, method) for method, label in VARIANTS}
    out["SRLoRA adaptive"] = load_runs(f"{task}-adaptive", "srlora")
    return out


def switch_dynamics(history: dict[str, Any]) -> dict[str, float]:
    """Per-layer means from ``history.json``: switches, directions used, how many of the
    initial top-r directions are still trainable at the end, and the share of evictions
    (from a layer's second switch on) that hit a direction the previous switch brought in."""
    r = int(history["r"])
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for ev in history["events"]:
        by_layer.setdefault(ev["layer"], []).append(ev)
    layers = list(history["slot_directions"])
    evicted = re_evicted = 0
    for events in by_layer.values():
        for prev, ev in itertools.pairwise(events):
            evicted += len(ev["evicted"])
            re_evicted += len(set(ev["evicted"]) & set(prev["directions"]))
    return {
        "switches": statistics.fmean(len(by_layer.get(name, [])) for name in layers),
        "used": statistics.fmean(history["directions_used"][name] for name in layers),
        "init_kept": statistics.fmean(sum(j < r for j in history["slot_directions"][name]) for name in layers),
        "re_evicted": re_evicted / evicted if evicted else math.nan,
    }


def dynamics_row(label: str, runs: list[dict[str, Any]]) -> str | None:
    paths = [r["_dir"] / "history.json" for r in runs]
    hist = [json.loads(path.read_text()) for path in paths if path.is_file()]
    if not hist:
        return None
    dyn = [switch_dynamics(h) for h in hist]
    cells = [label, str(len(hist))]
    cells += [f"{statistics.fmean(d[k] for d in dyn):.{digits}f}" for k, digits in (("switches", 1), ("used", 1))]
    cells += [f"{statistics.fmean(d['init_kept'] for d in dyn):.1f} of {hist[0]['r']}"]
    cells += [f"{statistics.fmean(d['re_evicted'] for d in dyn):.0%}"]
    return "| " + " | ".join(cells) + " |"


def render(seeds: list[int]) -> Path:
    from srlora import plots

    fig_dir = ROOT / "docs/results"
    fig_dir.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    import torch

    machine += f", torch {torch.__version__}"
    md: list[str] = [
        "# Results: LoRA vs PiSSA vs SRLoRA, measured here",
        "",
        "Regenerated by `.venv/bin/python scripts/study.py` (runs what is missing, then writes this",
        "file and `docs/results/*.png`; `--part render` only rewrites them). Every number below",
        "comes from a run of that script; the commands of every run are listed at the end.",
        "",
        f"Machine: {machine}, no GPU. Training runs went two at a time, one thread each.",
        "",
    ]
    old = ROOT / "docs/RESULTS.md"
    notes = ""
    if old.is_file() and NOTES_BEGIN in old.read_text():
        text = old.read_text()
        notes = text[text.index(NOTES_BEGIN) + len(NOTES_BEGIN) : text.index(NOTES_END)].strip("\n")
    md += ["## Summary (written by hand)", "", NOTES_BEGIN, notes, NOTES_END, ""]

    q = RunConfig(**PRESETS["quick"])
    r_prime = q.srlora_config().recycled_per_switch(q.r)
    schedule = SwitchSchedule.build(q.r, r_prime, q.r_target, q.max_steps, None)
    at = schedule.steps()
    dropped = (
        f" (SPEC drops switch {', '.join(str(k) for k in range(len(at) + 1, schedule.num_switches + 1))}, "
        "which would fall on or after the last step)"
        if len(at) < schedule.num_switches
        else ""
    )
    md += [
        "## Setup",
        "",
        f"The quick preset: {q.max_steps} AdamW steps, batch {q.batch_size}, peak lr {q.lr:g} with "
        f"{q.warmup_steps} warm-up steps and linear",
        f"decay, LoRA r={q.r}, alpha={q.alpha:g} on every Linear of the encoder (attention and MLP), the task head",
        f"trained in full; SRLoRA r_target={q.r_target}, gamma={q.gamma}: r'={r_prime} pairs per switch, "
        f"N_switch={schedule.num_switches}, t_interval={schedule.interval},",
        f"so switches at steps {', '.join(map(str, at))}{dropped},",
        f"optimizer_reset={q.optimizer_reset}. The adaptive variant switches a layer once its {r_prime} "
        "lowest-scoring pairs",
        f"have stayed the same for {q.adaptive_patience} steps (bounded by the EMA warm-up and 2 t_interval; METHOD.md",
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
        "## Main table",
        "",
    ]
    verdict_lines: list[str] = []
    for task in TASKS:
        runs = variant_runs(task)
        any_run = next((r for rs in runs.values() for r in rs), None)
        if any_run is None:
            md += [f"### {task}", "", "(not run yet)", ""]
            continue
        headline = any_run["headline_metric"]
        metrics = [k for k in any_run["final"] if k not in ("step", "eval_loss")]
        paper_name, paper = PAPER[task]
        md += [f"### {task}", ""]
        head = ["method", "seeds", *metrics, "early loss ↓", "final dev loss ↓", "trainable", "wall s / run"]
        head.append(f"paper ({paper_name})")
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
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
        higher = headline not in ("mse",)
        for me in ("SRLoRA", "SRLoRA adaptive"):
            if me not in stats:
                continue
            for other in ("LoRA", "PiSSA", "SRLoRA"):
                if other == me or other not in stats:
                    continue
                verdict_lines.append(
                    f"| {task} | {me} vs {other} | "
                    f"{verdict(stats[me][headline], stats[other][headline], higher)} | "
                    f"{verdict(stats[me]['early'], stats[other]['early'], False)} |"
                )
        curves = {label: [train_losses(r["_dir"]) for r in rs] for label, rs in runs.items() if rs}
        loss_png = plots.plot_loss_curves(curves, fig_dir / f"{task}_loss.png", f"{task}: training loss")
        early = {k: [c[: max(1, len(c) // 4)] for c in v] for k, v in curves.items()}
        early_png = plots.plot_loss_curves(early, fig_dir / f"{task}_loss_early.png", f"{task}: first 25% of steps")
        md += [f"![{task} loss]({loss_png.relative_to(ROOT / 'docs')})"]
        md += [f"![{task} early loss]({early_png.relative_to(ROOT / 'docs')})", ""]
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
                f"![{task} active intervals]({act.relative_to(ROOT / 'docs')})",
                f"![{task} interval variance]({var.relative_to(ROOT / 'docs')})",
                "",
            ]
    md += [
        "### Wins, ties and losses",
        "",
        "| task | comparison | final dev headline metric | early loss (lower is better) |",
        "|---|---|---|---|",
        *verdict_lines,
        "",
    ]

    md += ["## Ablations on mr (SRLoRA, against its default)", ""]
    base = load_runs("mr", "srlora")
    lora = load_runs("mr", "lora")
    head = ["variant", "seeds", "accuracy", "early loss ↓", "final dev loss ↓"]
    head += ["accuracy vs default", "early vs default"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("LoRA (reference)", lora), ("SRLoRA default (seed reset, gamma 0.5, r_target 32, recycled)", base)]
    rows += [(desc, load_runs(cell, "srlora")) for cell, (desc, _) in ABLATIONS.items()]
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
        rs = load_runs(cell, "srlora")
        if rs:
            ab_curves[cell.removeprefix("mr-")] = [train_losses(r["_dir"]) for r in rs]
    if ab_curves:
        png = plots.plot_loss_curves(ab_curves, fig_dir / "mr_ablations_loss.png", "mr: SRLoRA ablations")
        md += [f"![mr ablations]({png.relative_to(ROOT / 'docs')})", ""]

    md += [
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
            row = dynamics_row(f"{task} {label}", load_runs(cell, "srlora"))
            md += [row] if row else []
    for cell in ABLATIONS:
        row = dynamics_row(cell, load_runs(cell, "srlora"))
        md += [row] if row else []
    md.append("")

    md += render_perf()

    md += ["## Wall time and commands", ""]
    mains, ablations = main_jobs(seeds), ablation_jobs(seeds)
    done = [j for j in mains + ablations if is_finished(j)]
    done_main = [j for j in done if j in mains]
    missing = [j for j in mains + ablations if j not in done]
    total = sum(json.loads((ROOT / j.out / "results.json").read_text())["wall_s"] for j in done)
    perf_files = (ROOT / "runs/study/perf").glob("*.json")
    perf_s = sum(json.loads(path.read_text()).get("benchmark_wall_s", 0.0) for path in perf_files)
    md += [
        f"Performance benchmarks: {perf_s / 60:.0f} min, one after another on an otherwise idle machine.",
        f"Training: {len(done)} runs, {total / 60:.0f} min of run time in all (each run's own training and",
        "evaluation, one thread); two at a time, the main table took "
        f"{span_minutes(done_main)} and the ablations "
        f"{span_minutes([j for j in done if j in ablations])} of wall-clock time (first start",
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
        md += ["Not run (yet): `scripts/study.py` runs these next.", "", "```", *[j.command() for j in missing]]
        md += ["```", ""]
    md += [
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
        long_estimate(done_main),
        "",
        "The paper trains DeBERTa-v3-base on GLUE for 10-50 epochs (SPEC section 4). That is days of",
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
    # Every run's figures, compact, beside the doc (runs/ itself is not committed).
    keep = ("task", "method", "seed", "steps", "final", "early_train_loss", "final_train_loss", "wall_s")
    per_run = []
    for job in done:
        r = json.loads((ROOT / job.out / "results.json").read_text())
        per_run.append({"cell": job.cell, "command": job.command(), **{k: r.get(k) for k in keep}})
    atomic_write_text(fig_dir / "runs.json", json.dumps(per_run, indent=1))
    path = ROOT / "docs/RESULTS.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def span_minutes(jobs: list[Job]) -> str:
    """Wall-clock from the first run's start (its config.json) to the last one's end."""
    if not jobs:
        return "n/a"
    start = min((ROOT / j.out / "config.json").stat().st_mtime for j in jobs)
    end = max((ROOT / j.out / "results.json").stat().st_mtime for j in jobs)
    return f"{(end - start) / 60:.0f} min"


def long_estimate(done_main: list[Job]) -> str:
    """Wall time of the 2,000-step study, extrapolated from the measured main-table runs."""
    results = [json.loads((ROOT / j.out / "results.json").read_text()) for j in done_main]
    if not results:
        return ""
    per_step = statistics.fmean(r["wall_s"] / r["steps"] for r in results)
    runs = len(TASKS) * 3 * 3
    return (
        f"At the {per_step:.2f} s per step measured here (one thread, evaluation included), those "
        f"{runs} runs would take about {runs * 2000 * per_step / 3600 / 2:.0f} h with two at a time: "
        "too long for this study, so they were not run."
    )


def render_perf() -> list[str]:
    perf_dir = ROOT / "runs/study/perf"
    steps = {name: opts[opts.index("--steps") + 1] for name, opts in PERF}
    files = [perf_dir / f"{name}.json" for name, _ in PERF]
    rows = {path.stem: json.loads(path.read_text()) for path in files if path.is_file()}
    if not rows:
        return ["## Performance", "", "(not run yet)", ""]
    any_row = next(iter(rows.values()))
    md = [
        "## Performance (SRLoRA against PEFT LoRA, same process)",
        "",
        f"`benchmarks/step_overhead.py`, batch {any_row['batch']}, r={any_row['r']}, "
        f"run alone on {any_row['machine']}.",
        "Step times are medians of steps that alternate between the models; `control` is a second,",
        "identical PEFT LoRA model in the same rotation, so `control / LoRA` is this machine's noise",
        "floor for the ratio. `own work` is SRLoRA's per-step importance update timed on its own,",
        "and `own-work ratio` = (LoRA step + own work) / LoRA step. The base-size model is a BERT-base",
        "shaped encoder with random weights: no base-size checkpoint can be fetched here, and these",
        "costs depend on shapes, not values.",
        "",
        "| model | layers | r_target | timed steps | LoRA step ms | SRLoRA step ms | SRLoRA / LoRA "
        "| control / LoRA | SRLoRA / control | own work ms | own-work ratio | switch ms | SVD init full s "
        "| randomized s | SVD cache MiB |",
        "|" + "---|" * 15,
    ]
    for name, d in rows.items():
        model = "BERT-base shapes" if name.startswith("base") else "MiniLM"
        md.append(
            f"| {model} | {d['layers']} | {d['r_target']} | {steps[name]} | "
            f"{d['step_s_lora'] * 1e3:.0f} | {d['step_s_srlora'] * 1e3:.0f} | "
            f"{d['ratio_of_medians']:.3f} | {d['control_ratio']:.3f} | "
            f"{d['step_s_srlora'] / d['step_s_control']:.3f} | "
            f"{d['importance_update_s'] * 1e3:.2f} | "
            f"{d['ratio_from_own_work']:.4f} | {d['switch_s'] * 1e3:.0f} | {d['init_s_full']:.2f} | "
            f"{d['init_s_randomized']:.2f} | {d['svd_cache_bytes'] / 2**20:.1f} |"
        )
    md += ["", "Commands:", "", "```", *[f"{d.get('command', '')}" for d in rows.values()], "```", ""]
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "perf", "main", "ablations", "render"], default="all")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    try:
        if args.part in ("all", "perf"):
            run_perf()
        if args.part in ("all", "main"):
            run_jobs(main_jobs(seeds), args.jobs)
        if args.part in ("all", "ablations"):
            run_jobs(ablation_jobs(seeds), args.jobs)
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; run the study again to go on", file=sys.stderr)
    print(f"written: {render(seeds)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
