"""DeepSpeed ZeRO-3: SRLoRA on partitioned parameters.

ZeRO-3 keeps every parameter as a flat partition per rank (``ds_id``, ``ds_shape``); the
module's tensor is empty outside DeepSpeed's own gathers, the gradients live in the
optimizer's fp32 partitions, and so do the fp32 master weights and the Adam moments.
SRLoRA reaches them through DeepSpeed's public accessors:

* the SVD and the PiSSA split, and each switch, run inside
  ``deepspeed.zero.GatheredParameters(..., modifier_rank=0)`` (all ranks see the whole
  layer; rank 0's writes are kept), then the new ``A`` and ``B`` are written to the fp32
  masters (``safe_set_full_fp32_param``) when an optimizer holds them;
* the scores read whole gradients and master weights (``safe_get_full_grad``,
  ``safe_get_full_fp32_param``): every rank holds the same full-size EMAs;
* the recycled slices' moments are zeroed through ``safe_get/set_full_optimizer_state``.
  ``optimizer_reset="seed"`` acts as ``"zero"`` here: seeding needs the per-tensor step
  count, which DeepSpeed's flat partitions do not expose per parameter.

Under ZeRO-3 SRLoRA is driven by hand around the engine, whose ``step`` calls the inner
optimizer once per sub-group (so optimizer hooks could fire several times a step)::

    engine.backward(loss); ctl.update_importance(); engine.step(); ctl.step()

The scores then see the gradients before DeepSpeed's clipping and loss-scale unscaling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def is_partitioned(t: Any) -> bool:
    """``t`` is a ZeRO-3 partitioned parameter."""
    return hasattr(t, "ds_id") or hasattr(t, "ds_numel")


@contextlib.contextmanager
def gathered(params: Iterable[Any], modify: bool) -> Iterator[None]:
    """Whole ``params`` on every rank inside the block; with ``modify`` rank 0's writes are
    kept (and broadcast when DeepSpeed partitions them again). Nothing to do unless some
    are partitioned."""
    params = [p for p in params if p is not None]
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def full_grad(param: Any) -> torch.Tensor | None:
    """The whole fp32 gradient of a partitioned parameter (a collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


def full_master(param: Any) -> torch.Tensor:
    """The whole fp32 master weight (the value the optimizer steps), or the gathered
    parameter before an optimizer holds it."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param) if hasattr(param, "_z3_optimizer") else None
    if value is None:
        with gathered([param], modify=False):
            value = param.detach().float().clone()
    return value


def set_master(param: Any, value: torch.Tensor) -> None:
    """Write ``value`` to the fp32 master of ``param`` when an optimizer holds one (the
    module's copy was written inside :func:`gathered`)."""
    if hasattr(param, "_z3_optimizer"):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.float())


def zero_moments(param: Any, index: torch.Tensor, dim: int, keys: Iterable[str]) -> None:
    """Zero slices ``index`` along ``dim`` of the optimizer state ``keys`` of ``param``."""
    if not hasattr(param, "_z3_optimizer"):
        return  # no optimizer (yet): no state to reset
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    for key in keys:
        value = safe_get_full_optimizer_state(param, key)
        if value is None:
            continue
        select: list[Any] = [slice(None)] * value.dim()
        select[dim] = index.to(value.device)
        value = value.clone()
        value[tuple(select)] = 0.0
        safe_set_full_optimizer_state(param, value, key)
