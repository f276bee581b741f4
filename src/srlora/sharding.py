"""FSDP2 (``torch.distributed.fsdp.fully_shard``): SRLoRA on row-sharded DTensor parameters.

``fully_shard`` replaces every parameter of a sharded module by a DTensor split along its
first dimension over the ranks of a 1-D device mesh, in ``torch.chunk`` pieces: rank ``i``
of ``W`` ranks holds rows ``[i c, min((i + 1) c, N))`` with ``c = ceil(N / W)``. For one
adapted layer that means:

* ``W (m, n)`` and ``B (m, r)``: the same rows ``[w0, w1)`` of the output features;
* ``A (r, n)``: rows ``[a0, a1)``, i.e. whole pairs (pair ``k`` lives on one rank);
* the optimizer's moments: shaped and split like their parameters.

What each rank holds and does (see also docs/INTEGRATIONS.md, "FSDP2"):

* **SVD cache**: the singular values, all right vectors ``V (n, k)`` (a new pair's row of
  ``A``, and the update of ``W``, need them whichever slot it enters) and the left vectors
  ``U`` of its own rows ``[w0, w1)`` only. Under ``direction_policy="gradient"`` the full
  ``U``: the alignment projects the full output gradient.
* **Initialisation**, one layer at a time: the layer's ``W + s B A`` is gathered
  (``full_tensor``), decomposed on rank 0, the factors broadcast, and each rank writes its
  own rows of ``W``, ``B`` and ``A``.
* **Importance**: the EMAs of a rank's own rows of ``A`` and ``B``; the pair scores
  ``S_k = mean_i s(B_ik) + mean_j s(A_kj)`` are sums of per-rank partial sums, all-reduced,
  so every rank holds the same ``S_k`` and picks the same pairs.
* **Switch**: ``A`` (``r x n``, small) is gathered; each rank updates its rows of ``W``,
  ``B``, ``A`` and of the optimizer's moments.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """``t`` is a DTensor (a parameter, its data, a gradient or an optimizer moment)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``t`` itself when it is not sharded); writes go to ``t``."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` on every rank (a gather when it is sharded)."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


def check_row_sharded(t: torch.Tensor, what: str) -> None:
    """Refuse a DTensor that is not split along its first dimension over a 1-D mesh."""
    if not is_sharded(t):
        return
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)  # type: ignore[attr-defined]
    if t.device_mesh.ndim != 1 or placements != (Shard(0),):  # type: ignore[attr-defined]
        raise ValueError(
            f"{what} is sharded as {placements} over a {t.device_mesh.ndim}-D mesh; SRLoRA supports FSDP2's "  # type: ignore[attr-defined]
            f"default, Shard(0) over a 1-D mesh (fully_shard without shard_placement_fn, no HSDP)."
        )


def row_span(t: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)``: the rows of ``t``'s first dimension this rank holds."""
    n = int(t.shape[0])
    if not is_sharded(t):
        return 0, n
    mesh = t.device_mesh  # type: ignore[attr-defined]
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(n / world)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    held = int(local(t).shape[0])
    if held != stop - start:
        raise RuntimeError(f"unexpected shard: rows {start}:{stop} of {n}, but {held} held locally.")
    return start, stop


def local_index(index: torch.Tensor, span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(which, local)``: the positions of ``index`` that fall in ``span``, and their
    indices relative to it."""
    start, stop = span
    which = ((index >= start) & (index < stop)).nonzero().flatten()
    return which, index[which] - start


def all_reduce_(t: torch.Tensor, like: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` in place over the ranks ``like`` is sharded over (nothing when it is not)."""
    if is_sharded(like):
        import torch.distributed as dist

        group = like.device_mesh.get_group()  # type: ignore[attr-defined]
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN, group=group)
    return t
