"""The DeepSpeed ZeRO-3 kind: SRLoRA on partitioned parameters.

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

``ctl.attach(engine.optimizer)`` (or the optimizer the Trainer / accelerate hand over) hooks
the step of DeepSpeed's ZeRO optimizer, which runs once per applied step of the engine (its
inner torch optimizer runs once per sub-group, so the torch optimizer's hooks are not
used): the importance before it, from the whole gradients, the switch after it, none on a
step the fp16 loss scaler skips. By hand, the same::

    engine.backward(loss); ctl.update_importance(); engine.step(); ctl.step(engine.optimizer)

The scores see the gradients before DeepSpeed's clipping and loss-scale unscaling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..optim_state import ADAM_MOMENTS, SGD_MOMENTS, optimizer_kind
from ..record import FusedRecord
from ..svd import SVDCache
from .base import NO_GRAD, LoraTarget
from .dense import DenseTarget


def zero_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO optimizer inside ``optimizer``'s wrappers (accelerate's, the engine's
    own), or ``None``."""
    current = optimizer
    for _ in range(8):
        if current is None:
            return None
        if any(c.__name__ == "ZeROOptimizer" for c in type(current).__mro__):
            return current
        current = getattr(current, "optimizer", None)
    return None


class StepWrap:
    """``before()``, the ZeRO optimizer's own ``step``, ``after(skipped)``, installed on that
    one object (its class is untouched); :meth:`remove` restores it."""

    def __init__(self, zero: Any, before: Callable[[], Any], after: Callable[[bool], Any]) -> None:
        self.zero = zero
        original = zero.step

        def step(*args: Any, **kwargs: Any) -> Any:
            before()
            out = original(*args, **kwargs)
            after(bool(getattr(zero, "overflow", False)))
            return out

        zero.step = step

    def remove(self) -> None:
        vars(self.zero).pop("step", None)


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


