"""What the integrations share: the figures they log for a controller (public state only),
and the controller they build from a config."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from ..config import SRLoRAConfig
from ..controller import SRLoRA


def check_run_model(
    config: SRLoRAConfig | None, run_model: Callable[[Any], object] | None
) -> Callable[[Any], object] | None:
    """A callback's ``run_model``: only beside a config (a controller built by the user took its own)."""
    if run_model is not None and config is None:
        raise TypeError(
            "run_model goes with an SRLoRAConfig (the callback then builds SRLoRA); a controller you built "
            "took its own: SRLoRA(model, config, run_model=fn)."
        )
    return run_model


def build_controller(model: nn.Module, config: SRLoRAConfig, run_model: Callable[[Any], object] | None) -> SRLoRA:
    """SRLoRA on ``model``; ``run_model(model)`` is its general-text pass (``subspace_whiten``)."""
    return SRLoRA(model, config, run_model=None if run_model is None else partial(run_model, model))


def figures(controller: SRLoRA, since_event: int = 0) -> dict[str, float]:
    """``srlora/switches`` (layer switches so far), ``srlora/directions_used`` (mean per layer),
    ``srlora/skipped_steps`` (non-finite gradients), and ``srlora/evicted_score``: the mean
    score of the pairs evicted by the switches after ``history[since_event]``, when any."""
    used = controller.directions_used()
    out = {
        "srlora/switches": float(len(controller.history)),
        "srlora/directions_used": sum(used.values()) / max(1, len(used)),
        "srlora/skipped_steps": float(controller.skipped_steps),
    }
    evicted = [score for event in controller.history[since_event:] for score in event.scores]
    if evicted:
        out["srlora/evicted_score"] = sum(evicted) / len(evicted)
    return out
