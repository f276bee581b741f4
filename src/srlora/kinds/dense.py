"""The dense kind: a float weight held whole by this process.

``nn.Linear`` and transformers' ``Conv1D`` (GPT-2, which stores ``W^T``: PEFT's
``fan_in_fan_out``) in float32, bfloat16, float16 or float64; DDP replicas are this kind
(each process holds the whole layer and applies the same switch). ``weight`` is always the
``(m, n)`` matrix ``W`` with ``y = x W^T``, a view sharing storage with the module's
parameter, so every write lands in the parameter itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..devices import to_device
from ..optim_state import (
    seed_second_moment_,
    seed_second_moments_batched_,
    select,
    zero_moments_,
    zero_moments_batched_,
)
from ..recompose import add_to_weight_, fused_delta, pissa_factors
from ..record import FusedRecord
from ..svd import SVDCache
from .base import NO_GRAD, LoraTarget


class DenseTarget(LoraTarget):
    """A LoRA layer over a float weight in this process."""

    kind = "dense"
    batches = True

    @property
    def weight(self) -> torch.Tensor:
        """``W``, shape ``(m, n)``: a view of the frozen base weight's storage."""
        data = self.base_param.data
        return data.T if self.fan_in_fan_out else data

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        return self.weight.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def pissa_init_(self, cache: SVDCache) -> None:
        r = self.r
        w_eff = self.effective_weight()
        U, S, V = cache.directions(torch.arange(r), self.weight.device)
        B_new, A_new = pissa_factors(U, S, V, self.scaling)
        self.lora_B.data.copy_(B_new)
        self.lora_A.data.copy_(A_new)
        # Subtract the factors as stored (possibly rounded to the adapter dtype) so that
        # W + s B A reproduces W_eff as closely as the dtypes allow.
        self.weight.copy_(w_eff - self.scaling * (self.lora_B.float() @ self.lora_A.float()))

    @torch.no_grad()
    def switch_pairs_(
        self, slots: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.weight.device
        slots = to_device(slots, device)
        A, B = self.lora_A, self.lora_B
        B_new, A_new = pissa_factors(U.to(device), S.to(device), V.to(device), self.scaling)
        B_new, A_new = B_new.to(B.dtype), A_new.to(A.dtype)
        B_old, A_old = B.data[:, slots].float(), A.data[slots].float()
        add_to_weight_(self.weight, fused_delta(B_old, A_old, B_new, A_new, self.scaling))
        B.data[:, slots] = B_new
        A.data[slots] = A_new
        return B_old, A_old, B_new.float(), A_new.float()

    def batch_key(self) -> object | None:
        if not self.batches:  # a kind built on this one that switches layer by layer
            return None
        W, A, B = self.base_param, self.lora_A, self.lora_B
        return (type(self), self.shape, self.fan_in_fan_out, W.dtype, A.dtype, B.dtype, W.device)

    @classmethod
    @torch.no_grad()
    def switch_batched_(
        cls,
        targets: Sequence[LoraTarget],
        U_new: torch.Tensor,
        S_new: torch.Tensor,
        V_new: torch.Tensor,
        slots: torch.Tensor,
        scaling: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`switch_pairs_` of ``L`` layers of one :meth:`batch_key` at once.

        Args:
            U_new: ``(L, r', m)``, ``S_new``: ``(L, r')``, ``V_new``: ``(L, r', n)``: the new
                directions of each layer, in the order of its ``slots`` ``(L, r')``.
            scaling: ``(L,)``, each layer's ``s``.

        Returns ``(B_old (L, m, r'), A_old (L, r', n), B_new, A_new)`` in float32, the new
        pairs as the slots hold them. The weight update of all layers is one batched product
        and one ``_foreach`` add; the factor writes one scatter and one ``_foreach`` copy per
        factor.
        """
        if not cls.batches:
            return super().switch_batched_(targets, U_new, S_new, V_new, slots, scaling)
        slots = to_device(slots, targets[0].device)
        root = (S_new / scaling[:, None]).sqrt_()[:, :, None]  # (L, r', 1)
        A_params = [t.lora_A for t in targets]
        B_params = [t.lora_B for t in targets]
        A, B = torch.stack(A_params), torch.stack(B_params)  # (L, r, n), (L, m, r)
        B_new = (U_new * root).transpose(1, 2).to(B.dtype)  # (L, m, r')
        A_new = (V_new * root).to(A.dtype)  # (L, r', n)
        idx_B = slots[:, None, :].expand(-1, B.shape[1], -1)
        idx_A = slots[:, :, None].expand(-1, -1, A.shape[2])
        B_old, A_old = B.gather(2, idx_B).float(), A.gather(1, idx_A).float()
        # s (B_old A_old - B_new A_new) as one batched product of rank 2 r' (on the CPU,
        # matmul's batched kernel is several times faster than bmm's here).
        P = torch.cat([B_old, B_new.float().neg()], dim=2).mul_(scaling[:, None, None])
        delta = torch.matmul(P, torch.cat([A_old, A_new.float()], dim=1))
        weights = [t.base_param for t in targets]
        if targets[0].fan_in_fan_out:
            delta = delta.transpose(1, 2)  # the parameter stores W^T
        if weights[0].dtype == torch.float32:
            torch._foreach_add_(weights, delta.unbind(0))
        else:  # summed in float32, rounded once
            torch._foreach_copy_(weights, torch.stack(weights).float().add_(delta).unbind(0))
        torch._foreach_copy_(B_params, B.scatter_(2, idx_B, B_new).unbind(0))
        torch._foreach_copy_(A_params, A.scatter_(1, idx_A, A_new).unbind(0))
        return B_old, A_old, B_new.float(), A_new.float()

    def importance_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        A, B = self.lora_A, self.lora_B
        if A.grad is None or B.grad is None:
            raise RuntimeError(NO_GRAD)
        return A, A.grad, B, B.grad

    def zero_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        zero_moments_(optimizer, self.lora_A, select(self.lora_A, slots, 0))
        zero_moments_(optimizer, self.lora_B, select(self.lora_B, slots, 1))

    def seed_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        seed_second_moment_(optimizer, self.lora_A, select(self.lora_A, slots, 0))
        seed_second_moment_(optimizer, self.lora_B, select(self.lora_B, slots, 1))

    @classmethod
    def zero_moments_batched_(
        cls, optimizer: torch.optim.Optimizer, targets: Sequence[LoraTarget], slots: torch.Tensor
    ) -> None:
        """One ``_foreach`` product over every moment of the layers' ``A`` and ``B`` (a 0/1 mask)."""
        if not cls.batches:
            return super().zero_moments_batched_(optimizer, targets, slots)
        rows = zip(targets, slots.tolist(), strict=True)
        keep = [[0.0 if k in set(row) else 1.0 for k in range(t.r)] for t, row in rows]
        zero_moments_batched_(optimizer, targets, to_device(torch.tensor(keep), targets[0].device))

    @classmethod
    def seed_moments_batched_(
        cls, optimizer: torch.optim.Optimizer, targets: Sequence[LoraTarget], slots: Sequence[Sequence[int]]
    ) -> None:
        """A few ``_foreach`` operations for all the layers (one 0/1 mask per adapter rank)."""
        if not cls.batches:
            return super().seed_moments_batched_(optimizer, targets, slots)
        rows = [[1.0 if k in set(row) else 0.0 for k in range(t.r)] for t, row in zip(targets, slots, strict=True)]
        recycled = torch.tensor(rows).to(targets[0].device, non_blocking=True)
        seed_second_moments_batched_(optimizer, targets, recycled)

    @torch.no_grad()
    def merge_adapter_(self) -> None:
        """``W <- W + s B A`` in float32, cast once (what PEFT's merge computes)."""
        add_to_weight_(self.weight, (self.lora_B.float() @ self.lora_A.float()).mul_(self.scaling))

    @torch.no_grad()
    def total_update_factors(
        self, cache: SVDCache, used: torch.Tensor, record: FusedRecord, entered: FusedRecord | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s F_B F_A + s B A - s E_B E_A``: the record, the slots, and every pair that entered
        them (``W0`` itself is never kept); under the paper's entries ``s E_B E_A`` is
        ``U_p diag(S_p) V_p^T`` of the directions used, read from the cache."""
        A, B = self.local_factors()
        return entered_update(self.scaling, cache, used, record, entered, B.float(), A.float(), self.row_span)


def entered_update(
    s: float,
    cache: SVDCache,
    used: torch.Tensor,
    record: FusedRecord,
    entered: FusedRecord | None,
    B: torch.Tensor,
    A: torch.Tensor,
    rows: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` of ``s F_B F_A + s B A - s E_B E_A`` for the rows ``rows`` this process holds
    (``B``: those rows, ``A``: whole), with ``E`` from ``entered`` or, where it is ``None``,
    ``U_p diag(S_p) V_p^T`` of the cache's ``used`` directions."""
    device = record.B.device
    F_B, F_A = record.factors()
    if entered is None:
        U, S, V = cache.directions(used.nonzero().flatten(), device, rows=rows)
        E_B, E_A = U * S, V.T
    else:
        E_B, E_A = entered.factors()
        E_B = E_B * s
    P = torch.cat([s * F_B, s * B.to(device), -E_B], dim=1)
    Q = torch.cat([F_A, A.to(device), E_A], dim=0)
    return P, Q
