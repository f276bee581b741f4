"""Operations over many layers at once: what a switch step reads on the host in one
device-to-host transfer (and, under FSDP2, one all-reduce), the adaptive trigger's scores,
and the checks that apply to every layer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .layer_state import LayerState
from .layers import current_kind


def adaptive_due(layers: Sequence[LayerState], step: int) -> list[LayerState]:
    """The layers whose adaptive trigger fires after optimizer step ``step`` and whose
    schedule allows a switch then; every layer's scores reach the host in one transfer."""
    flat = torch.cat([layer.importance.pair_scores().float() for layer in layers])
    _reduce_partial(layers, flat)
    scores = flat.cpu().split([layer.r for layer in layers])
    due = []
    for layer, layer_scores in zip(layers, scores, strict=True):
        assert layer.trigger is not None and layer.schedule is not None
        # The trigger counts every step, even those on which the schedule forbids a switch.
        fire = layer.trigger.update(layer_scores, layer.r_prime)
        if fire and layer.schedule.allows(step, layer.switches_done):
            due.append(layer)
    return due


def switch_inputs(
    layers: Sequence[LayerState], extra: Sequence[torch.Tensor | None] | None = None
) -> tuple[list[torch.Tensor], list[bool], list[torch.Tensor | None]]:
    """What the switches of ``layers`` read on the host, in one device-to-host transfer:
    each layer's pair scores, whether its ``A`` and ``B`` are finite, and an ``extra``
    float vector per layer (the gradient policy's alignment EMA), all on the CPU."""
    if not layers:
        return [], [], []
    extra = list(extra) if extra is not None else [None] * len(layers)
    device = layers[0].importance.ibar_A.device
    # Scores and non-finite counts first (summed over the ranks under FSDP2), then the extras.
    shared, sizes = [], []
    for layer in layers:
        A, B = layer.target.local_factors()
        bad = (~torch.isfinite(A)).any() | (~torch.isfinite(B)).any()
        for piece in (layer.importance.pair_scores().float(), bad.float().reshape(1)):
            shared.append(piece.to(device, non_blocking=True))
            sizes.append(piece.numel())
    flat = torch.cat(shared)
    _reduce_partial(layers, flat)
    own = [more.float().to(device, non_blocking=True) for more in extra if more is not None]
    host = torch.cat([flat, *own]).cpu()
    flat, rest = host[: flat.numel()].split(sizes), host[flat.numel() :]
    own_sizes = [more.numel() for more in extra if more is not None]
    extras = iter(rest.split(own_sizes)) if own_sizes else iter(())
    scores, finite, gathered = [], [], []
    for i, more in enumerate(extra):
        scores.append(flat[2 * i])
        finite.append(not bool(flat[2 * i + 1].item()))
        gathered.append(next(extras) if more is not None else None)
    return scores, finite, gathered


def _reduce_partial(layers: Sequence[LayerState], flat: torch.Tensor) -> None:
    """Sum ``flat`` over the processes when some layer's importance is split among them."""
    partial = next((layer for layer in layers if layer.importance.partial), None)
    if partial is not None:
        partial.target.reduce_(flat)


def check_build_order(layers: Iterable[LayerState]) -> None:
    """Follow layers whose kind changed since SRLoRA was built, where SRLoRA's state still
    fits (:func:`~srlora.layers.current_kind`); refuse the others (``fully_shard`` applied
    afterwards splits what SRLoRA's state holds whole) before anything changes."""
    layers = list(layers)
    moved = {layer.name: new for layer in layers if (new := current_kind(layer.target)) is not None}
    for layer in layers:
        if layer.name in moved:
            layer.retarget(moved[layer.name])


def refuse(layers: Iterable[LayerState], what: str) -> None:
    """Raise ``NotImplementedError`` with the way out when a layer's kind cannot take part in
    ``what`` (:meth:`~srlora.kinds.base.LoraTarget.refusal`)."""
    for layer in layers:
        reason = layer.target.refusal(what)
        if reason is not None:
            raise NotImplementedError(reason)
