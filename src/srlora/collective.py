"""What every process of a torch.distributed run does together: who writes shared files,
and the barrier that ends a collective call (export, merge, checkpoint of a sharded model).

A collective call must be made by every rank. Where one rank does not come (it skipped the
call, or crashed), the others would wait forever in the next collective; the barrier here
waits at most ``SRLORA_COLLECTIVE_TIMEOUT`` seconds (default 600) and then raises, naming
the call, on a gloo group made for it (NCCL has no monitored barrier).

That group is held by a *weak* reference: torch.distributed owns it and frees it in
``destroy_process_group()``. A strong one would keep the group's gloo threads running into
interpreter shutdown, where a thread that finishes a piece of work and needs the GIL to
free its tensors is killed mid-destructor: ``terminate called without an active
exception``, SIGABRT at exit, about one run in ten.
"""

from __future__ import annotations

import datetime
import os
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_GROUP: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks_(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Each of ``tensors`` summed over every rank, in place, in one all-reduce of their flat
    concatenation (carried in ``dtype``; default: theirs)."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.flatten().to(dtype or t.dtype) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))


def from_rank0(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's values of ``tensors`` on every rank, in one broadcast: new tensors of their shapes
    (where each rank computed its own, and LAPACK may differ between hosts)."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.flatten() for t in tensors])
    dist.broadcast(flat, src=0)
    return [part.view_as(t).clone() for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True)]


def is_writer() -> bool:
    """This process writes the files of a collective call: rank 0, or the only process."""
    import torch.distributed as dist

    return not distributed() or dist.get_rank() == 0


def prepare() -> None:
    """Make the group :func:`barrier` uses now, while every rank is here (SRLoRA's
    construction): making it is itself a collective."""
    if distributed():
        _gloo_group()


def _gloo_group() -> Any:
    """A gloo group over every rank (made once, by every rank together: :func:`prepare`)."""
    import torch.distributed as dist

    group = _GROUP.get("gloo")
    if group is None:
        group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        _GROUP["gloo"] = group
    return group


def barrier(what: str = "this call") -> None:
    """Every rank waits here for the others; raises ``RuntimeError`` naming ``what`` when a
    rank has not arrived within the timeout (nothing to do outside torch.distributed)."""
    if not distributed():
        return
    import torch.distributed as dist

    timeout = float(os.environ.get("SRLORA_COLLECTIVE_TIMEOUT", "600"))
    try:
        dist.monitored_barrier(group=_gloo_group(), timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{what} is a collective call of a sharded run: every rank must call it, and not every rank did within "
            f"{timeout:.0f} s (SRLORA_COLLECTIVE_TIMEOUT). {str(exc).splitlines()[0][:300]}"
        ) from exc


def rank_stamp(sharded: bool) -> dict[str, int] | None:
    """Which rank of how many a sharded model's per-rank SRLoRA state belongs to (None when
    the state is the same on every rank)."""
    import torch.distributed as dist

    return {"rank": dist.get_rank(), "world": dist.get_world_size()} if sharded and distributed() else None


def check_rank_stamp(saved: dict[str, int] | None, sharded: bool) -> None:
    """Refuse a per-rank state given to another rank (a framework that saves one process's
    state for all, e.g. Accelerate's ``register_for_checkpointing``): each rank of a sharded
    model holds its own rows of the fused records."""
    here = rank_stamp(sharded)
    if saved is not None and here is not None and saved != here:
        from .errors import CheckpointError

        raise CheckpointError(
            f"this SRLoRA state was saved by rank {saved['rank']} of {saved['world']}; this is rank {here['rank']} "
            f"of {here['world']}. A sharded model's state is per rank: save it with srlora.save_checkpoint (or the "
            f"Trainer / Lightning callbacks, which keep every rank's), and resume with the same number of ranks."
        )
