"""How every multi-process test worker leaves its process group (issue 25).

A process group that outlives ``destroy_process_group()`` (some object still references
it) keeps its gloo threads running into interpreter shutdown. A thread that then finishes
a piece of work and needs the GIL to free its tensors is killed inside a C++ destructor:
``terminate called without an active exception``, SIGABRT at exit, about one run in ten
(native stack: ``ProcessGroupGloo::runLoop`` -> ``~AsyncWork`` -> ``decref`` ->
``PyThread_exit_thread`` -> ``std::terminate``; PyTorch's abandoned pull request #179291
describes the same). srlora's own barrier group was such a reference (now a weak one,
:mod:`srlora.collective`). The others come from the frameworks: FSDP2's ``DeviceMesh``
keeps its groups in ``_pg_registry`` while DTensor's sharding caches keep the mesh alive,
so the registries of the meshes still alive are emptied after the group is destroyed; and
DeepSpeed keeps its engine, its ZeRO optimizer and its partitioned parameters alive (each
holds a group), as the Trainer's and Lightning's runs keep their DDP reducers (C++), which
nothing outside them can release: those workers (``strict=False``), once the group is
destroyed and the output flushed, end without finalizing the interpreter.

So every worker ends with :func:`leave_process_group`, *after* its ``main()`` has returned
(its models, engines and optimizers gone): all ranks meet, the group is destroyed,
garbage is collected, and then no gloo thread may be left (the workers of plain DDP and
FSDP2: a leak is a deterministic failure here, not a one-in-ten abort later).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

_GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def group_threads() -> list[str]:
    """Names of this process's gloo threads still running (Linux; empty elsewhere)."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended while we looked
        if name.startswith(_GROUP_THREADS):
            names.append(name)
    return sorted(names)


def leave_process_group(strict: bool = True) -> None:
    """Meet every rank, destroy the process group (DeepSpeed's way where DeepSpeed set it up),
    release FSDP2's device meshes, collect garbage; then no group's thread may be left.

    ``strict=False`` is for the workers driven by a framework that keeps its groups alive out of
    anyone's reach (DeepSpeed's engine and ZeRO optimizer, the Trainer's and Lightning's
    wrappers, DDP's C++ reducer under them): there, once the group is destroyed and the output
    flushed, the process ends without finalizing the interpreter, the one place the threads
    of a live group can abort it. A group that srlora holds fails either way."""
    import torch.distributed as dist

    deepspeed_comm = sys.modules.get("deepspeed.comm")
    under_deepspeed = deepspeed_comm is not None and deepspeed_comm.is_initialized()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if under_deepspeed:
            deepspeed_comm.destroy_process_group()  # also drops DeepSpeed's module-level references
        else:
            dist.destroy_process_group()
    _release_device_meshes()
    gc.collect()
    left = group_threads()
    if not left:
        return
    holders = group_holders()
    if strict or any(h.startswith("srlora") for h in holders):
        sys.stderr.write(
            f"a process group outlived destroy_process_group(): its threads {left} are still running, so "
            f"something still references it (they would abort the interpreter's shutdown now and then); "
            f"held by: {holders or 'nothing reachable from a module'}\n"
        )
        sys.stderr.flush()
        os._exit(3)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def group_holders(depth: int = 3) -> list[str]:
    """Where the modules' globals still reach a ``ProcessGroup`` (``module.attr[key].attr``...),
    to name the leak."""
    import torch.distributed as dist

    found: list[str] = []
    seen: set[int] = set()

    def scan(obj: object, path: str, level: int) -> None:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        if isinstance(obj, dist.ProcessGroup):
            found.append(path)
            return
        try:  # plain containers and objects only: lazy mappings and proxies are not walked
            if type(obj) is dict:
                items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
            elif type(obj) in (list, tuple):
                items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]  # type: ignore[arg-type]
            elif level == 0 or (type(getattr(obj, "__dict__", None)) is dict and not isinstance(obj, type)):
                items = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
            else:
                return
        except Exception:
            return
        for where, value in items:
            if not isinstance(value, (str, bytes, int, float, bool, type(None))):
                scan(value, where, level + 1)

    for name, module in list(sys.modules.items()):
        if module is not None and name.split(".")[0] in (
            "torch",
            "deepspeed",
            "accelerate",
            "transformers",
            "trl",
            "lightning",
            "srlora",
            "peft",
        ):
            scan(module, name, 0)
    return found


def _release_device_meshes() -> None:
    """Drop the process groups that FSDP2's device meshes still hold (torch keeps the meshes
    in DTensor's sharding caches past ``destroy_process_group()``)."""
    device_mesh = sys.modules.get("torch.distributed.device_mesh")
    if device_mesh is None:
        return
    for obj in gc.get_objects():
        if isinstance(obj, device_mesh.DeviceMesh):
            registry = getattr(obj, "_pg_registry", None)
            if isinstance(registry, dict):
                registry.clear()


def abandon_process_group() -> None:
    """Leave without tearing the group down, for the one worker whose group is broken by design
    (a rank that never joins a collective): a clean teardown would wait for that rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
