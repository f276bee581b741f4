"""How the multi-process tests launch their workers, and how a worker runs several checks in
one launch.

A launch pays the start-up of torch, transformers and PEFT (and DeepSpeed, Lightning...) in
every process: about 10 s on two cores. So a worker that serves several checks with the same
ranks runs them all in one launch, one after the other (:func:`each`), and records each
check's result or its traceback under the check's own name; the tests read their own entry
(:func:`entry`) and fail by their own name. The single-process references the checks compare
against run inside the test process (:func:`in_process`), on one thread as the workers do.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

HERE = Path(__file__).parent
# A launch that hangs fails here, with its command, well within the test's own time limit.
LAUNCH_TIMEOUT = 300
# A collective that one rank never joins (a check that failed on the other) ends the launch's
# remaining checks after this long instead of gloo's default 30 minutes.
GROUP_TIMEOUT = datetime.timedelta(seconds=90)
T = TypeVar("T")


def _env(env: dict | None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}


def torchrun(worker: Path | str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 worker args`` (CPU, one thread a process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(env), timeout=LAUNCH_TIMEOUT)


def python(worker: Path | str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python worker args``: one process, one thread."""
    cmd = [sys.executable, str(worker), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(env), timeout=LAUNCH_TIMEOUT)


def check(proc: subprocess.CompletedProcess, what: str = "") -> None:
    """The launch ended cleanly (every rank left its process group the shared way)."""
    assert proc.returncode == 0, (what, proc.stderr[-3000:])


def in_process(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in this process on one thread (the workers' setting, so that a
    reference computes what a one-process launch computed), the thread count restored after.
    srlora's warnings about a worker's chosen settings (a short switch interval) are not the
    suite's errors here, as they are not in the worker's own process."""
    from srlora import SRLoRAWarning

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SRLoRAWarning)
            return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- worker side
def init_group(backend: str = "gloo", deepspeed: bool = False) -> tuple[int, int]:
    """Join the launch's process group (with :data:`GROUP_TIMEOUT`); ``(rank, world)``.
    ``deepspeed``: a check of this launch runs DeepSpeed, whose own init then takes the group."""
    import torch.distributed as dist

    dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def each(names: Iterable[str], run: Callable[[str], dict]) -> dict[str, dict]:
    """``{name: run(name)}`` over the checks of one launch; a check that raises gets
    ``{"error": its traceback}`` and the next one runs."""
    results: dict[str, dict] = {}
    for name in names:
        try:
            results[name] = run(name)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            sys.stderr.write(f"check {name} failed:\n{results[name]['error']}\n")
    return results


def entry(path: Path, name: str) -> dict:
    """Check ``name``'s result in the file a launch wrote (its traceback if it failed)."""
    assert path.is_file(), f"{path} was not written: the launch did not get that far"
    results = torch.load(path, weights_only=False)
    assert name in results, f"{name} did not run in this launch (ran: {sorted(results)})"
    assert "error" not in results[name], f"{name} failed in the launch:\n{results[name]['error']}"
    return results[name]
