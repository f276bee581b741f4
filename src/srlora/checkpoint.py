"""Checkpoint and exact resume of an SRLoRA run.

A checkpoint holds what a freshly built model and controller do not already have:

* every trainable parameter (LoRA ``A``/``B``, ``modules_to_save`` such as a head) and
  every buffer of the model;
* the frozen weight of each adapted layer that has switched (SRLoRA changed it). A
  layer that has not switched yet holds exactly what building the controller gives it,
  so only a checksum is stored, and checked on load;
* the controller's state (pointers, slot contents, importance EMAs, fused-pair record,
  history), the optimizer's and the learning-rate scheduler's state, the step, and
  PyTorch's RNG states.

The file is written to a temporary name in the same folder, flushed to disk, then
renamed over the target: a crash or SIGKILL during the write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_torch_save
from .controller import SRLoRA

FORMAT_VERSION = 1


def _checksum(t: torch.Tensor) -> list[float]:
    x = t.detach().double()
    return [float(x.sum()), float(x.abs().sum()), float(x.flatten()[:: max(1, x.numel() // 97)].sum())]


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _model_state(
    model: nn.Module, controller: SRLoRA, trainable: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Tensors to save: the switched frozen weights (and, with ``trainable``, every
    trainable parameter and buffer); checksums of the frozen weights not saved."""
    names = _param_names(model)
    state: dict[str, torch.Tensor] = {}
    if trainable:
        for name, p in model.named_parameters():
            if p.requires_grad:
                state[name] = p.detach().cpu().clone()
        for name, b in model.named_buffers():
            state[name] = b.detach().cpu().clone()
    checksums: dict[str, list[float]] = {}
    for layer in controller.layers.values():
        pname = names[id(layer.target.base_param)]
        if layer.has_switched:
            state[pname] = layer.target.base_param.detach().cpu().clone()
        else:
            checksums[pname] = _checksum(layer.target.base_param)
    return state, checksums


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    controller: SRLoRA,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any = None,
    step: int | None = None,
    extra: dict[str, Any] | None = None,
) -> int:
    """Write a checkpoint atomically; returns its size in bytes.

    Args:
        step: the training loop's step counter (default: the controller's).
        extra: anything else picklable to keep beside (e.g. a data-loader position).
    """
    model_state, checksums = _model_state(model, controller)
    payload = {
        "format": FORMAT_VERSION,
        "step": controller.global_step if step is None else int(step),
        "model": model_state,
        "frozen_checksums": checksums,
        "controller": controller.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(),
        },
        "extra": extra,
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    controller: SRLoRA,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any = None,
    restore_rng: bool = True,
) -> int:
    """Restore a checkpoint into a model, controller and optimizer built the same way as
    the run that saved it; returns the saved step.

    Raises:
        ValueError: the checkpoint does not fit the model (other layers, other base
            weights, other SRLoRA config).
    """
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    restore_model_and_controller(payload, model, controller, str(path))
    optimizer.load_state_dict(payload["optimizer"])
    if lr_scheduler is not None:
        if payload["lr_scheduler"] is None:
            raise ValueError(f"{path}: saved without a learning-rate scheduler state.")
        lr_scheduler.load_state_dict(payload["lr_scheduler"])
    if restore_rng:
        torch.set_rng_state(payload["rng"]["torch"])
        if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        random.setstate(payload["rng"]["python"])
    return int(payload["step"])


def method_state(model: nn.Module, controller: SRLoRA) -> dict[str, Any]:
    """What SRLoRA adds to a framework's own checkpoint (which saves the adapter, the
    optimizer and the scheduler): the controller's state and the frozen weights it
    changed. Used by the Trainer and Lightning callbacks."""
    model_state, checksums = _model_state(model, controller, trainable=False)
    return {
        "format": FORMAT_VERSION,
        "model": model_state,
        "frozen_checksums": checksums,
        "controller": controller.state_dict(),
    }


def restore_model_and_controller(payload: dict[str, Any], model: nn.Module, controller: SRLoRA, path: str) -> None:
    """Check ``payload`` against the model, then load its tensors and controller state."""
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: not an srlora checkpoint (format {payload.get('format')!r}).")
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    unknown = sorted(set(payload["model"]) - set(own))
    if unknown:
        raise ValueError(
            f"{path}: checkpoint has tensors this model lacks: {unknown[:4]}; build the model the same way."
        )
    for name, checksum in payload["frozen_checksums"].items():
        if name not in own or _checksum(own[name]) != checksum:
            raise ValueError(
                f"{path}: the frozen weight {name!r} differs from the one the checkpoint was saved against; "
                f"build the model from the same pretrained weights, LoRA config and SRLoRA config."
            )
    controller.load_state_dict(payload["controller"])
    with torch.no_grad():
        for name, value in payload["model"].items():
            target = own[name]
            if target.shape != value.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(target.shape)}.")
            target.copy_(value)
