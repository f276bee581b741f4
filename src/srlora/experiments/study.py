"""The results study: runs what is missing, then writes docs/RESULTS.md.

    srlora study                   # everything (resumable; 1 h 47 min on 2 cores)
    srlora study --part perf       # only the performance benchmarks
    srlora study --part main       # only the 4-task x 4-variant table
    srlora study --part ablations  # only the MR ablations
    srlora study --part render     # only rewrite docs/RESULTS.md from runs/study

Run from the repository root (``--root``). Every training run is one ``srlora train``
command (printed, and written into the doc), into ``runs/study/<cell>/<method>/seed<s>/``,
the folder layout of ``srlora compare``. A run that finished with the same configuration
is kept, so the study can be stopped (Ctrl-C) and started again;
``srlora compare --resume --out runs/study/<cell> ...`` summarises any cell on its own.
Training runs go ``--jobs`` at a time with one thread each (on 2 cores, two
single-thread runs do ~1.5x the steps of one two-thread run). The performance benchmarks
run first, alone, so that no training run disturbs them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from .config import RunConfig
from .options import train_config
from .paper import GLUE_SCORES, VIT_SCORES
from .runs import finished_run

SRLORA = [sys.executable, "-m", "srlora.experiments"]

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
# The 600-step study (issue 13): same seed = same data order, head init and dropout masks
# for every variant, so differences are paired by seed.
LONG_COMMON = ["--preset", "quick", "--max-steps", "600", "--warmup-steps", "60", "--eval-every", "10000"]
# The paper's regime: MiniLM, r=8, r_target=64 (r'=4: 14 switches, t_interval 42).
PAPER_REGIME: dict[str, list[str]] = {"mr": ["--r-target", "64"], "mr-reg": ["--r-target", "64"]}
# cell suffix -> (method, options, tasks it runs on)
PAPER_VARIANTS: dict[str, tuple[str, list[str], tuple[str, ...]]] = {
    "": ("lora", [], ("mr", "mr-reg")),
    "/pissa": ("pissa", [], ("mr", "mr-reg")),
    "/srlora": ("srlora", [], ("mr", "mr-reg")),
    "-gradient": ("srlora", ["--direction-policy", "gradient"], ("mr", "mr-reg")),
    "-scores-all": ("srlora", ["--reset-scores", "all"], ("mr",)),
}
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
    """One training run of the study: ``srlora train`` with these options."""

    cell: str
    task: str
    method: str
    seed: int
    extra: list[str] = field(default_factory=list)
    common: list[str] = field(default_factory=lambda: list(COMMON))

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
            *self.common,
            *self.extra,
            "--out",
            str(self.out),
            "--resume",
        ]

    def config(self) -> RunConfig:
        """The run's configuration, as ``srlora train`` builds it from :meth:`argv`."""
        return train_config(self.argv()[1:])

    def command(self) -> str:
        return "srlora " + shlex.join(self.argv())

    def finished(self, root: Path) -> bool:
        """Finished earlier with the same configuration (the rule of ``srlora compare --resume``)."""
        return finished_run(root / self.out, self.config()) is not None


def main_jobs(seeds: list[int]) -> list[Job]:
    jobs = []
    for seed in seeds:
        for task, extra in TASKS.items():
            jobs += [Job(task, task, m, seed, extra) for m in ("lora", "pissa", "srlora")]
            jobs.append(Job(f"{task}-adaptive", task, "srlora", seed, [*extra, "--adaptive-switch"]))
    return jobs


def ablation_jobs(seeds: list[int]) -> list[Job]:
    return [Job(cell, "mr", "srlora", seed, extra) for seed in seeds for cell, (_, extra) in ABLATIONS.items()]


def long_jobs(seeds: list[int]) -> list[Job]:
    """The paper regime at 600 steps: LoRA, PiSSA, SRLoRA (spectrum, gradient) on mr and mr-reg,
    and the paper's score reset on mr; seeds outermost, so that whole seeds finish first."""
    jobs = []
    for seed in seeds:
        for task, regime in PAPER_REGIME.items():
            for suffix, (method, extra, tasks) in PAPER_VARIANTS.items():
                if task in tasks:
                    cell = f"long-{task}" + ("" if suffix.startswith("/") or not suffix else suffix)
                    jobs.append(Job(cell, task, method, seed, [*regime, *extra], common=LONG_COMMON))
    return jobs


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


