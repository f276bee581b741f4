"""The DeepSpeed ZeRO-1 / ZeRO-2 kind: whole weights, partitioned optimizer (and gradients).

Under ZeRO stage 1 or 2 every rank holds the whole model, but the float32 master weights and
the optimizer's moments are flat partitions (and, at stage 2, so are the gradients: a
parameter's ``.grad`` is gone after the backward). DeepSpeed links each parameter to its
fragment (``param._hp_mapping``), and SRLoRA reaches them through its public accessors:

* the PiSSA initialisation and a switch are the dense kind's, on the whole weights every rank
  holds (each rank computes the same writes); the new ``A`` and ``B`` are then written to the
  float32 masters (``safe_set_full_fp32_param``), which the next step copies back;
* the scores read the whole gradients (``safe_get_full_grad``, a collective);
* the recycled slices' moments are zeroed through ``safe_get/set_full_optimizer_state``
  (``optimizer_reset="seed"`` acts as ``"zero"``, as under ZeRO-3);
* ``attach`` hooks the step of DeepSpeed's ZeRO optimizer (:class:`~srlora.kinds.zero3.StepWrap`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..optim_state import ADAM_MOMENTS, SGD_MOMENTS, optimizer_kind
from ..svd import SVDCache
from .base import NO_GRAD
from .dense import DenseTarget
from .zero3 import StepWrap, zero_optimizer


def is_linked(t: Any) -> bool:
    """``t`` is a parameter DeepSpeed's ZeRO-1/2 (or bf16) optimizer links to a fragment."""
    return hasattr(t, "_hp_mapping")


def _has_fragment(param: Any) -> bool:
    return getattr(param, "_hp_mapping", None) is not None


class Zero12Target(DenseTarget):
    """A LoRA layer whose weights are whole on every rank and whose masters, moments and (at
    stage 2) gradients DeepSpeed's ZeRO-1/2 optimizer partitions (see the module doc)."""

    kind = "zero12"
    split_among_processes = True

    batches = False  # the masters are reached parameter by parameter

    def _set_masters(self) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        for param in (self.lora_A, self.lora_B):
            if is_linked(param):
                safe_set_full_fp32_param(param, param.detach().float())

    @torch.no_grad()
    def pissa_init_(self, cache: SVDCache) -> None:
        super().pissa_init_(cache)
        self._set_masters()

    @torch.no_grad()
    def switch_pairs_(
        self, slots: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = super().switch_pairs_(slots, U, S, V)
        self._set_masters()
        return out

    def has_grad(self) -> bool:
        return True  # the gradients live in DeepSpeed's partitions

    def importance_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        A, B = self.lora_A, self.lora_B
        gA, gB = safe_get_full_grad(A), safe_get_full_grad(B)
        if gA is None or gB is None:
            raise RuntimeError(NO_GRAD)
        return A, gA.to(A.device), B, gB.to(B.device)

    def optimizer_tensors(self) -> tuple[torch.Tensor, ...]:
        return ()  # DeepSpeed's optimizer holds flat partitions, not these tensors

    @property
    def seeds_moments(self) -> bool:
        return False

    def zero_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

        keys = ADAM_MOMENTS[:2] if optimizer_kind(optimizer) == "adam" else SGD_MOMENTS
        for param, dim in ((self.lora_A, 0), (self.lora_B, 1)):
            if not is_linked(param):
                continue
            for key in keys:
                value = safe_get_full_optimizer_state(param, key)  # a collective: every rank calls it
                if value is None:
                    continue
                index: list[Any] = [slice(None)] * value.dim()
                index[dim] = slots.to(value.device)
                value = value.clone()
                value[tuple(index)] = 0.0
                safe_set_full_optimizer_state(param, value, key)

    def seed_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        pass

    @classmethod
    def step_hooks(cls, optimizer: Any, before: Callable[[], Any], after: Callable[[bool], Any]) -> list[Any] | None:
        zero = zero_optimizer(optimizer)
        if zero is None:
            raise ValueError(
                f"Under DeepSpeed ZeRO-1/2 attach SRLoRA to the engine's optimizer (engine.optimizer, or what the "
                f"Trainer / accelerate hand you); got a {type(optimizer).__name__} with no ZeRO optimizer inside."
            )
        return [StepWrap(zero, before, after)]
