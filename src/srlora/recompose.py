"""The weight surgery of SRLoRA on plain tensors: PiSSA factors and the fused update
(docs/METHOD.md sections 1 and 3). Each kind of layer (:mod:`srlora.kinds`) applies them to the tensors
it holds.

Notation, for one layer with ``y = x W^T + s x A^T B^T``:
``W: (m, n)`` frozen, ``A: (r, n)``, ``B: (m, r)``, scaling ``s``; pair ``k`` is
``(B[:, k], A[k, :])``; ``W0 ~= U diag(S) V^T`` with directions sorted by ``S``.

The PiSSA factors of directions ``J`` are::

    B_J = U[:, J] diag(sqrt(S[J] / s))        (m, |J|)
    A_J = diag(sqrt(S[J] / s)) V[:, J]^T      (|J|, n)

so that ``s B_J A_J = U[:, J] diag(S[J]) V[:, J]^T`` for any ``s``. A switch of pairs
``slots`` to directions ``J`` moves ``s B[:, slots] A[slots]`` into ``W`` and ``s B_J A_J``
out of it::

    W <- W + s (B[:, slots] A[slots] - B_J A_J)

Both operations only move terms between ``W`` and ``s B A``; the layer's function is
unchanged up to float rounding. Everything runs under ``torch.no_grad()``, in float32, and
writes into the existing tensors (``copy_``/indexed assignment), so optimizer and DDP
references to the parameters stay valid.
"""

from __future__ import annotations

import torch


def pissa_factors(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_J, A_J)`` of the directions given as columns of ``U (m, k)``, ``V (n, k)``."""
    root = torch.sqrt(S / scaling)
    return U * root, (V * root).T


@torch.no_grad()
def add_to_weight_(W: torch.Tensor, delta: torch.Tensor) -> None:
    """``W <- W + delta`` computed in float32 and cast once to W's dtype (``W``: a view of
    the frozen weight's storage)."""
    if W.dtype == torch.float32:
        W.add_(delta)
    else:
        W.copy_(W.float().add_(delta))


@torch.no_grad()
def fused_delta(
    B_old: torch.Tensor, A_old: torch.Tensor, B_new: torch.Tensor, A_new: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``s (B_old A_old - B_new A_new)`` in float32: what a switch adds to ``W``. The two
    products are summed before ``W`` is touched, so ``W`` is rounded once per switch."""
    old = B_old.float() @ A_old.float()
    return old.sub_(B_new.float() @ A_new.float()).mul_(scaling)
