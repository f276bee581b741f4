"""New pairs that change the output on general text least for what they buy
(``SRLoRAConfig.subspace_whiten``, with ``direction_policy="gradient_subspace"``).

A new pair ``sigma u v^T`` (unit ``u``, ``v``) lowers the task loss to first order by
``sigma u^T G v`` (``G``: the gradient the window captured, :mod:`srlora.subspace`) and moves the
layer's output on text the model should keep knowing by ``sigma^2 v^T C v`` in mean square,
``C = E[x x^T]`` that text's input covariance. The best ratio is the top singular pair of
``G C^{-1/2}``, mapped back: ``v ∝ C^{-1/2} w``. CorDA (Yang et al. 2024, knowledge-preserved
mode) chooses its adapter once from the same covariance; here every switch does.

``C`` is ``n x n`` per layer, too large to keep for a large model, and ill-conditioned. Its top
``k`` eigenpairs ``(Q (n, k), lambda_1..k)`` are taken from a streaming Nyström sketch (Tropp,
Yurtsever, Udell & Cevher 2017, "Fixed-rank approximation of a positive-semidefinite matrix
from streaming data")::

    Y = C Omega (n x l),   Omega (n x l) orthonormal and seeded,   l = min(n, 2k + sketch_oversample)

summed over the calibration tokens, and the rest of the spectrum is taken as flat at the mean
eigenvalue ``lambda_bar = tr C / n``. The whitening is that damped ``C^{-1/2}``, scaled to be the
identity off the top ``k`` directions::

    P = I + Q (diag(g) - I) Q^T,    g_i = sqrt(2 lambda_bar / (lambda_i + lambda_bar))

so a direction the general text drives ``lambda_i / lambda_bar`` times harder than average is
shrunk by about the square root of that. The window sketches ``G P`` (each token's input
``x -> P x``, exact because ``P`` is symmetric), and a new pair takes ``u`` and
``v = P w / ||P w||`` from its top singular pair ``(u, w)``. ``P`` is fixed for the run: the
covariance is collected once, when the controller is built (``SRLoRA(model, config,
run_model=fn)``: ``fn()`` runs the model on the text, as PEFT's CorDA takes it), summed over
ranks under torch.distributed, rank 0's eigenpairs broadcast, and kept in the controller's
``state_dict`` (a resumed run does not depend on the text again).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from . import collective
from .layer import LayerState


@dataclass
class Whitening:
    """One layer's ``P = I + Q (diag(gain) - I) Q^T`` (see the module doc).

    Attributes:
        Q: ``(n, k)`` float32, orthonormal: the general text's top input directions.
        gain: ``(k,)`` float32, ``g_i`` in ``(0, sqrt 2]``.
    """

    Q: torch.Tensor
    gain: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x P`` for rows ``x (t, n)`` (``P`` symmetric: each row mapped by ``P``)."""
        return x + ((x @ self.Q) * (self.gain - 1)) @ self.Q.T

    def directions(self, w: torch.Tensor) -> torch.Tensor:
        """``P w`` for columns ``w (n, r)``, each scaled to unit length."""
        v = self.apply(w.T).T
        return v / v.norm(dim=0, keepdim=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"whiten_Q": self.Q, "whiten_gain": self.gain}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], device: torch.device) -> Whitening:
        return cls(state["whiten_Q"].to(device, torch.float32), state["whiten_gain"].to(device, torch.float32))


