"""Optimizer-state surgery for recycled pairs (SPEC section 3, step 5).

A recycled pair is a new direction; momentum left over from the fused one would push
it along the old one's history. At a switch the recycled rows of ``A`` and columns of
``B`` get their Adam/AdamW moments (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and
SGD momentum (``momentum_buffer``) set to zero.

Zeroing alone has a catch. PyTorch's Adam keeps one step count per tensor, so late in
training its bias corrections are ~1, and an entry whose moments were just zeroed takes
a first step of ``lr * (1 - beta1) g / sqrt((1 - beta2) g^2) ~= 3.2 lr`` (betas 0.9,
0.999), about three times a settled step. The ``"seed"`` remedy fixes that without a
forked optimizer: at the next optimizer step, before Adam runs, the second moment of
each recycled entry is set from that entry's own gradient ``g``::

    v_prev = g^2 (1 - beta2^t)        (t = the tensor's step count so far)

which is exactly the value for which Adam's bias-corrected ``v_hat`` equals ``g^2`` after
the update, as it would for a freshly created Adam. The first moment stays zero, so the
entry's first step is ``~ (1 - beta1) lr`` and grows to a full step over
``~1 / (1 - beta1)`` steps: a per-entry learning-rate warm-up.

:class:`OptimizerStateReset` is the policy object: the controller tells it of each
switch (:meth:`~OptimizerStateReset.on_switch`) and of each coming optimizer step
(:meth:`~OptimizerStateReset.before_step`); it owns the slots waiting for their seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .devices import to_device
from .errors import UnsupportedOptimizerWarning
from .sharding import is_sharded, local, local_index, row_span
from .zero3 import is_partitioned
from .zero3 import zero_moments as zero3_zero_moments

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SGD_MOMENTS = ("momentum_buffer",)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of accelerate's (``AcceleratedOptimizer``),
    Lightning's or DeepSpeed's wrappers: the one whose ``step`` really runs and whose
    ``state`` holds the moments."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    return optimizer


def require_params(optimizer: torch.optim.Optimizer, params: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
    """Raise ``ValueError`` unless ``optimizer`` holds every tensor of ``params`` (by layer).
    (ZeRO-3 parameters are held by DeepSpeed's optimizer through flat partitions: not checked.)"""
    params = {k: v for k, v in params.items() if not any(is_partitioned(t) for t in v)}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, tensors in params.items() if any(id(t) not in held for t in tensors)]
    if missing:
        raise ValueError(
            f"This {type(optimizer).__name__} does not hold the LoRA parameters of {len(missing)} of "
            f"{len(params)} layers (e.g. {missing[0]!r}), so SRLoRA could not reset their optimizer state "
            f"at a switch. Pass the optimizer that trains them, built after SRLoRA(...) from "
            f"[p for p in model.parameters() if p.requires_grad]."
        )


def run_before_step(update: Callable[[], Any], args: tuple, kwargs: dict) -> Any:
    """An optimizer step pre-hook's body: run ``update`` with the gradients this step applies.

    With ``optimizer.step(closure)`` the gradients exist only once the closure has run
    (Lightning's closure runs backward and clipping), so the closure is wrapped to run
    ``update`` right after it, still before the parameters move. Returns what a pre-hook
    returns: ``None``, or the new ``(args, kwargs)``; torch passes ``step()``'s positional
    arguments with the optimizer itself first.
    """
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        update()
        return None

    def closure_then_update() -> Any:
        result = closure()
        update()
        return result

    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure_then_update}
    return (args[0], closure_then_update, *args[2:]), kwargs


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """``"adam"`` (Adam, AdamW), ``"sgd"`` or ``"other"``."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    return "other"


def _select(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> tuple[slice | torch.Tensor, ...]:
    key: list[slice | torch.Tensor] = [slice(None)] * tensor.dim()
    key[dim] = to_device(index, tensor.device)
    return tuple(key)


def _local_select(param: torch.Tensor, index: torch.Tensor, dim: int) -> tuple[slice | torch.Tensor, ...]:
    """The key of slices ``index`` along ``dim`` in this rank's shard of ``param`` (and of
    anything shaped like it): under FSDP2 the first dimension is split, so only the indices
    this rank holds, shifted to its rows, remain."""
    if dim == 0 and is_sharded(param):
        _, index = local_index(index, row_span(param))
    return _select(local(param), index, dim)


@torch.no_grad()
def zero_moments_(optimizer: torch.optim.Optimizer, param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    """Zero the moments of ``param``'s slices ``index`` along ``dim``; other entries untouched.

    A parameter the optimizer has not stepped yet has no state and nothing to reset.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    select = _local_select(param, index, dim)
    for key in (*ADAM_MOMENTS, *SGD_MOMENTS):
        buf = state.get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            local(buf)[select] = 0.0