@torch.no_grad()
def write_partition_(param: Any, value: torch.Tensor) -> None:
    """Put back this rank's flat partition ``value`` (as ``param.ds_tensor`` held it) of a
    ZeRO-3 parameter, so that the whole parameter is right however DeepSpeed keeps it (a
    small "persistent" parameter stays whole in ``param.data`` and would ignore a write to
    its partition): the partitions are all-gathered and rank 0 writes the whole inside a
    gather (a collective; every rank calls it for the same parameters in the same order)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    mine = value.to(param.ds_tensor.device, param.ds_tensor.dtype).flatten()
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    whole = torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
    with gathered([param], modify=True):
        if dist.get_rank() == 0:
            param.data.copy_(whole)


def partition_group(param: Any) -> Any:
    """The process group a ZeRO-3 parameter is partitioned over, where it says so
    (``ds_process_group``, which DeepSpeed's full accessors gather over), else ``None``."""
    return getattr(param, "ds_process_group", None)


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


class Zero3Target(DenseTarget):
    """A LoRA layer whose parameters are ZeRO-3 partitions: the dense kind's math, run on
    the layer gathered whole (:meth:`whole`), with DeepSpeed's accessors for gradients,
    fp32 masters and moments."""

    kind = "zero3"
    split_among_processes = True

    batches = False  # switches layer by layer

    @classmethod
    def check_module(cls, name: str, module: nn.Module, adapter: str, quantized: bool) -> None:
        if quantized or module.fan_in_fan_out:
            raise ValueError(
                f"Layer {name!r}: DeepSpeed ZeRO-3 with a quantized or Conv1D (fan_in_fan_out) layer is not supported."
            )

    @property
    def shape(self) -> tuple[int, int]:
        m, n = getattr(self.base_param, "ds_shape", self.base_param.shape)  # ZeRO-3 keeps its whole shape there
        return int(m), int(n)

    @contextlib.contextmanager
    def whole(self, modify: bool) -> Iterator[None]:
        """The layer gathered on every rank (rank 0's writes kept with ``modify``); after a
        write the new ``A`` and ``B`` go to the optimizer's fp32 masters too."""
        params = (self.base_param, self.bias, self.lora_A, self.lora_B)
        new: tuple[torch.Tensor, torch.Tensor] | None = None
        with gathered(params, modify=modify):
            yield
            if modify:
                new = (self.lora_A.detach().clone(), self.lora_B.detach().clone())
        if new is not None:
            set_master(self.lora_A, new[0])
            set_master(self.lora_B, new[1])

    def has_grad(self) -> bool:
        return True  # the gradients live in DeepSpeed's partitions, never in .grad

    def importance_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole fp32 masters and gradients (collectives: every rank calls them in the same order)."""
        A, B = self.lora_A, self.lora_B
        wA, wB = full_master(A), full_master(B)
        gA, gB = full_grad(A), full_grad(B)
        if gA is None or gB is None:
            raise RuntimeError(NO_GRAD)
        return wA, gA, wB, gB

    @classmethod
    @torch.no_grad()
    def importance_inputs_batched(
        cls, targets: Sequence[LoraTarget]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every layer's whole fp32 masters and gradients from one all-gather of this rank's
        partitions of all of them (DeepSpeed's full accessors gather each tensor on its own:
        four collectives a layer a step). ZeRO-3 partitions every tensor into equal, padded
        flat pieces, one per rank of its partition group, so the whole tensor is the ranks'
        pieces in rank order, cut to ``ds_numel``: the values DeepSpeed's accessors return.
        Layer by layer when a tensor has no optimizer yet or does not name one shared group."""
        params = [p for target in targets for p in (target.lora_A, target.lora_B)]
        if not params or not all(hasattr(p, "_z3_optimizer") for p in params):
            return super().importance_inputs_batched(targets)
        group = partition_group(params[0])
        if group is None or any(partition_group(p) is not group for p in params):
            return super().importance_inputs_batched(targets)
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

        pieces = []
        for p in params:
            grad = safe_get_local_grad(p)
            if grad is None:
                raise RuntimeError(NO_GRAD)
            # copies: an offloaded optimizer may reuse the buffer a local view points into
            pieces += [t.to(torch.float32, copy=True).flatten() for t in (safe_get_local_fp32_param(p), grad)]
        mine = torch.cat(pieces)
        world = dist.get_world_size(group=group)
        every = torch.empty(world * mine.numel(), dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(every, mine, group=group)
        every = every.view(world, mine.numel())
        whole, offset = [], 0
        for k, piece in enumerate(pieces):
            p = params[k // 2]
            whole.append(every[:, offset : offset + piece.numel()].reshape(-1)[: p.ds_numel].view(p.ds_shape))
            offset += piece.numel()
        # per layer: (A master, A grad, B master, B grad)
        return [tuple(whole[4 * i : 4 * i + 4]) for i in range(len(targets))]  # type: ignore[misc]

    def optimizer_tensors(self) -> tuple[torch.Tensor, ...]:
        return ()  # DeepSpeed's optimizer holds flat partitions, not these tensors

    @property
    def seeds_moments(self) -> bool:
        return False  # the per-tensor step count seeding needs is not exposed per parameter

    def zero_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        keys = ADAM_MOMENTS[:2] if optimizer_kind(optimizer) == "adam" else SGD_MOMENTS
        zero_moments(self.lora_A, slots, 0, keys)
        zero_moments(self.lora_B, slots, 1, keys)

    def seed_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        pass

    @classmethod
    def step_hooks(cls, optimizer: Any, before: Callable[[], Any], after: Callable[[bool], Any]) -> list[Any] | None:
        """Around the step of DeepSpeed's ZeRO optimizer (one call per applied step of the
        engine, at the gradient-accumulation boundary; its inner torch optimizer runs once per
        sub-group): the whole gradients exist before it, and ``optimizer.overflow`` says
        whether the loss scaler skipped it."""
        zero = zero_optimizer(optimizer)
        if zero is None:
            raise ValueError(
                f"Under DeepSpeed ZeRO-3 attach SRLoRA to the engine's optimizer (engine.optimizer, or what the "
                f"Trainer / accelerate hand you); got a {type(optimizer).__name__} with no ZeRO optimizer inside."
            )
        return [StepWrap(zero, before, after)]

    @torch.no_grad()
    def merge_adapter_(self) -> None:
        """``W += s B A`` on the gathered layer (rank 0's write kept, then partitioned again)."""
        with gathered((self.base_param, self.lora_A, self.lora_B), modify=True):
            DenseTarget.merge_adapter_(self)

    @torch.no_grad()
    def total_update_factors(
        self, cache: SVDCache, used: torch.Tensor, record: FusedRecord, entered: FusedRecord | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense factors, from ``A`` and ``B`` gathered (the records and the cache are
        whole on every rank); a collective."""
        with gathered((self.lora_A, self.lora_B), modify=False):
            return DenseTarget.total_update_factors(self, cache, used, record, entered)
