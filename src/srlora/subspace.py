"""New pairs along the gradient's own subspace (``direction_policy="gradient_subspace"``).

The paper brings in the next singular directions of ``W0``, whatever the loss needs. Here
a switch brings in instead the top ``r'`` singular vectors of the gradient of the loss with
respect to the layer's full weight, summed over the window before the switch::

    G = sum over the window's steps and tokens t of  delta_t^T x_t          (m x n)

with ``x_t`` the layer's input and ``delta_t = dL/dy_t`` the gradient at its output. It is
LoRA-GA's initialisation (Wang et al. 2024: the pair whose first step best follows the full
fine-tuning step), applied at every switch; GaLore (Zhao et al. 2024) projects its
optimizer onto the same kind of subspace. The new pair ``(u_i, v_i)`` enters with the
singular value ``sigma = SRLoRAConfig.entry_sigma`` (``entry_scale`` times the layer's
first pairs' scale): ``s B_new A_new = sigma u_i v_i^T``, subtracted from ``W`` as always,
so a switch leaves the layer's function unchanged whatever enters.

``G`` is never formed. Within the window, hooks (those of :mod:`srlora.directions`) add each
micro-batch to a single-pass randomized sketch of it (Tropp, Yurtsever, Udell & Cevher,
"Practical sketching algorithms for low-rank matrix approximation", 2017)::

    Y = G Omega   (m x k),    Z = Psi G   (l x n),    k = r' + sketch_oversample, l = 2k + 1

``Omega (n x k)`` and ``Psi (l x m)`` Gaussian, drawn from a seed (the config's, the layer's
position and its switch count), so every rank and a resumed run draw the same ones. At the
switch, one randomized SVD per layer::

    Q = orth(Y),   X = (Psi Q)^+ Z   (k x n),   X = U_x diag(s_x) V_x^T,
    u = Q U_x[:, :r'],   v = V_x[:, :r']^T

Cost per captured step: ``tokens x (m + n) x (k + l)`` multiply-adds per layer, about
``2 (k + l) / min(m, n)`` of the layer's own forward and backward (docs/METHOD.md section
7 gives the measured whole-run figure). Under torch.distributed the sketches are summed
over ranks at the switch (one all-reduce), and rank 0's vectors are broadcast, so every
rank brings in the same pairs. Where no step was captured (a switch forced before any
window) or the captured gradient is exactly zero, the pairs enter along seeded random
directions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import collective
from .capture import Probe, WindowedCapture
from .config import SRLoRAConfig
from .layer import LayerState
from .whiten import Whitening, collect


class SketchProbe(Probe):
    """The sketches ``Y = G Omega``, ``Z = Psi G`` of one layer's windowed gradient.

    Attributes:
        Y: ``(m, k)`` float32, the range sketch summed over the captured steps.
        Z: ``(l, n)`` float32, the co-range sketch.
    """

    def __init__(self, layer: LayerState, position: int, config: SRLoRAConfig) -> None:
        super().__init__(layer)
        self.position = position
        self.seed = config.seed
        m, n = layer.target.shape
        self.k = min(layer.r_prime + config.sketch_oversample, m, n)
        self.l = min(2 * self.k + 1, m)
        device = layer.target.device
        # Y is kept transposed, (k, m) row-major, so that its per-step update is a short-wide
        # product (see on_grad).
        self.Yt = torch.zeros(self.k, m, dtype=torch.float32, device=device)
        self.Z = torch.zeros(self.l, n, dtype=torch.float32, device=device)
        self._Yt_step, self._Z_step = torch.zeros_like(self.Yt), torch.zeros_like(self.Z)
        self._omega_t: torch.Tensor | None = None  # Omega^T, (k, n) row-major
        self._psi: torch.Tensor | None = None
        self.exclude = min(config.subspace_exclude, layer.cache.rank)
        self._left: tuple[torch.Tensor, torch.Tensor] | None = None  # W0's top (U_k, V_k), left alone
        self.whiten = config.subspace_whiten
        self.whitening: Whitening | None = None  # P of srlora.whiten, when subspace_whiten > 0

    @property
    def Y(self) -> torch.Tensor:
        """``(m, k)``: the range sketch (a transposed view of the stored ``(k, m)`` buffer)."""
        return self.Yt.T

    def _generator(self) -> torch.Generator:
        """Seeded by the config, the layer and its switch count: the same draw on every rank."""
        seed = (self.seed * 1_000_003 + self.position * 10_007 + self.layer.switches_done) % (2**63)
        return torch.Generator().manual_seed(seed)

    def test_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Omega (n, k), Psi (l, m))`` of the current window."""
        g = self._generator()
        m, n = self.layer.target.shape
        omega = torch.randn(n, self.k, generator=g)
        psi = torch.randn(self.l, m, generator=g)
        device = self.Y.device
        return omega.to(device), psi.to(device)

    def clear_window(self) -> None:
        self.Yt.zero_()
        self.Z.zero_()

    def open(self) -> bool:
        """The window's test matrices (and W0's directions left alone)."""
        if self.whiten and self.whitening is None:
            raise RuntimeError(
                f"subspace_whiten={self.whiten}: layer {self.layer.name!r} has no input covariance; build "
                "SRLoRA(model, config, run_model=fn) or load a checkpoint saved with it."
            )
        omega, self._psi = self.test_matrices()
        self._omega_t = omega.T.contiguous()
        self._left = self.left_alone() if self.exclude else None
        return True

    def close_window(self) -> None:
        self._omega_t = self._psi = None
        self._left = None

    def left_alone(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_k (m, k), V_k (n, k))``: ``W0``'s top ``subspace_exclude`` singular vectors."""
        index = torch.arange(self.exclude)
        U, _, V = self.layer.cache.directions(index, self.Yt.device)
        return U.float(), V.float()

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def on_grad(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        assert self._omega_t is not None and self._psi is not None
        m, n = self.layer.target.shape
        x2 = x.reshape(-1, n).float()
        d = grad.reshape(-1, m).float()
        if self._left is not None:
            # G' = (I - U_k U_k^T) G (I - V_k V_k^T) = sum_t delta'_t^T x'_t: each side projected.
            Uk, Vk = self._left
            x2 = x2 - (x2 @ Vk) @ Vk.T
            d = d - (d @ Uk) @ Uk.T
        if self.whitening is not None:
            x2 = self.whitening.apply(x2)  # G P = sum_t delta_t^T (P x_t)^T
        # (G Omega)^T = sum_t (Omega^T x_t^T) delta_t; in this order every product is short-wide
        # (k rows), which CPU BLAS runs several times faster than the tall-skinny x Omega.
        self._Yt_step.addmm_(self._omega_t @ x2.T, d)
        self._Z_step.addmm_(self._psi @ d.T, x2)  # Psi G = sum_t (Psi delta_t^T) x_t

    def add_step(self) -> None:
        self.Yt.add_(self._Yt_step)
        self.Z.add_(self._Z_step)

    def clear_step(self) -> None:
        self._Yt_step.zero_()
        self._Z_step.zero_()

    @property
    def captured(self) -> bool:
        """Some step entered the sketches since the window opened, and its gradient was not
        exactly zero (a zero sketch has no top vectors to speak of: the SVD would return
        arbitrary ones, which may differ between LAPACK builds)."""
        return self.steps_seen > 0 and bool(self.Y.any()) and bool(self.Z.any())

    def random_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded random unit directions ``(u (m, r'), v (n, r'))``, where nothing was captured."""
        r = self.layer.r_prime
        m, n = self.layer.target.shape
        g = self._generator()
        U, V = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64)
        if self.exclude:  # outside W0's directions left alone, as a captured pair would be
            Uk, Vk = (t.cpu().double() for t in self.left_alone())
            U, V = U - Uk @ (Uk.T @ U), V - Vk @ (Vk.T @ V)
        U, V = torch.linalg.qr(U).Q, torch.linalg.qr(V).Q
        return U.float().to(self.Y.device), V.float().to(self.Y.device)

    def window_state(self) -> dict[str, torch.Tensor]:
        return {"Y": self.Y.clone(), "Z": self.Z.clone()}

    def state_dict(self) -> dict[str, Any]:
        whitening = self.whitening.state_dict() if self.whitening is not None else {}
        return {**super().state_dict(), **whitening}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "whiten_Q" in state:  # before the window re-opens
            self.whitening = Whitening.from_state(state, self.Yt.device)
        super().load_state_dict(state)

    def load_window_state(self, state: dict[str, Any]) -> None:
        self.Y.copy_(state["Y"])
        self.Z.copy_(state["Z"])


@torch.no_grad()
def sketch_top_vectors(
    Y: torch.Tensor, Z: torch.Tensor, psi: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``r`` singular vectors ``(u (..., m, r), v (..., n, r))`` of ``G`` from its sketches
    ``Y = G Omega (..., m, k)`` and ``Z = Psi G (..., l, n)``: ``Q = orth(Y)``, ``X = (Psi Q)^+ Z``,
    and the SVD of ``X`` (Tropp et al. 2017, single pass); batched over leading dimensions.
    Computed in float64."""
    Q = torch.linalg.qr(Y.double()).Q  # (..., m, k)
    X = torch.linalg.lstsq(psi.double() @ Q, Z.double()).solution  # (..., k, n)
    Ux, _, Vxh = torch.linalg.svd(X, full_matrices=False)
    return (Q @ Ux[..., :r]).float(), Vxh[..., :r, :].transpose(-1, -2).contiguous().float()


def top_vectors(probes: list[SketchProbe]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each probe's ``(u, v)``: one batched randomized SVD per group of probes of one shape
    (the layers of a transformer come in a few shapes); seeded random directions where
    nothing was captured."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(probes)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(probes):
        if p.captured:
            key = (*p.Y.shape, *p.Z.shape, p.layer.r_prime, p.Y.device)
            groups.setdefault(key, []).append(i)
        else:
            out[i] = p.random_vectors()
    for members in groups.values():
        Y = torch.stack([probes[i].Y for i in members])
        Z = torch.stack([probes[i].Z for i in members])
        psi = torch.stack([probes[i].test_matrices()[1] for i in members])
        U, V = sketch_top_vectors(Y, Z, psi, probes[members[0]].layer.r_prime)
        for j, i in enumerate(members):
            out[i] = (U[j], V[j])
    return out  # type: ignore[return-value]


class GradientSubspace(WindowedCapture):
    """``direction_policy="gradient_subspace"`` for a controller's layers: when each layer
    sketches its gradient, and the vectors its new pairs take (see the module doc)."""

    probes: dict[str, SketchProbe]

    def __init__(
        self, layers: Mapping[str, LayerState], config: SRLoRAConfig, run_model: Callable[[], object] | None = None
    ) -> None:
        super().__init__(layers, config)
        if config.subspace_whiten:
            if run_model is None:
                raise ValueError(
                    f"subspace_whiten={config.subspace_whiten} whitens by the input covariance of text the model "
                    "should keep knowing: build SRLoRA(model, config, run_model=fn), fn() running the model's "
                    "forward on that text (a few batches; as PEFT's CorDA takes it)."
                )
            k, seed = config.subspace_whiten, config.seed
            for name, w in collect(layers, run_model, k, config.sketch_oversample, seed).items():
                self.probes[name].whitening = w

    @classmethod
    def full_rows(cls, config: SRLoRAConfig) -> bool:
        return config.subspace_exclude > 0  # W0's top left vectors project the whole output gradient

    def make_probe(self, layer: LayerState, position: int, config: SRLoRAConfig) -> SketchProbe:
        return SketchProbe(layer, position, config)

    @torch.no_grad()
    def vectors(self, layers: Sequence[LayerState]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (u (m, r'), v (n, r'))}`` for the layers switching now, the same on every
        rank: the sketches are summed over ranks (one all-reduce), rank 0's vectors broadcast.
        A collective under torch.distributed: every rank calls it with the same layers."""
        probes = [self.probes[layer.name] for layer in layers]
        if not probes:
            return {}
        distributed = collective.distributed()
        if distributed:
            import torch.distributed as dist

            seen = torch.tensor([float(p.steps_seen) for p in probes], device=probes[0].Y.device)
            collective.sum_over_ranks_([t for p in probes for t in (p.Y, p.Z)])
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
            for i, p in enumerate(probes):
                p.steps_seen = int(seen[i])
        out = {
            p.layer.name: (u, v if p.whitening is None else p.whitening.directions(v))  # v = P w / |P w|
            for p, (u, v) in zip(probes, top_vectors(probes), strict=True)
        }
        if distributed:  # rank 0's vectors for all
            parts = collective.from_rank0([t for u, v in out.values() for t in (u, v)])
            out = {name: (parts[2 * i], parts[2 * i + 1]) for i, name in enumerate(out)}
        return out

    def switched(self, name: str) -> None:
        """A layer switched: its window's sum starts again (and its test matrices change)."""
        probe = self.probes[name]
        if probe.armed:
            probe.arm(reset=True)
