"""What a run keeps in memory, counted from the tensors themselves.

:func:`tensor_bytes` walks containers and the attributes of plain objects (SRLoRA's own state,
an optimizer's, GaLore's projectors) and counts each storage once and whole: a view keeps its
whole storage alive (a record allocated for ``r_target`` pairs, a projector sliced from a full
SVD factor). :meth:`srlora.SRLoRA.memory_bytes` is SRLoRA's share: every tensor it keeps beside
the model and the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def storage_key(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (a DTensor's local shard)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.untyped_storage().data_ptr()


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` whose storage is not in ``seen`` (which it
    extends): dicts, lists, tuples and the attributes of plain objects are walked; modules,
    optimizers and classes are not (the model's tensors and the optimizer's are counted where
    they belong)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        key = storage_key(local)
        if key in seen or local.numel() == 0:
            return 0
        seen.add(key)
        return local.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module, torch.optim.Optimizer)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def owned_bytes(owner: Any, model: nn.Module, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``owner``'s attributes that is not ``model``'s (its
    parameters and buffers, views of them included) nor an optimizer's: SRLoRA's caches, EMAs,
    records as allocated, and its direction policy's sketches and scratch. ``seen``: storages
    counted elsewhere (extended)."""
    seen = set() if seen is None else seen
    seen |= {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    return tensor_bytes(vars(owner), seen)
