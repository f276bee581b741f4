"""EMA importance of every rank-1 LoRA pair (paper Eq. 3-7; docs/METHOD.md section 2).

For every element ``w`` of ``A (r, n)`` and ``B (m, r)``, once per optimizer step and
with the gradient that step applies::

    I     = |w * grad(w)|                                   (Eq. 3)
    I_bar = beta1 * I_bar + (1 - beta1) * I                 (Eq. 4)
    U_bar = beta2 * U_bar + (1 - beta2) * |I - I_bar|       (Eq. 5, with the new I_bar)
    s     = I_bar * U_bar                                   (Eq. 6)
    S_k   = mean_i s(B[i, k]) + mean_j s(A[k, j])           (Eq. 7)

All state is float32 whatever the adapter's dtype, and lives in tensors returned by
``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kinds.base import LoraTarget, local_index


class PairImportance:
    """Importance EMAs of one layer's ``r`` LoRA pairs.

    Args:
        r: number of pairs.
        m: rows of ``B`` (output features).
        n: columns of ``A`` (input features).
        beta1, beta2: EMA coefficients.
        device: where the EMAs live (the adapter's device).
        pair_span: the rows of ``A`` this rank holds (FSDP2; all by default).
        rows_held: how many rows of ``B`` this rank holds (FSDP2; ``m`` by default).
    """

    def __init__(
        self,
        r: int,
        m: int,
        n: int,
        beta1: float,
        beta2: float,
        device: torch.device,
        pair_span: tuple[int, int] | None = None,
        rows_held: int | None = None,
    ) -> None:
        self.beta1 = beta1
        self.beta2 = beta2
        self.r, self.m, self.n = r, m, n
        self.pair_span = (0, r) if pair_span is None else pair_span
        a = self.pair_span[1] - self.pair_span[0]
        mb = m if rows_held is None else rows_held
        self.partial = (a, mb) != (r, m)
        self.ibar_A = torch.zeros(a, n, dtype=torch.float32, device=device)
        self.ubar_A = torch.zeros(a, n, dtype=torch.float32, device=device)
        self.ibar_B = torch.zeros(mb, r, dtype=torch.float32, device=device)
        self.ubar_B = torch.zeros(mb, r, dtype=torch.float32, device=device)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ibar_A, self.ubar_A, self.ibar_B, self.ubar_B

    def use_storage(
        self, ibar_A: torch.Tensor, ubar_A: torch.Tensor, ibar_B: torch.Tensor, ubar_B: torch.Tensor
    ) -> None:
        """Keep the EMAs in these tensors (views into a group's stacked storage, holding the
        same values) from now on."""
        for own, new in zip(self.tensors(), (ibar_A, ubar_A, ibar_B, ubar_B), strict=True):
            if own.shape != new.shape:
                raise ValueError(f"importance storage of shape {tuple(new.shape)}, expected {tuple(own.shape)}.")
        self.ibar_A, self.ubar_A, self.ibar_B, self.ubar_B = ibar_A, ubar_A, ibar_B, ubar_B

    def pair_scores(self) -> torch.Tensor:
        """``S_k`` for ``k = 0 .. r-1`` (float32, shape ``(r,)``); under FSDP2 this rank's
        share of it (:meth:`partial_scores`), which the ranks sum."""
        if self.partial:
            return self.partial_scores()
        score_A = (self.ibar_A * self.ubar_A).mean(dim=1)
        score_B = (self.ibar_B * self.ubar_B).mean(dim=0)
        return score_A + score_B

    def partial_scores(self) -> torch.Tensor:
        """This rank's share of ``S_k``: its rows' sums divided by the whole ``n`` and ``m``."""
        a0, a1 = self.pair_span
        out = (self.ibar_B * self.ubar_B).sum(dim=0).div_(self.m)
        out[a0:a1] += (self.ibar_A * self.ubar_A).sum(dim=1).div_(self.n)
        return out

    def reset(self, slots: torch.Tensor | None = None) -> None:
        """Zero the EMAs of pairs ``slots`` (all pairs when ``None``)."""
        if slots is None:
            for t in self.tensors():
                t.zero_()
            return
        if self.partial:
            _, mine = local_index(slots, self.pair_span)
            self.ibar_A[mine] = 0.0
            self.ubar_A[mine] = 0.0
        else:
            self.ibar_A[slots] = 0.0
            self.ubar_A[slots] = 0.0
        self.ibar_B[:, slots] = 0.0
        self.ubar_B[:, slots] = 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "ibar_A": self.ibar_A.clone(),
            "ubar_A": self.ubar_A.clone(),
            "ibar_B": self.ibar_B.clone(),
            "ubar_B": self.ubar_B.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("ibar_A", "ubar_A", "ibar_B", "ubar_B"):
            dst = getattr(self, key)
            src = state[key]
            if src.shape != dst.shape:
                raise ValueError(f"importance state {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}.")
            dst.copy_(src)


@torch.no_grad()
def update_importance_(
    states: Sequence[PairImportance],
    weights_A: Sequence[torch.Tensor],
    grads_A: Sequence[torch.Tensor],
    weights_B: Sequence[torch.Tensor],
    grads_B: Sequence[torch.Tensor],
) -> None:
    """One EMA step (Eq. 3-5) for many layers at once.

    Uses the ``torch._foreach_*`` kernels so that the cost is a handful of fused
    launches over all layers rather than several per layer. All layers share
    ``beta1``/``beta2`` (they come from one config).
    """
    if not states:
        return
    beta1, beta2 = states[0].beta1, states[0].beta2
    # Read under no_grad, no detach: a per-tensor detach would cost one op per layer.
    weights = [w.float() for w in (*weights_A, *weights_B)]
    grads = [g.float() for g in (*grads_A, *grads_B)]
    ibar = [s.ibar_A for s in states] + [s.ibar_B for s in states]
    ubar = [s.ubar_A for s in states] + [s.ubar_B for s in states]

    sens = torch._foreach_mul(weights, grads)
    torch._foreach_abs_(sens)  # I
    torch._foreach_mul_(ibar, beta1)
    torch._foreach_add_(ibar, sens, alpha=1.0 - beta1)  # I_bar
    torch._foreach_sub_(sens, ibar)
    torch._foreach_abs_(sens)  # |I - I_bar|
    torch._foreach_mul_(ubar, beta2)
    torch._foreach_add_(ubar, sens, alpha=1.0 - beta2)  # U_bar


def _importance_inputs(
    targets: Sequence[LoraTarget],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every target's ``(A, dA, B, dB)``, each kind's layers in one batch (a kind whose
    inputs are collectives gathers them at once); every process calls it in the same order."""
    by_kind: dict[type[LoraTarget], list[int]] = {}
    for i, target in enumerate(targets):
        by_kind.setdefault(type(target), []).append(i)
    inputs: list = [None] * len(targets)
    for kind, positions in by_kind.items():
        batch = kind.importance_inputs_batched([targets[i] for i in positions])
        for i, value in zip(positions, batch, strict=True):
            inputs[i] = value
    return inputs


def update_importance_from_targets_(states: Sequence[PairImportance], targets: Sequence[LoraTarget]) -> bool:
    """One EMA step for every layer from the gradients of its ``(A, B)`` (as its kind gives
    them: :meth:`~srlora.kinds.base.LoraTarget.importance_inputs`); ``False``, updating
    nothing, when a gradient is not finite.

    The finite check reads the largest ``|g|`` of each tensor (finite exactly when every
    entry is; unlike the 2-norm it cannot overflow in fp16): one host sync for all layers,
    and every process that shares a layer skips together.
    """
    inputs = _importance_inputs(targets)
    weights_A, grads_A, weights_B, grads_B = ([x[i] for x in inputs] for i in range(4))
    peaks = torch._foreach_norm([*grads_A, *grads_B], float("inf"))
    device = peaks[0].device
    finite = torch.isfinite(torch.stack([p.to(device, non_blocking=True) for p in peaks])).all().float()
    collective = next((t for t in targets if t.collective), None)
    if collective is not None:
        collective.reduce_(finite, op="min")
    if not bool(finite):
        return False
    update_importance_(states, weights_A, grads_A, weights_B, grads_B)
    return True
