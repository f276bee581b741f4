"""The training runs of the studies: one ``srlora train`` command each (:class:`Job`), run
``--jobs`` at a time with one thread each (:func:`run_jobs`, shared by every study).

A job's output folder is ``runs/study/<cell>/<method>/seed<s>/`` (the folder layout of
``srlora compare``). A run that finished with the same configuration is kept, so a study can
be stopped (Ctrl-C) and started again; on 2 cores, two single-thread runs do ~1.5x the steps
of one two-thread run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig
from .options import train_config
from .runs import finished_run

SRLORA = [sys.executable, "-m", "srlora.experiments"]

# The quick preset (150 steps, r=8, r_target=32, gamma=0.5, batch 16, 1000 dev examples),
# evaluated once, at the last step: the 150-step runs' options, a job's default.
COMMON = ["--preset", "quick", "--eval-every", "1000"]
# The 600-step runs: same seed = same data order, head init and dropout masks
# for every variant, so differences are paired by seed.
LONG_COMMON = ["--preset", "quick", "--max-steps", "600", "--warmup-steps", "60", "--eval-every", "10000"]


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
