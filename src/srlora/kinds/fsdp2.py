"""The FSDP2 kind (``torch.distributed.fsdp.fully_shard``): SRLoRA on row-sharded DTensors.

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
from torch import nn

from ..devices import to_device
from ..optim_state import seed_second_moment_, select, zero_moments_
from ..recompose import add_to_weight_, fused_delta, pissa_factors
from ..record import FusedRecord
from ..svd import SVDCache
from .base import NO_GRAD, local_index
from .dense import DenseTarget, entered_update


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


def all_reduce_(t: torch.Tensor, like: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` in place over the ranks ``like`` is sharded over (nothing when it is not)."""
    if is_sharded(like):
        import torch.distributed as dist

        group = like.device_mesh.get_group()  # type: ignore[attr-defined]
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN, group=group)
    return t


class Fsdp2Target(DenseTarget):
    """A LoRA layer whose ``W``, ``B`` and ``A`` are FSDP2 row shards (see the module doc)."""

    kind = "fsdp2"
    split_among_processes = True

    batches = False  # switches layer by layer

    @classmethod
    def check_module(cls, name: str, module: nn.Module, adapter: str, quantized: bool) -> None:
        """FSDP2's default layout, whole PEFT layers over a float base: refused otherwise."""
        if quantized:
            raise ValueError(
                f"Layer {name!r}: FSDP2 with a bitsandbytes quantized base is not supported; train QLoRA on one "
                f"device or with DDP."
            )
        if module.fan_in_fan_out:
            raise ValueError(
                f"Layer {name!r}: transformers' Conv1D (fan_in_fan_out) under FSDP2 is not supported; "
                f"shard a model with nn.Linear layers, or train it with DDP."
            )
        weight, A, B = module.get_base_layer().weight, module.lora_A[adapter].weight, module.lora_B[adapter].weight
        for what, t in (("weight", weight), ("lora_A", A), ("lora_B", B)):
            check_row_sharded(t, f"Layer {name!r}'s {what}")
        if not (is_sharded(weight) and is_sharded(A) and is_sharded(B)):
            raise ValueError(
                f"Layer {name!r}: its base weight and LoRA A/B must be sharded together (fully_shard the "
                f"block that holds the whole PEFT layer)."
            )

    @property
    def weight(self) -> torch.Tensor:
        """This rank's rows ``row_span`` of ``W`` (a view of its local shard)."""
        return local(self.base_param.data)

    @property
    def row_span(self) -> tuple[int, int]:
        return row_span(self.base_param)

    @property
    def pair_span(self) -> tuple[int, int]:
        return row_span(self.lora_A)

    def local_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return local(self.lora_A.data), local(self.lora_B.data)

    @property
    def collective(self) -> bool:
        return True

    def reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce_(t, like=self.lora_A, op=op)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """``W + s B A`` gathered whole on every rank (a collective)."""
        B, A = full(self.lora_B.data).float(), full(self.lora_A.data).float()
        return full(self.base_param.data).float() + self.scaling * (B @ A)

    def prepare_cache(self, cache: SVDCache, full_rows: bool) -> SVDCache:
        return cache if full_rows else cache.keep_rows(*self.row_span)  # U of this rank's rows only

    @torch.no_grad()
    def pissa_init_(self, cache: SVDCache) -> None:
        """On this rank's rows: ``W[w0:w1]``, ``B[w0:w1]``, ``A[a0:a1]``."""
        s = self.scaling
        rows, pairs = self.row_span, self.pair_span
        A_local, B_local = self.local_factors()
        w_eff = self.weight.float() + s * (B_local.float() @ full(self.lora_A.data).float())
        U, S, V = cache.directions(torch.arange(self.r), A_local.device, rows=rows)
        B_new, A_new = pissa_factors(U, S, V, s)
        A_new = A_new.to(A_local.dtype)
        B_local.copy_(B_new)
        A_local.copy_(A_new[pairs[0] : pairs[1]])
        self.weight.copy_(w_eff - s * (B_local.float() @ A_new.float()))

    @torch.no_grad()
    def switch_pairs_(
        self, slots: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """On this rank's rows (``U``: this rank's rows of the new pairs); ``A`` (``r x n``,
        small) is gathered for the fused term."""
        s = self.scaling
        pairs = self.pair_span
        A_local, B_local = self.local_factors()
        device = A_local.device
        A_full = full(self.lora_A.data)
        slots_dev = to_device(slots, device)
        B_new, A_new = pissa_factors(U.to(device), S.to(device), V.to(device), s)
        B_new, A_new = B_new.to(B_local.dtype), A_new.to(A_local.dtype)
        B_old, A_old = B_local[:, slots_dev].float(), A_full[slots_dev].float()
        add_to_weight_(self.weight, fused_delta(B_old, A_old, B_new, A_new, s))
        B_local[:, slots_dev] = B_new
        which, mine = local_index(slots, pairs)
        A_local[to_device(mine, device)] = A_new[to_device(which, device)]
        return B_old, A_old, B_new.float(), A_new.float()

    def slot_factors(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of ``B[:, slots]`` and the whole ``A[slots]`` (a gather of ``A``)."""
        B_local = self.local_factors()[1]
        return B_local[:, slots].float(), full(self.lora_A.data)[slots].float()

    def importance_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        A, B = self.lora_A, self.lora_B
        if A.grad is None or B.grad is None:
            raise RuntimeError(NO_GRAD)
        return local(A), local(A.grad), local(B), local(B.grad)

    def _select_A(self, slots: torch.Tensor) -> tuple[slice | torch.Tensor, ...]:
        """Rows ``slots`` of ``A`` that this rank holds, shifted to its shard."""
        _, mine = local_index(slots, self.pair_span)
        return select(local(self.lora_A), mine, 0)

    def zero_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        zero_moments_(optimizer, self.lora_A, self._select_A(slots), view=local)
        zero_moments_(optimizer, self.lora_B, select(local(self.lora_B), slots, 1), view=local)

    def seed_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        seed_second_moment_(optimizer, self.lora_A, self._select_A(slots), view=local)
        seed_second_moment_(optimizer, self.lora_B, select(local(self.lora_B), slots, 1), view=local)

    @torch.no_grad()
    def merge_adapter_(self) -> None:
        """This rank's rows: ``W[w0:w1] += s B[w0:w1] A`` (``A``, ``r x n``, gathered)."""
        B_local = local(self.lora_B.data).float()
        add_to_weight_(self.weight, (B_local @ full(self.lora_A.data).float()).mul_(self.scaling))

    @torch.no_grad()
    def total_update_factors(
        self, cache: SVDCache, used: torch.Tensor, record: FusedRecord, entered: FusedRecord | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``(P, Q)`` on every rank (a collective): ``Q`` is the same everywhere, the
        rows of ``P`` are gathered, one layer at a time (``m x k`` numbers, never ``W``)."""
        import torch.distributed as dist

        B_local, A_full = local(self.lora_B.data).float(), full(self.lora_A.data).float()
        P_local, Q = entered_update(self.scaling, cache, used, record, entered, B_local, A_full, self.row_span)
        mesh = self.base_param.device_mesh  # type: ignore[attr-defined]
        world, m = mesh.size(), self.shape[0]
        chunk = math.ceil(m / world)
        padded = P_local.new_zeros(chunk, P_local.shape[1])
        padded[: P_local.shape[0]] = P_local
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded, group=mesh.get_group())
        return torch.cat(pieces)[:m], Q
