"""``direction_policy="gradient"``: which of ``W0``'s unused singular directions enter at a
switch, by their alignment with the gradient: the ``r'`` unused directions ``i`` (among the
layer's top ``r_target``) whose rank-1 component ``u_i v_i^T`` is best aligned with the gradient of the loss with
respect to the layer's full weight, ``G = dL/dW`` (``m x n``)::

    a_i = u_i^T G v_i = sum over tokens t of (delta_t . u_i) (x_t . v_i)

with ``x_t`` the layer's input and ``delta_t = dL/dy_t`` the gradient at its output
(``y = x W^T + ...``, so ``G = sum_t delta_t^T x_t``). ``G`` is never formed: a forward hook
projects the input on the candidates' right vectors (``x V_C``: tokens x |C|), a hook on the
output's gradient projects ``delta`` on their left vectors, and their product summed over
tokens is ``a_C``. It is the first-order change of the loss if direction ``i`` were trained:
``dL/d(sigma_i) = a_i``.

The capture runs only in a window of ``K = ema_warmup_steps(beta1)`` optimizer steps (19
at 0.85) before each of the layer's scheduled switches, and its hooks are removed between
windows. Over the window the per-step ``a`` (summed over the micro-batches of a step, and
over ranks under torch.distributed) enters an EMA with the scores' ``beta1``; directions are
ranked by ``|EMA|``. The EMA of the signed alignment, not of its magnitude, is the
projection of the recent mean gradient (as a momentum is): a direction pushed the same way
step after step ranks above one pushed back and forth by noise. Under ``adaptive_switch``
the next switch step is not known ahead, so the capture stays on.

The new pair keeps its PiSSA scaling (``sqrt(sigma_i / s)``) and is subtracted from ``W``
as always, so a switch leaves the layer's function unchanged whichever directions enter.
Where no step has been captured (a switch forced before any window), the choice falls back
to singular-value order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import collective
from .capture import Probe, WindowedCapture
from .config import SRLoRAConfig
from .devices import to_device
from .layer import LayerState


class GradientProbe(Probe):
    """The gradient alignment of one layer's unused directions (see the module doc).

    Attributes:
        ema: ``(limit,)`` float32, the EMA of ``a_i`` per direction index (entries of used
            directions are unused).
        step_sum: ``(limit,)`` float32, this optimizer step's ``a`` (its micro-batches summed).
    """

    def __init__(self, layer: LayerState, beta: float) -> None:
        super().__init__(layer)
        self.beta = beta
        device = layer.target.lora_A.device
        self.ema = torch.zeros(layer.limit, dtype=torch.float32, device=device)
        self.step_sum = torch.zeros(layer.limit, dtype=torch.float32, device=device)
        self._cand: torch.Tensor | None = None
        self._U: torch.Tensor | None = None
        self._V: torch.Tensor | None = None

    def clear_window(self) -> None:
        self.ema.zero_()

    def open(self) -> bool:
        """The window's candidates: the directions unused now."""
        cand = self.layer.unused_directions()
        if cand.numel() == 0:
            return False
        device = self.ema.device
        U, _, V = self.layer.cache.directions(cand, device)
        self._cand, self._U, self._V = to_device(cand, device), U.float(), V.float()
        return True

    def close_window(self) -> None:
        self._cand = self._U = self._V = None

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        assert self._V is not None
        return x.reshape(-1, self._V.shape[0]).float() @ self._V  # (tokens, |C|)

    def on_grad(self, xv: torch.Tensor, grad: torch.Tensor) -> None:
        assert self._U is not None and self._cand is not None
        du = grad.reshape(-1, self._U.shape[0]).float() @ self._U  # (tokens, |C|)
        self.step_sum.index_add_(0, self._cand, (du * xv).sum(0))

    def add_step(self) -> None:
        self.ema.mul_(self.beta).add_(self.step_sum, alpha=1.0 - self.beta)

    def clear_step(self) -> None:
        self.step_sum.zero_()

    def choose(self, ema: torch.Tensor | None = None) -> torch.Tensor:
        """The ``r'`` unused directions with the largest ``|EMA|`` (ties: lower index);
        ``ema``: the EMA already on the host."""
        unused = self.layer.unused_directions()
        if self.steps_seen == 0:
            return unused[: self.layer.r_prime]
        ema = self.ema.cpu() if ema is None else ema
        score = ema[unused].abs()
        order = torch.sort(-score, stable=True).indices[: self.layer.r_prime]
        return unused[order]

    def window_state(self) -> dict[str, torch.Tensor]:
        return {"ema": self.ema.clone()}

    def load_window_state(self, state: dict[str, Any]) -> None:
        self.ema.copy_(state["ema"])


class GradientDirections(WindowedCapture):
    """``direction_policy="gradient"`` for a controller's layers: when each layer captures,
    and which of ``W0``'s directions it brings in."""

    @classmethod
    def full_rows(cls, config: SRLoRAConfig) -> bool:
        return True  # the alignment projects the whole gradient on W0's left vectors

    probes: dict[str, GradientProbe]

    def make_probe(self, layer: LayerState, position: int, config: SRLoRAConfig) -> GradientProbe:
        return GradientProbe(layer, config.beta1)

    def fold(self) -> None:
        """Once per optimizer step, before it: the step's alignment into each EMA (summed
        over ranks under torch.distributed, so every rank chooses the same directions)."""
        armed = [p for p in self.probes.values() if p.armed]
        if not armed:
            return
        if collective.distributed():
            collective.sum_over_ranks_([p.step_sum for p in armed])
            for p in armed:
                p.touched = True
        for p in armed:
            p.fold()

    def host_reads(self, layers: Sequence[LayerState]) -> list[torch.Tensor | None]:
        """Each layer's alignment EMA, on its device."""
        return [self.probes[layer.name].ema for layer in layers]

    def choose(self, layer: LayerState, host: torch.Tensor | None) -> list[int] | None:
        return self.probes[layer.name].choose(host).tolist()

    def switched(self, name: str) -> None:
        """A layer switched: its candidate set changed (kept EMA under adaptive switching)."""
        probe = self.probes[name]
        if probe.armed:
            probe.arm(reset=not self.adaptive)
