"""Operations over many layers at once: what a switch step reads on the host in one
device-to-host transfer (and, under FSDP2, one all-reduce), the adaptive trigger's scores,
and the checks that apply to every layer. The layers' scores are
read through their group's stacked storage (:mod:`srlora.layer_group`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from .layer_group import LayerGroup
from .layer_state import LayerState
from .layers import LoraTarget, current_kind


def pair_scores(layers: Sequence[LayerState], groups: Mapping[str, LayerGroup], reduce: bool = True) -> torch.Tensor:
    """Every layer's pair scores ``S_k``, concatenated in the order of ``layers`` (float32, on
    the first layer's device), from its group's stacked EMAs (a few batched operations per
    group); summed over processes where a layer's importance is split among them."""
    device = layers[0].importance.ibar_A.device
    rows: dict[str, torch.Tensor] = {}
    for group in {id(g): g for g in groups.values()}.values():
        rows.update(zip(group.names, group.pair_scores().unbind(0), strict=True))
    flat = torch.cat([rows[layer.name].float().to(device, non_blocking=True) for layer in layers])
    if reduce:
        _reduce_partial(layers, flat)
    return flat


def adaptive_due(layers: Sequence[LayerState], step: int, groups: Mapping[str, LayerGroup]) -> list[LayerState]:
    """The layers whose adaptive trigger fires after optimizer step ``step`` and whose
    schedule allows a switch then; every layer's scores reach the host in one transfer."""
    flat = pair_scores(layers, groups).cpu()
    scores = flat.split([layer.r for layer in layers])
    due = []
    for layer, layer_scores in zip(layers, scores, strict=True):
        assert layer.trigger is not None and layer.schedule is not None
        # The trigger counts every step, even those on which the schedule forbids a switch.
        fire = layer.trigger.update(layer_scores, layer.r_prime)
        if fire and layer.schedule.allows(step, layer.switches_done):
            due.append(layer)
    return due


def switch_inputs(
    layers: Sequence[LayerState],
    groups: Mapping[str, LayerGroup],
    extra: Sequence[torch.Tensor | None] | None = None,
) -> tuple[list[list[float]], list[bool], list[torch.Tensor | None]]:
    """What the switches of ``layers`` read on the host, in one device-to-host transfer:
    each layer's pair scores (a list of floats), whether its ``A`` and ``B`` are finite,
    and an ``extra`` float vector per layer (the direction policy's host_reads). Batched:
    the number of tensor operations grows with the number of groups, not of layers."""
    if not layers:
        return [], [], []
    extra = list(extra) if extra is not None else [None] * len(layers)
    scores = pair_scores(layers, groups, reduce=False)
    factors = [t for layer in layers for t in layer.target.local_factors()]
    # The largest |entry| of each A and B: finite exactly when every entry is.
    peaks = [p.float() for p in torch._foreach_norm(factors, float("inf"))]
    bad = (~torch.isfinite(torch.stack(peaks))).float().to(scores.device, non_blocking=True)
    shared = torch.cat([scores, bad])  # summed over processes where the importance is split
    _reduce_partial(layers, shared)
    own = [more.float().to(scores.device, non_blocking=True) for more in extra if more is not None]
    host = torch.cat([shared, *own]).cpu().tolist()
    n_scores = sum(layer.r for layer in layers)
    flags, rest = host[n_scores : n_scores + len(factors)], host[n_scores + len(factors) :]
    out_scores, finite, gathered = [], [], []
    at, more_at = 0, 0
    for i, (layer, more) in enumerate(zip(layers, extra, strict=True)):
        out_scores.append(host[at : at + layer.r])
        at += layer.r
        finite.append(not (flags[2 * i] or flags[2 * i + 1]))
        if more is None:
            gathered.append(None)
        else:
            gathered.append(torch.tensor(rest[more_at : more_at + more.numel()]))
            more_at += more.numel()
    return out_scores, finite, gathered


def _reduce_partial(layers: Sequence[LayerState], flat: torch.Tensor) -> None:
    """Sum ``flat`` over the processes when some layer's importance is split among them."""
    partial = next((layer for layer in layers if layer.importance.partial), None)
    if partial is not None:
        partial.target.reduce_(flat)


def mark_exhausted(layers: Iterable[LayerState]) -> list[LayerState]:
    """The layers that have just run out of unused directions (marked, so that each is
    reported once)."""
    out = []
    for layer in layers:
        if not layer.can_switch and not layer.exhausted:
            layer.exhausted = True
            out.append(layer)
    return out


def check_build_order(layers: Iterable[LayerState], pristine: bool = False) -> bool:
    """Follow layers whose kind changed since SRLoRA was built where SRLoRA's state can
    follow (:func:`~srlora.layers.current_kind`; ``pristine``: nothing trained or switched
    yet); refuse the others before anything changes. Returns whether some layer changed kind."""
    layers = list(layers)
    moved = {layer.name: new for layer in layers if (new := current_kind(layer.target)) is not None}
    split = [name for layer in layers if (new := moved.get(name := layer.name)) and layer.layout != _layout(new)]
    if split and not pristine:
        raise RuntimeError(
            f"{len(split)} adapted layer(s) (e.g. {split[0]!r}) were sharded by fully_shard after SRLoRA had trained "
            f"or switched on them whole. Build it after sharding: get_peft_model -> fully_shard (each block, then "
            f"the root) -> SRLoRA(model, config) -> optimizer -> attach (or before it, attached before the first step)."
        )
    for layer in layers:
        if layer.name in moved:
            layer.retarget(moved[layer.name])
    return bool(moved)


def _layout(target: LoraTarget) -> tuple[tuple[int, int], tuple[int, int]]:
    return target.row_span, target.pair_span


def refuse(layers: Iterable[LayerState], what: str) -> None:
    """Raise ``NotImplementedError`` with the way out when a layer's kind cannot take part in
    ``what`` (:meth:`~srlora.kinds.base.LoraTarget.refusal`)."""
    for layer in layers:
        reason = layer.target.refusal(what)
        if reason is not None:
            raise NotImplementedError(reason)
