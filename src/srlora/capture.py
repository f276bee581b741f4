"""What the two gradient policies share: per-layer probes armed only inside each layer's
capture window, the ``ema_warmup_steps(beta1)`` optimizer steps before its switch (19 at
beta1 = 0.85), so the hooks cost nothing in the rest of the run. ``directions.py`` (which of
W0's directions enter) and ``subspace.py`` (the gradient's own top vectors) say what a probe
sums and what it brings in."""

from __future__ import annotations

from typing import Any

from .schedule import ema_warmup_steps


class WindowedCapture:
    """The per-layer probes of a gradient capture, each armed only in its layer's window
    before a switch (the EMA's warm-up, ``ema_warmup_steps(beta1)`` steps). Subclasses say
    what a probe sums and what it brings in at a switch."""

    def __init__(self, probes: dict[str, Any], beta: float, adaptive: bool) -> None:
        self.probes = probes
        self.window = ema_warmup_steps(beta)
        self.adaptive = adaptive

    def update_windows(self, next_step: int) -> None:
        """Arm the layers whose window covers optimizer step ``next_step``; disarm the others."""
        for probe in self.probes.values():
            capture = probe.layer.in_capture_window(next_step, self.window, self.adaptive)
            if capture and not probe.armed:
                probe.arm(reset=True)
            elif not capture and probe.armed:
                probe.disarm()

    def discard(self) -> None:
        """A skipped step (non-finite gradients): what it captured is dropped."""
        for p in self.probes.values():
            p.discard()

    def close(self) -> None:
        for p in self.probes.values():
            p.disarm()

    def state_dict(self) -> dict[str, Any]:
        return {name: p.state_dict() for name, p in self.probes.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, p in self.probes.items():
            p.load_state_dict(state[name])
