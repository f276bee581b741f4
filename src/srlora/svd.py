"""Top-k singular triplets of a pretrained weight, computed once per layer.

``W0 (m x n) ~= U diag(S) V^T`` with ``U: (m, k)``, ``S: (k,)`` descending, ``V: (n, k)``.
SRLoRA reads directions ``p .. p + r' - 1`` out of this cache at every switch, so only
the top ``k = min(r_target, m, n)`` triplets are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SRLoRAConfig
from .devices import to_device


@dataclass
class SVDCache:
    """Truncated SVD of one layer's pretrained weight, in float32.

    Attributes:
        U: ``(m, k)`` left singular vectors (columns), descending by singular value; under
            FSDP2 only rows ``row_offset .. row_offset + U.shape[0]`` (:mod:`srlora.sharding`).
        S: ``(k,)`` singular values, descending.
        V: ``(n, k)`` right singular vectors (columns).
        row_offset: the first row of ``W0`` that ``U`` holds.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    row_offset: int = 0

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.V))

    def to(self, device: torch.device | str) -> SVDCache:
        return SVDCache(self.U.to(device), self.S.to(device), self.V.to(device), self.row_offset)

    def keep_rows(self, start: int, stop: int) -> SVDCache:
        """The same cache with only rows ``start .. stop - 1`` of ``U`` (a rank's rows)."""
        rows = self.U[start - self.row_offset : stop - self.row_offset].clone()
        return SVDCache(rows, self.S, self.V, start)

    def directions(
        self, index: torch.Tensor, device: torch.device, rows: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U[rows, index], S[index], V[:, index])`` moved to ``device`` (``rows``: all
        that the cache holds by default)."""
        index = to_device(index, self.S.device)
        U = self.U if rows is None else self.U[rows[0] - self.row_offset : rows[1] - self.row_offset]
        return (
            to_device(U[:, index], device),
            to_device(self.S[index], device),
            to_device(self.V[:, index], device),
        )


def top_singular_triplets(
    weight: torch.Tensor,
    k: int,
    method: str = "full",
    niter: int = 4,
    oversample: int = 16,
    seed: int = 0,
) -> SVDCache:
    """Top-``k`` singular triplets of ``weight`` (m x n) in float32.

    Args:
        weight: the matrix, any float dtype; it is copied to float32 first.
        k: number of triplets to keep, ``1 <= k <= min(m, n)``.
        method: ``"full"`` (``torch.linalg.svd``, exact, identical to PEFT's PiSSA init) or
            ``"randomized"`` (``torch.svd_lowrank`` with ``k + oversample`` columns and
            ``niter`` subspace iterations; approximate, faster for ``k << min(m, n)``).
        seed: seed of the randomized method's Gaussian sketch. The global RNG is not
            touched, so every process computes the same directions.
    """
    m, n = weight.shape
    d = min(m, n)
    if not 1 <= k <= d:
        raise ValueError(f"k must lie in [1, min(m, n) = {d}], got {k}.")
    w32 = weight.detach().to(torch.float32)
    if method == "full":
        U, S, Vh = torch.linalg.svd(w32, full_matrices=False)
        return SVDCache(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous())
    if method == "randomized":
        q = min(k + oversample, d)
        # torch.svd_lowrank draws its sketch from the global RNG; fork it so that the
        # user's random stream (data order, dropout) is the same with or without SRLoRA.
        devices = [w32.device] if w32.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(w32, q=q, niter=niter)
        return SVDCache(U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].contiguous())
    raise ValueError(f"method must be 'full' or 'randomized', got {method!r}.")


def distributed_top_triplets(weight: torch.Tensor, k: int, config: SRLoRAConfig) -> SVDCache:
    """The SVD of a layer's effective weight ``(m, n)``; under torch.distributed, computed on
    rank 0 and broadcast so that every rank starts from bit-identical directions (LAPACK
    builds may differ per host)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or dist.get_rank() == 0:
        cache = top_singular_triplets(
            weight,
            k,
            method=config.svd_method,
            niter=config.svd_niter,
            oversample=config.svd_oversample,
            seed=config.seed,
        )
        if not distributed:
            return cache
    else:
        m, n = weight.shape
        device = weight.device
        cache = SVDCache(
            torch.empty(m, k, device=device), torch.empty(k, device=device), torch.empty(n, k, device=device)
        )
    for t in (cache.U, cache.S, cache.V):
        dist.broadcast(t, src=0)
    return cache


@torch.no_grad()
def factor_difference(D: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P (m, k), Q (k, n))``, float32, the best rank-``k`` factors of ``D (m, n)`` with ``k`` its
    numerical rank (singular values above ``sigma_1 max(m, n) eps_float32``), at most ``max_rank``
    (``P = U_k diag(sigma_k)``, ``Q = V_k^T``), in float64. Where ``max_rank`` is small against
    the layer, on ``D``'s range first (``Q_D = orth(D Omega)``, ``max_rank + 16`` columns, two
    power iterations: exact for a matrix of that rank, as ``D`` is up to rounding), so a 7B layer
    costs a few thin products instead of its full SVD."""
    D = D.double()
    q = max_rank + 16
    if 4 * q < min(D.shape):
        g = torch.Generator(device=D.device).manual_seed(0)
        Y = D @ torch.randn(D.shape[1], q, generator=g, device=D.device, dtype=D.dtype)
        for _ in range(2):
            Y = D @ (D.T @ torch.linalg.qr(Y).Q)
        basis = torch.linalg.qr(Y).Q  # (m, q)
        u, sv, vh = torch.linalg.svd(basis.T @ D, full_matrices=False)
        u = basis @ u
    else:
        u, sv, vh = torch.linalg.svd(D, full_matrices=False)
    tol = float(sv.max()) * max(D.shape) * torch.finfo(torch.float32).eps if sv.numel() else 0.0
    keep = max(1, min(max_rank, int((sv > tol).sum())))
    return (u[:, :keep] * sv[:keep]).float(), vh[:keep].float()