@torch.no_grad()
def nystrom_top(Y: torch.Tensor, omega: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` eigenpairs ``(Q (n, k), lambda (k,))`` of a PSD ``C`` from its sketch
    ``Y = C Omega`` (``Omega (n, l)`` orthonormal), by the shifted Nyström approximation
    ``C_nu ≈ Y_nu (Omega^T Y_nu)^+ Y_nu^T``, ``Y_nu = Y + nu Omega`` (Tropp et al. 2017, Alg. 3),
    in float64. The shift ``nu`` is float32's rounding of ``Y`` (its sum's precision), and the
    pseudo-inverse drops the eigenvalues of ``Omega^T Y_nu`` at that level. Exact where
    ``rank C <= l`` up to that rounding."""
    Y, omega = Y.double(), omega.double()
    nu = torch.finfo(torch.float32).eps * Y.norm().item() * Y.shape[0] ** 0.5
    Y = Y + nu * omega
    d, V = torch.linalg.eigh((omega.T @ Y + Y.T @ omega) / 2)
    keep = d > nu
    E = (Y @ V[:, keep]) / d[keep].sqrt()  # Y_nu B^{-1/2}: C_nu ≈ E E^T
    U, S, _ = torch.linalg.svd(E, full_matrices=False)
    return U[:, :k], (S[:k] ** 2 - nu).clamp_min(0)


def gains(eigenvalues: torch.Tensor, mean_eigenvalue: float) -> torch.Tensor:
    """``g_i = sqrt(2 lambda_bar / (lambda_i + lambda_bar))``: 1 at the mean eigenvalue."""
    return (2 * mean_eigenvalue / (eigenvalues + mean_eigenvalue)).sqrt()


class _CovarianceSketch:
    """One layer's running ``Y = sum_t x_t x_t^T Omega``, ``sum_t |x_t|^2`` and token count."""

    def __init__(self, layer: LayerState, position: int, k: int, oversample: int, seed: int) -> None:
        n = layer.target.shape[1]
        self.layer, self.k, self.l = layer, min(k, n), min(n, 2 * min(k, n) + oversample)
        g = torch.Generator().manual_seed((seed * 1_000_003 + position * 10_007 + 7) % (2**63))
        device = layer.target.device
        self.omega = torch.linalg.qr(torch.randn(n, self.l, generator=g, dtype=torch.float64)).Q.float().to(device)
        self.Y = torch.zeros(n, self.l, dtype=torch.float32, device=device)
        self.stats = torch.zeros(2, dtype=torch.float64, device=device)  # sum |x|^2, tokens

    def __call__(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        x = args[0].detach().reshape(-1, self.Y.shape[0]).float()
        self.Y.addmm_(x.T, x @ self.omega)
        self.stats += torch.stack([x.double().square().sum(), torch.tensor(float(x.shape[0]), device=x.device)])

    def whitening(self) -> Whitening:
        n = self.Y.shape[0]
        tokens = float(self.stats[1])
        if tokens == 0 or not bool(self.Y.any()):
            raise ValueError(
                f"run_model never ran layer {self.layer.name!r} on any input: subspace_whiten needs each adapted "
                "layer's inputs on general text; make run_model call the model's forward on it."
            )
        Q, lam = nystrom_top(self.Y, self.omega, self.k)
        g = gains(lam, float(self.stats[0]) / n)
        return Whitening(Q.float().contiguous(), g.float())


@torch.no_grad()
def collect(
    layers: Mapping[str, LayerState], run_model: Callable[[], object], k: int, oversample: int, seed: int
) -> dict[str, Whitening]:
    """Each layer's :class:`Whitening` of the top ``k`` directions of its inputs' covariance
    while ``run_model()`` runs (once, without gradients). A collective under
    torch.distributed: every rank runs its own share of the text, the sketches are summed and
    rank 0's eigenpairs broadcast."""
    sketches = {
        name: _CovarianceSketch(layer, i, k, oversample, seed) for i, (name, layer) in enumerate(layers.items())
    }
    handles = [s.layer.target.module.register_forward_hook(s) for s in sketches.values()]
    try:
        run_model()
    finally:
        for h in handles:
            h.remove()
    distributed = collective.distributed()
    if distributed:
        collective.sum_over_ranks_([t for s in sketches.values() for t in (s.Y, s.stats)], dtype=torch.float64)
    out = {name: s.whitening() for name, s in sketches.items()}
    if distributed:  # rank 0's eigenpairs for all
        parts = collective.from_rank0([t for w in out.values() for t in (w.Q, w.gain)])
        out = {name: Whitening(parts[2 * i], parts[2 * i + 1]) for i, name in enumerate(out)}
    return out
