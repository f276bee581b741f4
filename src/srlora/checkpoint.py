"""Checkpoint and exact resume of an SRLoRA run.

A checkpoint holds what a freshly built model and controller do not already have:

* every trainable parameter (LoRA ``A``/``B``, ``modules_to_save`` such as a head) and
  every buffer of the model;
* the frozen weight of each adapted layer that has switched (SRLoRA changed it). A
  layer that has not switched yet holds exactly what building the controller gives it,
  so only its fingerprint is stored, and checked on load;
* the controller's state (pointers, slot contents, importance EMAs, fused-pair record,
  history, and each layer's fingerprint of its pretrained weight), the optimizer's and the
  learning-rate scheduler's state, the step, and PyTorch's RNG states.

Writing is atomic (:mod:`srlora.atomic`): a crash or SIGKILL during the write leaves the
previous checkpoint intact, and the temporary file a killed writer left is removed by the
next save. Loading reads with ``torch.load(weights_only=True)`` (tensors and plain data
only: a checkpoint cannot run code), then checks the whole payload against the model,
controller, optimizer and scheduler before it changes any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_torch_save
from .checkpoint_io import check_method_state, read_payload, restore_rng_states, rng_states
from .controller import SRLoRA
from .errors import CheckpointError
from .optim_state import ADAM_MOMENTS, SGD_MOMENTS
from .targets import fingerprint, is_sharded_model, shard_of, write_shard_

FORMAT_VERSION = 2
STATE_FILE = "srlora_state.pt"


def _model_state(
    model: nn.Module, controller: SRLoRA, trainable: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Tensors to save: the switched frozen weights (and, with ``trainable``, every
    trainable parameter and buffer); fingerprints of the frozen weights not saved. Of a
    sharded model, what this process holds of each (:func:`~srlora.targets.shard_of`)."""
    names = {id(p): name for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    if trainable:
        for name, p in model.named_parameters():
            if p.requires_grad:
                state[name] = p.detach().cpu().clone()
        for name, b in model.named_buffers():
            state[name] = b.detach().cpu().clone()
    prints: dict[str, list[float]] = {}
    for layer in controller.layers.values():
        pname = names[id(layer.target.base_param)]
        if layer.has_switched and layer.target.writes_base_weight:  # e.g. a quantized base is never written
            state[pname] = shard_of(layer.target.base_param).detach().cpu().clone()
        else:
            prints[pname] = fingerprint(shard_of(layer.target.base_param))
    return state, prints


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

    A sharded model (FSDP2, DeepSpeed ZeRO-3) gets a folder with one file per rank, and
    every rank calls this (:mod:`srlora.checkpoint_sharded`); under ZeRO-3 pass the DeepSpeed
    engine as ``optimizer`` (its own checkpoint holds the partitions and the optimizer).

    Args:
        step: the training loop's step counter (default: the controller's).
        extra: anything else to keep beside (e.g. a data-loader position): tensors and
            plain Python data only (numbers, strings, lists, dicts), which is what a
            ``weights_only`` load accepts.
    """
    if _sharded(controller):
        from .checkpoint_sharded import save_sharded

        return save_sharded(Path(path), model, controller, optimizer, lr_scheduler, _step(controller, step), extra)
    model_state, prints = _model_state(model, controller)
    payload = {
        "format": FORMAT_VERSION,
        "step": _step(controller, step),
        "model": model_state,
        "frozen_fingerprints": prints,
        "controller": controller.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "rng": rng_states(),
        "extra": extra,
    }
    return atomic_torch_save(payload, path)


def _sharded(controller: SRLoRA) -> bool:
    return is_sharded_model([layer.target for layer in controller.layers.values()])


def _step(controller: SRLoRA, step: int | None) -> int:
    return controller.global_step if step is None else int(step)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of an srlora checkpoint file, read with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated, not a checkpoint, holds objects other
            than tensors and plain data, or is an srlora checkpoint of another format.
    """
    path = Path(path)
    payload = read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an srlora checkpoint of format {FORMAT_VERSION} (found {found!r}).")
    return payload


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

    The whole checkpoint is checked before anything is changed.

    Raises:
        CheckpointError: the file cannot be read safely, or does not fit the model (other
            layers, other base weights), the controller (other SRLoRA config), the optimizer
            (other parameter groups or shapes) or the scheduler (none saved).
    """
    if _sharded(controller):
        from .checkpoint_sharded import load_sharded

        return load_sharded(Path(path), model, controller, optimizer, lr_scheduler, restore_rng)
    payload = read_checkpoint(path)
    for key in ("model", "frozen_fingerprints", "controller", "optimizer", "lr_scheduler", "rng", "step"):
        if key not in payload:
            raise CheckpointError(f"{path}: the checkpoint has no {key!r} entry; it is incomplete.")
    check_method_state(payload, model, controller, str(path))
    _check_optimizer_state(payload["optimizer"], optimizer, str(path))
    if lr_scheduler is not None and payload["lr_scheduler"] is None:
        raise CheckpointError(
            f"{path}: saved without a learning-rate scheduler state; load it with lr_scheduler=None, or save "
            f"the scheduler with save_checkpoint(..., lr_scheduler=...)."
        )
    if restore_rng and not isinstance(payload["rng"], dict):
        raise CheckpointError(f"{path}: the checkpoint has no RNG states; load it with restore_rng=False.")

    _load_method_state(payload, model, controller)
    optimizer.load_state_dict(payload["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(payload["lr_scheduler"])
    if restore_rng:
        restore_rng_states(payload["rng"])
    return int(payload["step"])


def method_state_file(controller: SRLoRA) -> str:
    """The name of the file :func:`method_state` goes to in a framework's checkpoint folder:
    one for the model, or one per rank of a sharded model (every rank writes its own)."""
    if not _sharded(controller):
        return STATE_FILE
    import torch.distributed as dist

    return f"srlora_state.rank{dist.get_rank():05d}.pt"


def method_state(model: nn.Module, controller: SRLoRA) -> dict[str, Any]:
    """What SRLoRA adds to a framework's own checkpoint (which saves the adapter, the
    optimizer and the scheduler): the controller's state and the frozen weights it
    changed (this rank's shards of them, for a sharded model). Used by the Trainer and
    Lightning callbacks."""
    model_state, prints = _model_state(model, controller, trainable=False)
    return {
        "format": FORMAT_VERSION,
        "model": model_state,
        "frozen_fingerprints": prints,
        "controller": controller.state_dict(),
    }


def restore_method_state(path: str | Path, model: nn.Module, controller: SRLoRA) -> None:
    """Read a :func:`method_state` file (``weights_only``), check it, then load it."""
    payload = read_checkpoint(path)
    for key in ("model", "frozen_fingerprints", "controller"):
        if key not in payload:
            raise CheckpointError(f"{path}: no {key!r} entry; it is incomplete.")
    check_method_state(payload, model, controller, str(path))
    _load_method_state(payload, model, controller)


def _load_method_state(payload: dict[str, Any], model: nn.Module, controller: SRLoRA) -> None:
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    controller.load_state_dict(payload["controller"])
    for name, value in payload["model"].items():
        write_shard_(own[name], value)


def _check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, path: str) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, and the moments' shapes, made first."""
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise CheckpointError(f"{path}: the optimizer entry is not an optimizer state.")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise CheckpointError(
            f"{path}: the optimizer was saved with {len(saved['param_groups'])} parameter group(s), this one has "
            f"{len(groups)}; build the optimizer the same way as the run that saved it."
        )
    params: dict[Any, torch.Tensor] = {}
    for i, (g_saved, g_own) in enumerate(zip(saved["param_groups"], groups, strict=True)):
        if len(g_saved["params"]) != len(g_own["params"]):
            raise CheckpointError(
                f"{path}: optimizer parameter group {i} was saved with {len(g_saved['params'])} parameters, this "
                f"one has {len(g_own['params'])}; build the optimizer the same way as the run that saved it."
            )
        params.update(zip(g_saved["params"], g_own["params"], strict=True))
    for key, entry in saved["state"].items():
        param = params.get(key)
        if param is None:
            raise CheckpointError(f"{path}: the optimizer state names a parameter ({key!r}) no group holds.")
        for name, value in entry.items():
            moment = name in (*ADAM_MOMENTS, *SGD_MOMENTS)  # others (factored, scalar) have shapes of their own
            if moment and isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise CheckpointError(
                    f"{path}: optimizer state {name!r} has shape {tuple(value.shape)}, its parameter "
                    f"{tuple(param.shape)}; build the model and optimizer the same way as the run that saved it."
                )
