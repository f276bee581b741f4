"""Which unused singular directions a switch brings in (``SRLoRAConfig.direction_policy``).

``"spectrum"`` (the paper's): the next ``r'`` unused directions in singular-value order.

``"gradient"``: the ``r'`` unused directions ``i`` (among the layer's top ``r_target``)
whose rank-1 component ``u_i v_i^T`` is best aligned with the gradient of the loss with
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

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from .capture import WindowedCapture
from .config import SRLoRAConfig
from .devices import to_device
from .layer_state import LayerState


class GradientProbe:
    """The gradient alignment of one layer's unused directions (see the module doc).

    Attributes:
        ema: ``(limit,)`` float32, the EMA of ``a_i`` per direction index (entries of used
            directions are unused).
        steps_seen: optimizer steps folded into the EMA since the window opened.
    """

    def __init__(self, layer: LayerState, beta: float) -> None:
        self.layer = layer
        self.beta = beta
        device = layer.target.lora_A.device
        self.ema = torch.zeros(layer.limit, dtype=torch.float32, device=device)
        self.step_sum = torch.zeros(layer.limit, dtype=torch.float32, device=device)
        self.steps_seen = 0
        self.touched = False
        self._handle: Any = None
        self._cand: torch.Tensor | None = None
        self._U: torch.Tensor | None = None
        self._V: torch.Tensor | None = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self, reset: bool = True) -> None:
        """Open a window: the hooks capture the current unused directions from now on."""
        self.disarm()
        if reset:
            self.ema.zero_()
            self.steps_seen = 0
        self.step_sum.zero_()
        self.touched = False
        cand = self.layer.unused_directions()
        if cand.numel() == 0:
            return
        device = self.ema.device
        U, _, V = self.layer.cache.directions(cand, device)
        self._cand, self._U, self._V = to_device(cand, device), U.float(), V.float()
        self._handle = self.layer.target.module.register_forward_hook(self._forward)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = self._cand = self._U = self._V = None

    def _forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return  # evaluation, or a frozen path: no gradient will come
        assert self._V is not None
        n = self._V.shape[0]
        xv = args[0].detach().reshape(-1, n).float() @ self._V  # (tokens, |C|)
        output.register_hook(partial(self._backward, xv))

    def _backward(self, xv: torch.Tensor, grad: torch.Tensor) -> None:
        assert self._U is not None and self._cand is not None
        du = grad.detach().reshape(-1, self._U.shape[0]).float() @ self._U  # (tokens, |C|)
        self.step_sum.index_add_(0, self._cand, (du * xv).sum(0))
        self.touched = True

    def fold(self) -> None:
        """Enter this optimizer step's alignment into the EMA (once per step)."""
        if self.touched:
            self.ema.mul_(self.beta).add_(self.step_sum, alpha=1.0 - self.beta)
            self.steps_seen += 1
        self.discard()

    def discard(self) -> None:
        self.step_sum.zero_()
        self.touched = False

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

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.clone(), "steps_seen": self.steps_seen, "armed": self.armed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.copy_(state["ema"])
        self.steps_seen = int(state["steps_seen"])
        if state["armed"]:
            self.arm(reset=False)
        else:
            self.disarm()


def capture_for(layers: Mapping[str, LayerState], config: SRLoRAConfig) -> Any:
    """The gradient capture ``config.direction_policy`` needs (``None`` for the spectrum)."""
    if config.direction_policy == "gradient":
        return GradientDirections(layers, config.beta1, config.adaptive_switch)
    if config.direction_policy == "gradient_subspace":
        from .subspace import GradientSubspace

        return GradientSubspace(layers, config)
    return None


class GradientDirections(WindowedCapture):
    """``direction_policy="gradient"`` for a controller's layers: when each layer captures,
    and which directions it brings in."""

    def __init__(self, layers: Mapping[str, LayerState], beta: float, adaptive: bool) -> None:
        super().__init__({name: GradientProbe(layer, beta) for name, layer in layers.items()}, beta, adaptive)

    def vectors(self, layers: list[LayerState]) -> None:
        """The new pairs are ``W0``'s directions (from the cache), not vectors of their own."""
        return None

    def fold(self) -> None:
        """Once per optimizer step, before it: the step's alignment into each EMA (summed
        over ranks under torch.distributed, so every rank chooses the same directions)."""
        armed = [p for p in self.probes.values() if p.armed]
        if not armed:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([p.step_sum for p in armed])
            dist.all_reduce(flat)
            for p, part in zip(armed, flat.split([p.step_sum.numel() for p in armed]), strict=True):
                p.step_sum.copy_(part)
                p.touched = True
        for p in armed:
            p.fold()

    def choose(self, name: str, ema: torch.Tensor | None = None) -> torch.Tensor:
        return self.probes[name].choose(ema)

    def ema(self, name: str) -> torch.Tensor:
        """A layer's alignment EMA, on its device."""
        return self.probes[name].ema

    def switched(self, name: str) -> None:
        """A layer switched: its candidate set changed (kept EMA under adaptive switching)."""
        probe = self.probes[name]
        if probe.armed:
            probe.arm(reset=not self.adaptive)
