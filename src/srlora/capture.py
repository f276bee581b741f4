"""What the capturing direction policies share: per-layer probes that hook a layer's forward
(its input ``x``) and the gradient at its output (``delta = dL/dy``), armed only inside the
layer's capture window, the ``ema_warmup_steps(beta1)`` optimizer steps before its switch (19
at beta1 = 0.85), so the hooks cost nothing in the rest of the run. A :class:`Probe` says what
it keeps of ``x`` at the forward, what it sums at the backward and how a step enters its
window's sum; :mod:`srlora.alignment` and :mod:`srlora.subspace` are the two."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from .directions import DirectionPolicy
from .schedule import ema_warmup_steps

if TYPE_CHECKING:
    from .config import SRLoRAConfig
    from .layer import LayerState


class Probe:
    """One layer's capture: hooks while armed, a per-step sum, a window's sum.

    A subclass provides :meth:`clear_window`, :meth:`open` (what the window captures; ``False``:
    nothing to capture), :meth:`on_input` (what the forward keeps of ``x``), :meth:`on_grad`
    (what the backward adds to the step's sum), :meth:`add_step` (the step's sum into the
    window's), :meth:`clear_step` and its tensors in ``state_dict``.

    Attributes:
        layer: the layer's :class:`~srlora.layer.LayerState`.
        steps_seen: optimizer steps folded into the window's sum since it opened.
        touched: the current step has added something.
    """

    def __init__(self, layer: LayerState) -> None:
        self.layer = layer
        self.steps_seen = 0
        self.touched = False
        self._handle: Any = None

    # ------------------------------------------------------------------ what a subclass says
    def clear_window(self) -> None:
        raise NotImplementedError

    def open(self) -> bool:
        raise NotImplementedError

    def close_window(self) -> None:
        """Drop what :meth:`open` prepared."""

    def on_input(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def on_grad(self, kept: Any, grad: torch.Tensor) -> None:
        raise NotImplementedError

    def add_step(self) -> None:
        raise NotImplementedError

    def clear_step(self) -> None:
        raise NotImplementedError

    def window_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_window_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ the shared mechanics
    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self, reset: bool = True) -> None:
        """Open a window: the hooks capture from now on (``reset``: the window's sum starts again)."""
        self.disarm()
        if reset:
            self.clear_window()
            self.steps_seen = 0
        self.discard()
        if self.open():
            self._handle = self.layer.target.module.register_forward_hook(self._forward)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self.close_window()

    def _forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return  # evaluation, or a frozen path: no gradient will come
        output.register_hook(partial(self._backward, self.on_input(args[0].detach())))

    def _backward(self, kept: Any, grad: torch.Tensor) -> None:
        self.on_grad(kept, grad.detach())
        self.touched = True

    def fold(self) -> None:
        """Enter this optimizer step's sum (its micro-batches) into the window's (once per step)."""
        if self.touched:
            self.add_step()
            self.steps_seen += 1
        self.discard()

    def discard(self) -> None:
        self.clear_step()
        self.touched = False

    def state_dict(self) -> dict[str, Any]:
        return {**self.window_state(), "steps_seen": self.steps_seen, "armed": self.armed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_window_state(state)
        self.steps_seen = int(state["steps_seen"])
        if state["armed"]:
            self.arm(reset=False)
        else:
            self.disarm()


class WindowedCapture(DirectionPolicy):
    """A direction policy that captures through per-layer :class:`Probe` s, each armed only in
    its layer's window before a switch (the EMA's warm-up, ``ema_warmup_steps(beta1)`` steps).
    Subclasses build the probes (:meth:`make_probe`) and say what enters at a switch."""

    def __init__(self, layers: Mapping[str, LayerState], config: SRLoRAConfig) -> None:
        super().__init__(layers, config)
        self.probes = {name: self.make_probe(layer, i, config) for i, (name, layer) in enumerate(layers.items())}
        self.window = ema_warmup_steps(config.beta1)
        self.adaptive = config.adaptive_switch

    def make_probe(self, layer: LayerState, position: int, config: SRLoRAConfig) -> Probe:
        raise NotImplementedError

    def update_windows(self, next_step: int) -> None:
        """Arm the layers whose window covers optimizer step ``next_step``; disarm the others."""
        for probe in self.probes.values():
            capture = probe.layer.in_capture_window(next_step, self.window, self.adaptive)
            if capture and not probe.armed:
                probe.arm(reset=True)
            elif not capture and probe.armed:
                probe.disarm()

    def fold(self) -> None:
        """Once per optimizer step, before it: each armed layer folds the step in."""
        for p in self.probes.values():
            if p.armed:
                p.fold()

    def discard(self) -> None:
        for p in self.probes.values():
            p.discard()

    def close(self) -> None:
        for p in self.probes.values():
            p.disarm()

    def state_dict(self) -> dict[str, Any]:
        return {name: p.state_dict() for name, p in self.probes.items()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            raise ValueError("the checkpoint holds no captured gradient state; it was saved under another policy.")
        for name, p in self.probes.items():
            p.load_state_dict(state[name])