def _param_group(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("parameter is not in this optimizer; pass the optimizer that trains the LoRA parameters.")


@torch.no_grad()
def seed_second_moment_(optimizer: torch.optim.Optimizer, param: torch.Tensor, index: torch.Tensor, dim: int) -> bool:
    """Set Adam's ``exp_avg_sq`` of slices ``index`` to ``grad^2 (1 - beta2^t)``; see the module doc.

    Returns ``False`` (doing nothing) when the optimizer is not Adam/AdamW or the
    parameter has no state or no gradient yet.
    """
    if optimizer_kind(optimizer) != "adam" or param.grad is None:
        return False
    state = optimizer.state.get(param)
    if not state or "exp_avg_sq" not in state:
        return False
    beta2 = _param_group(optimizer, param)["betas"][1]
    # 1 - beta2^t computed where the step count lives, as a tensor: no host sync (t may be
    # a device tensor under capturable/fused Adam).
    step = local(state["step"])
    exp_avg_sq = local(state["exp_avg_sq"])
    t = step.to(torch.float64) if isinstance(step, torch.Tensor) else torch.tensor(float(step), dtype=torch.float64)
    b2 = beta2.to(torch.float64) if isinstance(beta2, torch.Tensor) else torch.tensor(float(beta2), dtype=torch.float64)
    bias = to_device((1.0 - b2.to(t.device) ** t).to(exp_avg_sq.dtype), exp_avg_sq.device)
    key = _local_select(param, index, dim)
    seeded = local(param.grad)[key].to(exp_avg_sq.dtype).square().mul_(bias)
    exp_avg_sq[key] = seeded
    if isinstance(state.get("max_exp_avg_sq"), torch.Tensor):
        local(state["max_exp_avg_sq"])[key] = seeded
    return True


class OptimizerStateReset:
    """The ``optimizer_reset`` policy (``"seed"``, ``"zero"`` or ``"none"``) for one controller.

    It is bound to the optimizer that trains the LoRA parameters (:meth:`bind`). At a
    switch it zeroes the recycled slices' moments; under ``"seed"`` with Adam/AdamW it
    remembers those slots (on the host, so that checking for them costs no device sync)
    and seeds their second moment just before the next optimizer step.
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("seed", "zero", "none"):
            raise ValueError(f"optimizer_reset must be 'seed', 'zero' or 'none', got {mode!r}.")
        self.mode = mode
        self.optimizer: torch.optim.Optimizer | None = None
        self.kind: str | None = None
        self.pending: dict[str, set[int]] = {}
        self.warned = False

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` from now on (warned once when its state layout is unknown)."""
        self.optimizer = optimizer
        self.kind = optimizer_kind(optimizer)
        if self.kind == "other" and self.mode != "none" and not self.warned:
            self.warned = True
            warn_unsupported(optimizer)

    def unbind(self) -> None:
        self.optimizer = None
        self.kind = None

    def on_switch(self, key: str, lora_A: torch.Tensor, lora_B: torch.Tensor, slots: torch.Tensor) -> None:
        """Pairs ``slots`` (rows of ``A (r, n)``, columns of ``B (m, r)``) were recycled."""
        if self.optimizer is None or self.mode == "none" or self.kind == "other":
            return
        if is_partitioned(lora_A):  # ZeRO-3: through DeepSpeed's accessors; "seed" acts as "zero"
            keys = ADAM_MOMENTS[:2] if self.kind == "adam" else SGD_MOMENTS
            zero3_zero_moments(lora_A, slots, 0, keys)
            zero3_zero_moments(lora_B, slots, 1, keys)
            return
        zero_moments_(self.optimizer, lora_A, slots, dim=0)
        zero_moments_(self.optimizer, lora_B, slots, dim=1)
        if self.mode == "seed" and self.kind == "adam":
            self.pending.setdefault(key, set()).update(int(k) for k in slots.tolist())

    def before_step(self, params: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Seed the second moment of the pending slots from the gradients about to be
        applied; ``params[key]`` is the layer's ``(A, B)``."""
        if not self.pending or self.optimizer is None:
            return
        for key in list(self.pending):
            lora_A, lora_B = params[key]
            if lora_A.grad is None:
                continue  # this layer takes no step now; seed at its next one
            slots = torch.tensor(sorted(self.pending.pop(key)), dtype=torch.long)
            seed_second_moment_(self.optimizer, lora_A, slots, dim=0)
            seed_second_moment_(self.optimizer, lora_B, slots, dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"pending": {k: sorted(v) for k, v in self.pending.items() if v}, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = {str(k): {int(x) for x in v} for k, v in state["pending"].items()}
        self.warned = bool(state.get("warned", False))


def warn_unsupported(optimizer: torch.optim.Optimizer) -> None:
    warnings.warn(
        f"SRLoRA resets the optimizer state of recycled pairs for Adam, AdamW and SGD only; "
        f"{type(optimizer).__name__} keeps the old pairs' state for the new directions. "
        f"Use one of those optimizers, or set optimizer_reset='none' to silence this warning.",
        UnsupportedOptimizerWarning,
        stacklevel=4,
    )
