"""The weight surgery of SRLoRA: PiSSA initialisation and the switch (SPEC sections 1, 3).

Notation, for one layer with ``y = x W^T + s x A^T B^T``:
``W: (m, n)`` frozen, ``A: (r, n)``, ``B: (m, r)``, scaling ``s``; pair ``k`` is
``(B[:, k], A[k, :])``; ``W0 ~= U diag(S) V^T`` with directions sorted by ``S``.

The PiSSA factors of directions ``J`` are::

    B_J = U[:, J] diag(sqrt(S[J] / s))        (m, |J|)
    A_J = diag(sqrt(S[J] / s)) V[:, J]^T      (|J|, n)

so that ``s B_J A_J = U[:, J] diag(S[J]) V[:, J]^T`` for any ``s``.

Both operations only move terms between ``W`` and ``s B A``; the layer's function is
unchanged up to float rounding. A quantized base (bitsandbytes 4/8-bit) is never written:
there only ``B`` and ``A`` change, and :class:`~srlora.layer_state.LayerState` keeps the
terms that would have entered ``W`` as low-rank side factors applied in the forward.
Everything runs under ``torch.no_grad()``, in float32, and writes into the existing
tensors (``copy_``/indexed assignment), so optimizer and DDP references to the parameters
stay valid.
"""

from __future__ import annotations

import torch

from .devices import to_device
from .layers import LoraTarget
from .sharding import full, local, local_index
from .svd import SVDCache


def pissa_factors(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_J, A_J)`` of the directions given as columns of ``U (m, k)``, ``V (n, k)``."""
    root = torch.sqrt(S / scaling)
    return U * root, (V * root).T


def _add_to_weight_(target: LoraTarget, delta: torch.Tensor) -> None:
    """``W <- W + delta`` computed in float32 and cast once to W's dtype."""
    W = target.weight
    if W.dtype == torch.float32:
        W.add_(delta)
    else:
        W.copy_(W.float().add_(delta))


@torch.no_grad()
def effective_weight(target: LoraTarget) -> torch.Tensor:
    """``W + s B A`` in float32, shape ``(m, n)``: the weight the layer currently applies
    (under FSDP2, gathered whole on every rank)."""
    if target.sharded:
        B, A = full(target.lora_B.data).float(), full(target.lora_A.data).float()
        return full(target.base_param.data).float() + target.scaling * (B @ A)
    if target.quantized:
        return target.dequantized() + target.scaling * (target.lora_B.float() @ target.lora_A.float())
    B = target.lora_B.float()
    A = target.lora_A.float()
    return target.weight.float() + target.scaling * (B @ A)


@torch.no_grad()
def pissa_init_(target: LoraTarget, cache: SVDCache) -> None:
    """Put the top ``r`` directions into ``(B, A)`` and the rest into ``W``.

    ``W_eff = W + s B A`` (``= W0`` for a fresh LoRA, where ``B = 0``) is kept:
    ``B, A <- pissa_factors(top r)``, ``W <- W_eff - s B A``. ``cache`` must be the SVD
    of ``W_eff``.
    """
    if target.sharded:
        _pissa_init_sharded_(target, cache)
        return
    if target.quantized:  # W is never written: the layer's side factors take -s B A (layer_state)
        if bool(target.lora_B.detach().any()):
            raise ValueError(
                f"Layer {target.name!r}: a quantized layer whose adapter already carries an update (B != 0) is not "
                f"supported; start SRLoRA from a fresh LoRA adapter."
            )
        U, S, V = cache.directions(torch.arange(target.r), target.lora_A.device)
        B_new, A_new = pissa_factors(U, S, V, target.scaling)
        target.lora_B.data.copy_(B_new)
        target.lora_A.data.copy_(A_new)
        return
    r = target.r
    device = target.weight.device
    w_eff = effective_weight(target)
    U, S, V = cache.directions(torch.arange(r), device)
    B_new, A_new = pissa_factors(U, S, V, target.scaling)
    target.lora_B.data.copy_(B_new)
    target.lora_A.data.copy_(A_new)
    # Subtract the factors as stored (possibly rounded to the adapter dtype) so that
    # W + s B A reproduces W_eff as closely as the dtypes allow.
    residual = w_eff - target.scaling * (target.lora_B.float() @ target.lora_A.float())
    target.weight.copy_(residual)


