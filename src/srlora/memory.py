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


def tensor_bytes(obj: Any, seen: set[int] | None = None, within: str | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` whose storage is not in ``seen`` (which it
    extends): dicts, lists, tuples and the attributes of plain objects are walked, each object
    once; modules, optimizers and classes are not (the model's tensors and the optimizer's are
    counted where they belong). ``within``: walk only the attributes of objects whose class
    comes from that package (a framework's wrapper holds the world)."""
    return _walk(obj, set() if seen is None else seen, set(), within)


def _walk(obj: Any, seen: set[int], visited: set[int], within: str | None) -> int:
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        key = storage_key(local)
        if key in seen or local.numel() == 0:
            return 0
        seen.add(key)
        return local.untyped_storage().nbytes()
    if id(obj) in visited:
        return 0
    visited.add(id(obj))
    if isinstance(obj, dict):
        return sum(_walk(v, seen, visited, within) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_walk(v, seen, visited, within) for v in obj)
    if isinstance(obj, (type, nn.Module, torch.optim.Optimizer)) or not hasattr(obj, "__dict__"):
        return 0
    if within is not None and not type(obj).__module__.startswith(within):
        return 0
    return sum(_walk(v, seen, visited, within) for v in vars(obj).values())


def owned_bytes(owner: Any, model: nn.Module, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``owner``'s attributes that is not ``model``'s (its
    parameters and buffers, views of them included) nor an optimizer's, through ``owner``'s own
    package's objects only: SRLoRA's caches, EMAs, records as allocated, and its direction
    policy's sketches and scratch. ``seen``: storages counted elsewhere (extended)."""
    seen = set() if seen is None else seen
    seen |= {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    return tensor_bytes(vars(owner), seen, within="srlora")
