"""Operations over many layers at once: what a switch step reads on the host in one
device-to-host transfer (and, under FSDP2, one all-reduce), the adaptive trigger's scores,
and the checks that apply to every layer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .layer_state import LayerState
from .sharding import all_reduce_, local


def adaptive_due(layers: Sequence[LayerState], step: int) -> list[LayerState]:
    """The layers whose adaptive trigger fires after optimizer step ``step`` and whose
    schedule allows a switch then; every layer's scores reach the host in one transfer."""
    flat = torch.cat([layer.importance.pair_scores().float() for layer in layers])
    if any(layer.importance.partial for layer in layers):
        all_reduce_(flat, like=layers[0].target.lora_A)
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
        A, B = local(layer.target.lora_A), local(layer.target.lora_B)
        bad = (~torch.isfinite(A)).any() | (~torch.isfinite(B)).any()
        for piece in (layer.importance.pair_scores().float(), bad.float().reshape(1)):
            shared.append(piece.to(device, non_blocking=True))
            sizes.append(piece.numel())
    flat = torch.cat(shared)
    if any(layer.importance.partial for layer in layers):
        all_reduce_(flat, like=layers[0].target.lora_A)
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


def check_build_order(layers: Iterable[LayerState]) -> None:
    """Refuse layers that ``fully_shard`` split after SRLoRA was built (its state is shaped
    for the whole layers it saw)."""
    moved = [layer.name for layer in layers if layer.target.sharded != layer.sharded]
    if moved:
        raise RuntimeError(
            f"{len(moved)} adapted layer(s) (e.g. {moved[0]!r}) were sharded by fully_shard after SRLoRA was "
            f"built. Build it after sharding: get_peft_model -> fully_shard (each block, then the root) -> "
            f"SRLoRA(model, config) -> optimizer -> attach."
        )


def refuse_sharded(layers: Iterable[LayerState], what: str) -> None:
    """``what`` needs whole layers: refused under FSDP2 and ZeRO-3 with the way out."""
    if any(layer.target.sharded or layer.target.zero3 for layer in layers):
        raise NotImplementedError(
            f"{what} needs the whole layers, and this model is sharded (FSDP2 or DeepSpeed ZeRO-3). Save the model "
            f"and optimizer with the framework's own checkpoint (torch.distributed.checkpoint, engine.save_checkpoint) "
            f"and SRLoRA's state with torch.save(ctl.state_dict()) on every rank, or gather the model (a full state "
            f"dict) and use an unsharded copy."
        )
