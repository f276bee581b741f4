"""SRLoRA's warnings and errors.

Warnings form one hierarchy, so that ``-W error::srlora.SRLoRAWarning`` (or a
``filterwarnings`` entry) catches all of them and a subclass picks out one kind."""

from __future__ import annotations


class SRLoRAWarning(UserWarning):
    """Something about the run the user should know but that is not an error."""


class ScheduleWarning(SRLoRAWarning):
    """The schedule works but is likely not what was meant (short interval, clamped budget,
    a trainer whose step count differs from the configured one)."""


class DirectionsExhaustedWarning(SRLoRAWarning):
    """A layer has used every singular direction it may use and stops switching."""


class NonFiniteWarning(SRLoRAWarning):
    """Non-finite gradients or weights: a step's importance update, or a switch, was skipped."""


class UnsupportedOptimizerWarning(SRLoRAWarning):
    """The optimizer's state layout is unknown, so recycled pairs keep their state."""


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded into this model: unreadable, not an srlora checkpoint,
    holding objects other than tensors and plain data, or saved from another model, config
    or optimizer. Raised before anything is changed."""


__all__ = [
    "CheckpointError",
    "DirectionsExhaustedWarning",
    "NonFiniteWarning",
    "SRLoRAWarning",
    "ScheduleWarning",
    "UnsupportedOptimizerWarning",
]


def check_int(name: str, value: object, minimum: int | None) -> None:
    """A config field that must be an integer (at least ``minimum``): a clear error otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """A config field that must be one of ``choices``: a clear error that lists them otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
