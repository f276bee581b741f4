"""Reading a checkpoint file safely, checking what it holds against the model, and the RNG
states a checkpoint keeps (shared by one process's checkpoints and sharded ones)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CheckpointError
from .targets import fingerprint, same_fingerprint, shard_of

if TYPE_CHECKING:
    from .controller import SRLoRA


def read_payload(path: str | Path) -> Any:
    """What ``path`` holds, read with ``torch.load(weights_only=True)`` (tensors and plain data
    only: a checkpoint cannot run code).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated, not a checkpoint, or holds objects other
            than tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file there.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused: not a checkpoint, or it holds objects other than tensors and plain data, which "
            f"an srlora checkpoint never does and which could run code when loaded ({reason[:200]})."
        ) from exc
    except Exception as exc:  # truncated zip, empty file, random bytes: each library raises its own
        raise CheckpointError(
            f"{path}: not a readable checkpoint (empty, truncated or another kind of file: "
            f"{type(exc).__name__}: {str(exc)[:200]})."
        ) from exc


def rng_states() -> dict[str, Any]:
    """This process's RNG states: PyTorch's (CPU and CUDA) and Python's."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def restore_rng_states(rng: dict[str, Any]) -> None:
    """Restore :func:`rng_states` (a round trip through a file may turn tuples into lists)."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def check_method_state(payload: dict[str, Any], model: nn.Module, controller: SRLoRA, path: str) -> None:
    """Raise :class:`CheckpointError` (changing nothing) when the tensors and controller state
    of ``payload`` do not fit ``model`` and ``controller`` (this process's shard of each
    tensor, when the model is sharded)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    unknown = sorted(set(payload["model"]) - set(own))
    if unknown:
        raise CheckpointError(f"{path}: it has tensors this model lacks: {unknown[:4]}; build the model the same way.")
    for name, value in payload["model"].items():
        if tuple(shard_of(own[name]).shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(shard_of(own[name]).shape)}; build "
                f"the model (and its LoRA config and sharding) the same way as the run that saved it."
            )
    for name, saved in payload["frozen_fingerprints"].items():
        if name not in own or not same_fingerprint(saved, fingerprint(shard_of(own[name]))):
            raise CheckpointError(
                f"{path}: the frozen weight {name!r} differs from the one the checkpoint was saved against; "
                f"build the model from the same pretrained weights, LoRA config and SRLoRA config."
            )
    try:
        controller.check_state_dict(payload["controller"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
