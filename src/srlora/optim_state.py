"""Optimizer-state surgery for recycled pairs (docs/METHOD.md section 3, the optimizer state).

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
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .devices import to_device
from .errors import UnsupportedOptimizerWarning

if TYPE_CHECKING:
    from .kinds.base import LoraTarget

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SGD_MOMENTS = ("momentum_buffer",)
_DS_ADAMS = ("FusedAdam", "DeepSpeedCPUAdam")  # the same moments, by the same names


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of accelerate's (``AcceleratedOptimizer``),
    Lightning's or DeepSpeed's wrappers (through a ZeRO optimizer, which is not one): the
    one whose ``step`` really runs and whose ``state`` holds the moments."""
    found = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    current = optimizer
    for _ in range(8):
        current = getattr(current, "optimizer", None)
        if current is None:
            break
        if isinstance(current, torch.optim.Optimizer):
            found = current
    if found is None:
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    return found


def require_params(optimizer: torch.optim.Optimizer, params: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
    """Raise ``ValueError`` unless ``optimizer`` holds every tensor of ``params`` (by layer;
    a layer whose kind names no tensor, such as ZeRO-3's flat partitions, is not checked)."""
    params = {k: v for k, v in params.items() if v}
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
    """``"adam"`` (Adam, AdamW, DeepSpeed's Adams), ``"sgd"`` or ``"other"``."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or type(optimizer).__name__ in _DS_ADAMS:
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    return "other"


def select(param: torch.Tensor, index: torch.Tensor, dim: int) -> tuple[slice | torch.Tensor, ...]:
    """The key of slices ``index`` along ``dim`` of ``param`` (and of anything shaped like it)."""
    key: list[slice | torch.Tensor] = [slice(None)] * param.dim()
    key[dim] = to_device(index, param.device)
    return tuple(key)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.no_grad()
def zero_moments_(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    key: tuple[slice | torch.Tensor, ...],
    view: Callable[[torch.Tensor], torch.Tensor] = _same,
) -> None:
    """Zero the moments of ``param`` at ``key``; other entries untouched.

    ``view`` gives the storage a key indexes (a sharded kind's local shard). A parameter the
    optimizer has not stepped yet has no state and nothing to reset.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for name in (*ADAM_MOMENTS, *SGD_MOMENTS):
        buf = state.get(name)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            view(buf)[key] = 0.0


def _param_group(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("parameter is not in this optimizer; pass the optimizer that trains the LoRA parameters.")


@torch.no_grad()
def seed_second_moment_(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    key: tuple[slice | torch.Tensor, ...],
    view: Callable[[torch.Tensor], torch.Tensor] = _same,
) -> bool:
    """Set Adam's ``exp_avg_sq`` of ``param`` at ``key`` to ``grad^2 (1 - beta2^t)``; see the module doc.

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
    step = view(state["step"]) if isinstance(state["step"], torch.Tensor) else state["step"]
    exp_avg_sq = view(state["exp_avg_sq"])
    t = step.to(torch.float64) if isinstance(step, torch.Tensor) else torch.tensor(float(step), dtype=torch.float64)
    b2 = beta2.to(torch.float64) if isinstance(beta2, torch.Tensor) else torch.tensor(float(beta2), dtype=torch.float64)
    bias = to_device((1.0 - b2.to(t.device) ** t).to(exp_avg_sq.dtype), exp_avg_sq.device)
    seeded = view(param.grad)[key].to(exp_avg_sq.dtype).square().mul_(bias)
    exp_avg_sq[key] = seeded
    if isinstance(state.get("max_exp_avg_sq"), torch.Tensor):
        view(state["max_exp_avg_sq"])[key] = seeded
    return True


@torch.no_grad()
def zero_moments_batched_(optimizer: torch.optim.Optimizer, targets: Sequence[LoraTarget], keep: torch.Tensor) -> None:
    """:func:`zero_moments_` of the recycled slices of many layers in one ``_foreach`` product:
    ``keep (L, r)`` is 0 at each layer's recycled pairs (rows of ``A``, columns of ``B``), 1
    elsewhere. For layers whose kind batches (whole parameters in this process)."""
    moments, masks = [], []
    for target, k_A, k_B in zip(targets, keep[:, :, None].unbind(0), keep[:, None, :].unbind(0), strict=True):
        for param, mask in ((target.lora_A, k_A), (target.lora_B, k_B)):
            state = optimizer.state.get(param)
            for name in (*ADAM_MOMENTS, *SGD_MOMENTS) if state else ():
                buf = state.get(name)
                if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
                    moments.append(buf)
                    masks.append(mask)
    if moments:
        torch._foreach_mul_(moments, masks)


@torch.no_grad()
def seed_second_moments_batched_(
    optimizer: torch.optim.Optimizer, targets: Sequence[LoraTarget], recycled: torch.Tensor
) -> None:
    """:func:`seed_second_moment_` of many layers at once: ``recycled (L, r)`` is 1 at each
    layer's pairs waiting for their seed (their second moments are 0 since the switch), and
    ``exp_avg_sq += recycled * grad^2 (1 - beta2^t)`` in a few ``_foreach`` operations."""
    if optimizer_kind(optimizer) != "adam":
        return
    params, masks, steps, betas = [], [], [], []
    for target, r_A, r_B in zip(targets, recycled[:, :, None].unbind(0), recycled[:, None, :].unbind(0), strict=True):
        for param, mask in ((target.lora_A, r_A), (target.lora_B, r_B)):
            state = optimizer.state.get(param)
            if param.grad is None or not state or "exp_avg_sq" not in state:
                continue
            params.append(param)
            masks.append(mask)
            steps.append(state["step"])
            betas.append(float(_param_group(optimizer, param)["betas"][1]))
    if not params:
        return
    # 1 - beta2^t per parameter, in float64 as the one-layer path computes it, then in the
    # moments' dtype; one host-to-device copy for all.
    t = torch.stack([x if isinstance(x, torch.Tensor) else torch.tensor(float(x)) for x in steps]).double()
    bias = 1.0 - torch.tensor(betas, dtype=torch.float64, device=t.device) ** t
    moment = optimizer.state[params[0]]["exp_avg_sq"]
    factors = to_device(bias.to(moment.dtype), moment.device).unbind(0)
    grads = [p.grad for p in params]
    seeded = torch._foreach_mul(grads, grads)  # type: ignore[arg-type]
    torch._foreach_mul_(seeded, list(factors))
    torch._foreach_mul_(seeded, masks)
    exp_avg_sq = [optimizer.state[p]["exp_avg_sq"] for p in params]
    torch._foreach_add_(exp_avg_sq, seeded)
    amsgrad = [(optimizer.state[p].get("max_exp_avg_sq"), x) for p, x in zip(params, seeded, strict=True)]
    amsgrad = [(m, x) for m, x in amsgrad if isinstance(m, torch.Tensor)]
    if amsgrad:
        torch._foreach_add_([m for m, _ in amsgrad], [x for _, x in amsgrad])


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
        self.optimizer_kind: str | None = None
        self.pending: dict[str, set[int]] = {}
        self.warned = False

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` from now on (warned once when its state layout is unknown)."""
        self.optimizer = optimizer
        self.optimizer_kind = optimizer_kind(optimizer)
        if self.optimizer_kind == "other" and self.mode != "none" and not self.warned:
            self.warned = True
            warn_unsupported(optimizer)

    def unbind(self) -> None:
        self.optimizer = None
        self.optimizer_kind = None

    def on_switch(self, keys: Sequence[str], targets: Sequence[LoraTarget], slots: torch.Tensor) -> None:
        """Pairs ``slots[i]`` (rows of ``A (r, n)``, columns of ``B (m, r)``; ``slots (L, r')``
        on the host) of layers ``targets`` (of one kind, named ``keys``) were recycled: their
        moments are zeroed (by the kind, batched where it can), and under ``"seed"`` they wait
        for their seed."""
        if self.optimizer is None or self.mode == "none" or self.optimizer_kind == "other":
            return
        type(targets[0]).zero_moments_batched_(self.optimizer, targets, slots)
        if self.mode == "seed" and self.optimizer_kind == "adam":
            for key, target, row in zip(keys, targets, slots.tolist(), strict=True):
                if target.seeds_moments:
                    self.pending.setdefault(key, set()).update(int(k) for k in row)

    def before_step(self, targets: Mapping[str, LoraTarget]) -> None:
        """Seed the second moment of the pending slots from the gradients about to be
        applied; ``targets[key]`` is the layer. The layers of one kind and rank are seeded
        together (by the kind, batched where it can)."""
        if not self.pending or self.optimizer is None:
            return
        batches: dict[tuple[type[LoraTarget], int], list[tuple[LoraTarget, list[int]]]] = {}
        for key in list(self.pending):
            target = targets[key]
            if not target.has_grad():
                continue  # this layer takes no step now; seed at its next one
            batches.setdefault((type(target), target.r), []).append((target, sorted(self.pending.pop(key))))
        for (kind, _), members in batches.items():
            kind.seed_moments_batched_(self.optimizer, [t for t, _ in members], [s for _, s in members])

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
