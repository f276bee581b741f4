"""The figures the integrations log for a controller (public state only)."""

from __future__ import annotations

from ..controller import SRLoRA


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
