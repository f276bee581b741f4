"""What a switch did, as the controller's history records it (``SRLoRA.history``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SwitchEvent:
    """One layer's switch.

    Attributes:
        step: optimizer step after which it happened (0: forced before training).
        layer: module name.
        slots: pair indices recycled, ascending.
        directions: the directions that entered those slots (same order): singular directions
            of ``W0``, or under ``direction_policy="gradient_subspace"`` the entries' ordinal
            numbers (the ``p``-th pair to enter the layer; ``0 .. r-1`` are ``W0``'s first ``r``).
        evicted: the directions that were fused into ``W`` (same order).
        scores: their pair scores ``S_k`` at the switch (same order).
    """

    step: int
    layer: str
    slots: tuple[int, ...]
    directions: tuple[int, ...]
    evicted: tuple[int, ...]
    scores: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SwitchEvent:
        return cls(
            step=int(d["step"]),
            layer=str(d["layer"]),
            slots=tuple(int(x) for x in d["slots"]),
            directions=tuple(int(x) for x in d["directions"]),
            evicted=tuple(int(x) for x in d["evicted"]),
            scores=tuple(float(x) for x in d["scores"]),
        )