@torch.no_grad()
def switch_pairs_(target: LoraTarget, cache: SVDCache, slots: torch.Tensor, directions: torch.Tensor) -> None:
    """Fuse pairs ``slots`` into ``W`` and re-initialise them from ``directions``.

    ``W <- W + s B[:, slots] A[slots] - s B_new A_new``, then
    ``B[:, slots] <- B_new``, ``A[slots] <- A_new`` with
    ``(B_new, A_new) = pissa_factors(directions)``; ``slots[i]`` receives ``directions[i]``.
    The two weight updates are summed in float32 before touching ``W``, so ``W`` is
    rounded once per switch.
    """
    if target.sharded:
        _switch_pairs_sharded_(target, cache, slots, directions)
        return
    if target.quantized:  # W is never written: the layer's side factors record both pairs (layer_state)
        device = target.lora_A.device
        slots = to_device(slots, device)
        U, S, V = cache.directions(directions, device)
        B_new, A_new = pissa_factors(U, S, V, target.scaling)
        target.lora_B.data[:, slots] = B_new.to(target.lora_B.dtype)
        target.lora_A.data[slots] = A_new.to(target.lora_A.dtype)
        return
    device = target.weight.device
    slots = to_device(slots, device)
    s = target.scaling
    A, B = target.lora_A, target.lora_B
    U, S, V = cache.directions(directions, device)
    B_new, A_new = pissa_factors(U, S, V, s)
    B_new = B_new.to(B.dtype)
    A_new = A_new.to(A.dtype)
    old = B[:, slots].float() @ A[slots].float()
    new = B_new.float() @ A_new.float()
    _add_to_weight_(target, (old - new).mul_(s))
    B.data[:, slots] = B_new
    A.data[slots] = A_new


def _pissa_init_sharded_(target: LoraTarget, cache: SVDCache) -> None:
    """:func:`pissa_init_` on this rank's rows: ``W[w0:w1]``, ``B[w0:w1]``, ``A[a0:a1]``."""
    s = target.scaling
    rows, pairs = target.row_span, target.pair_span
    A_local, B_local = local(target.lora_A.data), local(target.lora_B.data)
    device = A_local.device
    w_eff = target.weight.float() + s * (B_local.float() @ full(target.lora_A.data).float())
    U, S, V = cache.directions(torch.arange(target.r), device, rows=rows)
    B_new, A_new = pissa_factors(U, S, V, s)
    A_new = A_new.to(A_local.dtype)
    B_local.copy_(B_new)
    A_local.copy_(A_new[pairs[0] : pairs[1]])
    target.weight.copy_(w_eff - s * (B_local.float() @ A_new.float()))


def _switch_pairs_sharded_(target: LoraTarget, cache: SVDCache, slots: torch.Tensor, directions: torch.Tensor) -> None:
    """:func:`switch_pairs_` on this rank's rows; ``A`` (``r x n``) is gathered for the fused term."""
    s = target.scaling
    rows, pairs = target.row_span, target.pair_span
    A_local, B_local = local(target.lora_A.data), local(target.lora_B.data)
    device = A_local.device
    A_full = full(target.lora_A.data)
    slots_dev = to_device(slots, device)
    U, S, V = cache.directions(directions, device, rows=rows)
    B_new, A_new = pissa_factors(U, S, V, s)
    B_new, A_new = B_new.to(B_local.dtype), A_new.to(A_local.dtype)
    old = B_local[:, slots_dev].float() @ A_full[slots_dev].float()
    _add_to_weight_(target, (old - B_new.float() @ A_new.float()).mul_(s))
    B_local[:, slots_dev] = B_new
    which, mine = local_index(slots, pairs)
    A_local[to_device(mine, device)] = A_new[to_device(which, device)]
