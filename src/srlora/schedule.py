"""When switches happen (paper Eq. 13-14; docs/METHOD.md section 4).

With ``r' = gamma * r``::

    N_switch   = floor((r_target - r) / r')
    t_interval = floor(N_all / N_switch)
    switches at steps t_interval, 2 t_interval, ..., N_switch * t_interval

but never at or after the last step ``N_all`` (a switch there would bring in
directions that are never trained). Steps count optimizer steps from 1; the switch
of step ``t`` runs right after the ``t``-th ``optimizer.step()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .config import SRLoRAConfig, SwitchBudget
from .errors import ScheduleWarning


def ema_warmup_steps(beta: float, residual: float = 0.05) -> int:
    """Steps an EMA with coefficient ``beta`` needs before its zero start weighs < ``residual``."""
    if beta <= 0.0:
        return 1
    return max(1, math.ceil(math.log(residual) / math.log(beta)))


@dataclass(frozen=True)
class SwitchSchedule:
    """Switch steps of one layer.

    Attributes:
        interval: steps between two switches (``t_interval``).
        num_switches: how many switches at most (``N_switch``).
        total_steps: ``N_all`` when known; no switch happens at a step ``>= total_steps``.
    """

    interval: int
    num_switches: int
    total_steps: int | None

    @classmethod
    def build(cls, budget: SwitchBudget, total_steps: int | None, switch_interval: int | None) -> SwitchSchedule:
        """The paper's schedule for one layer's budget; see the module docstring.

        Raises:
            ValueError: when ``total_steps`` is too short to fit even one step per switch.
        """
        num_switches = budget.num_switches
        if switch_interval is not None:
            return cls(interval=switch_interval, num_switches=num_switches, total_steps=total_steps)
        if total_steps is None:
            raise ValueError("a schedule needs total_steps or switch_interval")
        if num_switches == 0:  # a layer too narrow for any switch
            return cls(interval=total_steps, num_switches=0, total_steps=total_steps)
        interval = total_steps // num_switches
        if interval < 1:
            raise ValueError(
                f"total_steps={total_steps} is shorter than the N_switch={num_switches} switches that "
                f"{budget.directions} directions with r={budget.r}, r'={budget.r_prime} ask for. Lower r_target "
                f"(to at most {budget.r + total_steps * budget.r_prime}) or train longer."
            )
        return cls(interval=interval, num_switches=num_switches, total_steps=total_steps)

    def allows(self, step: int, switches_done: int) -> bool:
        """The rules every switch obeys, fixed or adaptive: fewer than ``N_switch`` switches
        so far, and none at or after the last step ``total_steps``."""
        if self.total_steps is not None and step >= self.total_steps:
            return False
        return switches_done < self.num_switches

    def is_switch_step(self, step: int) -> bool:
        if step < self.interval or step % self.interval != 0:
            return False
        return self.allows(step, switches_done=step // self.interval - 1)

    def next_switch(self, after: int) -> int | None:
        """The first switch step later than step ``after``, or ``None`` when none is left."""
        step = (after // self.interval + 1) * self.interval
        return step if self.is_switch_step(step) else None

    def in_window(self, next_step: int, switches_done: int, window: int, adaptive: bool) -> bool:
        """Optimizer step ``next_step`` lies in the ``window`` steps before the next switch (where
        the gradient policies capture); under ``adaptive``: at any step a switch is allowed."""
        if adaptive:
            return self.allows(next_step, switches_done)
        nxt = self.next_switch(next_step - 1)
        return nxt is not None and nxt - next_step < window

    def steps(self, limit: int | None = None) -> list[int]:
        """All switch steps (up to ``limit`` when the schedule has no end of its own)."""
        end = self.num_switches * self.interval + 1
        if self.total_steps is not None:
            end = min(end, self.total_steps)
        if limit is not None:
            end = min(end, limit + 1)
        return [t for t in range(self.interval, end, self.interval) if self.is_switch_step(t)]


@dataclass
class AdaptiveTrigger:
    """When to switch one layer under ``adaptive_switch`` (the paper's future work).

    After every optimizer step the layer's ``r'`` lowest-scoring pairs are compared with
    those of the previous step. The layer switches once that set has stayed the same for
    ``patience`` consecutive steps (its ranking has settled, so the pairs to evict are
    known), but never sooner than ``min_interval`` steps after its previous switch (the
    importance EMAs of fresh pairs must forget their zero start first), and at the
    latest ``max_interval`` steps after it. The r_target budget and the "no switch at or
    after the last step" rule of :class:`SwitchSchedule` still apply (checked by the
    caller).

    All state is plain integers and a tensor, returned by :meth:`state_dict`.
    """

    patience: int
    min_interval: int
    max_interval: int
    since_switch: int = 0
    stable: int = 0
    last_bottom: torch.Tensor | None = None

    def update(self, scores: torch.Tensor, r_prime: int) -> bool:
        """Record one step's pair scores; ``True`` when the layer should switch now."""
        self.since_switch += 1
        bottom = torch.zeros(scores.numel(), dtype=torch.bool)
        bottom[torch.sort(scores.cpu(), stable=True).indices[:r_prime]] = True
        if self.last_bottom is not None and torch.equal(bottom, self.last_bottom):
            self.stable += 1
        else:
            self.stable = 0
        self.last_bottom = bottom
        if self.since_switch < self.min_interval:
            return False
        return self.stable >= self.patience or self.since_switch >= self.max_interval

    def switched(self) -> None:
        self.since_switch = 0
        self.stable = 0
        self.last_bottom = None

    def state_dict(self) -> dict:
        return {
            "since_switch": self.since_switch,
            "stable": self.stable,
            "last_bottom": None if self.last_bottom is None else self.last_bottom.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.since_switch = int(state["since_switch"])
        self.stable = int(state["stable"])
        self.last_bottom = None if state["last_bottom"] is None else state["last_bottom"].clone()


def adaptive_trigger(config: SRLoRAConfig, schedule: SwitchSchedule) -> AdaptiveTrigger | None:
    """The layer's trigger under ``adaptive_switch`` (``None`` otherwise): bounded below by the
    EMA warm-up and above by twice the fixed interval."""
    if not config.adaptive_switch:
        return None
    horizon = ema_warmup_steps(max(config.beta1, config.beta2))
    return AdaptiveTrigger(
        patience=config.adaptive_patience, min_interval=horizon, max_interval=max(horizon, 2 * schedule.interval)
    )


def warn_short_interval(config: SRLoRAConfig, schedules: Iterable[SwitchSchedule], stacklevel: int) -> None:
    """Warn when a fixed interval is shorter than the importance EMAs' warm-up (adaptive
    switches never come sooner than it)."""
    horizon = ema_warmup_steps(max(config.beta1, config.beta2))
    switching = [s.interval for s in schedules if s.num_switches > 0]
    if switching and min(switching) < horizon and not config.adaptive_switch:
        warnings.warn(
            f"The switch interval ({min(switching)} steps) is shorter than the {horizon} steps the importance "
            f"EMAs (beta={max(config.beta1, config.beta2)}) need to forget their zero start, so recycled pairs "
            f"may be evicted before they are scored fairly. Lower r_target, raise gamma or train longer.",
            ScheduleWarning,
            stacklevel=stacklevel + 1,
        )


def warn_clamped(config: SRLoRAConfig, budgets: Mapping[str, SwitchBudget], stacklevel: int) -> None:
    """Warn when ``r_target`` exceeds some layers' ``min(m, n)`` (their budget is clamped)."""
    clamped = [f"{name} (min(m, n) = {b.directions})" for name, b in budgets.items() if b.clamped]
    if clamped:
        warnings.warn(
            f"r_target={config.r_target} exceeds min(m, n) of {len(clamped)} layer(s); their budget and schedule "
            "use the clamped value: " + ", ".join(clamped[:8]) + (" ..." if len(clamped) > 8 else ""),
            ScheduleWarning,
            stacklevel=stacklevel + 1,
        )
