"""Reading a checkpoint file safely, and the RNG states a checkpoint keeps."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


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