def is_finished(job: Job, root: Path) -> bool:
    """Finished earlier with the same configuration (the rule of ``srlora compare --resume``)."""
    return job.finished(root)


def run_jobs(jobs: Sequence[Any], n_jobs: int, root: Path) -> None:
    """Run the jobs not finished yet, ``n_jobs`` at a time, one thread each (a job: ``out``,
    ``argv()`` of the ``srlora`` command, ``command()``, ``finished(root)``)."""
    from tqdm.auto import tqdm

    todo = [j for j in jobs if not j.finished(root)]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs finished earlier; running {len(todo)}", file=sys.stderr)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(job: Job) -> tuple[Job, int]:
        (root / job.out).mkdir(parents=True, exist_ok=True)
        with open(root / job.out / "train.log", "w") as log:
            rc = subprocess.call([*SRLORA, *job.argv()], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
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


def run_perf(root: Path) -> None:
    """The step-overhead benchmarks of :data:`PERF`, each once (kept when measured earlier)."""
    out = root / "runs/study/perf"
    out.mkdir(parents=True, exist_ok=True)
    for name, opts in PERF:
        path = out / f"{name}.json"
        if path.is_file():
            print(f"perf {name}: measured earlier, kept ({path})", file=sys.stderr)
            continue
        cmd = [sys.executable, "benchmarks/step_overhead.py", *opts, "--json", str(path)]
        print("$ python " + shlex.join(cmd[1:]), file=sys.stderr)
        started = time.perf_counter()
        subprocess.run(cmd, cwd=root, check=True)
        data = json.loads(path.read_text())
        data["command"] = "python " + shlex.join(cmd[1:-2])
        data["benchmark_wall_s"] = time.perf_counter() - started
        atomic_write_json(path, data)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--part",
        choices=[
            "all",
            "perf",
            "main",
            "ablations",
            "long",
            "rank-pilot",
            "rank",
            "known-rank",
            "absorb-pilot",
            "absorb",
            "render",
        ],
        default="all",
        help="What to run before rendering: all (every part below but the absorption task), perf, main (150 "
        "steps), ablations, long (600 steps, paper regime), rank-pilot / rank (600 steps, rank-bound regime), "
        "known-rank (the known-rank benchmark's map), absorb-pilot / absorb (SmolLM2 corpus absorption, ~5 h), "
        "render (nothing).",
    )
    ap.add_argument(
        "--rank-task",
        choices=list(RANK_CANDIDATES),
        default=RANK_CHOSEN,
        help="The task of --part rank (the rank-bound regime); the report shows every task that has runs.",
    )
    ap.add_argument("--seeds", default="1,2,3", help="Comma-separated seeds.")
    ap.add_argument("--jobs", type=int, default=2, help="Training runs at a time (one thread each).")
    ap.add_argument("--root", default=".", help="The repository root (runs/study and docs/ live there).")


def run_parts(ns: argparse.Namespace) -> tuple[list[int], Path]:
    """Run the parts ``--part`` names (what is missing of them); returns the seeds and root."""
    seeds = [int(s) for s in ns.seeds.split(",") if s.strip()]
    root = Path(ns.root).resolve()
    try:
        if ns.part in ("all", "perf"):
            run_perf(root)
        if ns.part in ("all", "main"):
            run_jobs(main_jobs(seeds), ns.jobs, root)
        if ns.part in ("all", "ablations"):
            run_jobs(ablation_jobs(seeds), ns.jobs, root)
        if ns.part in ("all", "long"):
            run_jobs(long_jobs(seeds), ns.jobs, root)
        if ns.part == "rank-pilot":
            run_jobs(rank_pilot_jobs(seeds), ns.jobs, root)
        if ns.part in ("all", "rank"):
            run_jobs(rank_jobs(seeds, ns.rank_task), ns.jobs, root)
        if ns.part in ("all", "known-rank"):
            from .known_rank import run_study

            run_study(root / "runs/known-rank", seeds)
        if ns.part in ("absorb-pilot", "absorb"):
            from .studies.absorption import absorb_jobs

            run_jobs(absorb_jobs(seeds, pilot=ns.part == "absorb-pilot"), ns.jobs, root)
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; run the study again to go on", file=sys.stderr)
    return seeds, root
