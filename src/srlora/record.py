"""The record of the pairs a layer fused into its frozen weight.

Each switch fuses ``r'`` pairs ``(B[:, k], A[k, :])`` into ``W``. The record keeps them as
``F_B (rows, u)`` and ``F_A (u, n)`` (``u = p - r`` pairs so far, float32), with which the
total update relative to the pretrained weight is exactly::

    W_t + s B A - W0 = s F_B F_A + s B A - U[:, :p] diag(S[:p]) V[:, :p]^T     (rank <= 2p)

``rows`` is the number of output rows this process holds (all of them, unless the layer
is row-sharded by FSDP2). Storage for ``capacity`` pairs is allocated up front, and grows
when more are recorded.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CheckpointError


class FusedRecord:
    """``F_B (rows, u)``, ``F_A (u, n)``: the pairs fused so far.

    Args:
        rows: rows of ``B`` this process holds.
        n: columns of ``A`` (input features).
        device: where the record lives (beside the adapter).
        capacity: pairs allocated up front (more are added as needed).
        dtype: storage dtype (float32: the pairs are recorded exactly).
    """

    def __init__(
        self, rows: int, n: int, device: torch.device, capacity: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:
        self.rows, self.n, self.dtype = rows, n, dtype
        self.count = 0
        # F_B is stored transposed, (capacity, rows), so that both records are indexed by pair
        # on their first dimension (a group of layers writes every layer's new pairs at once).
        self._Bt = torch.zeros(capacity, rows, dtype=dtype, device=device)
        self._A = torch.zeros(capacity, n, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return int(self._A.shape[0])

    @property
    def B(self) -> torch.Tensor:
        """``F_B``, ``(rows, u)`` in the storage dtype (a view)."""
        return self._Bt[: self.count].T

    @property
    def A(self) -> torch.Tensor:
        """``F_A``, ``(u, n)`` in the storage dtype (a view)."""
        return self._A[: self.count]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the capacity, not only the pairs recorded)."""
        return self._Bt.numel() * self._Bt.element_size() + self._A.numel() * self._A.element_size()

    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F_B^T (capacity, rows), F_A (capacity, n))``, the whole allocation."""
        return self._Bt, self._A

    def use_storage(self, Bt: torch.Tensor, A: torch.Tensor) -> None:
        """Keep the record in ``Bt``, ``A`` (views into a group's stacked storage, holding the
        same values, with room for at least the pairs recorded) from now on."""
        fits = Bt.shape[1:] == self._Bt.shape[1:] and A.shape[1:] == self._A.shape[1:]
        if not fits or Bt.shape[0] != A.shape[0] or A.shape[0] < self.count:
            raise ValueError(f"storage of shapes {tuple(Bt.shape)}, {tuple(A.shape)} does not fit this record.")
        self._Bt, self._A = Bt, A

    def _reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        more = total - self.capacity
        self._Bt = torch.cat([self._Bt, self._Bt.new_zeros(more, self.rows)], dim=0)
        self._A = torch.cat([self._A, self._A.new_zeros(more, self.n)], dim=0)

    def append_(self, B_cols: torch.Tensor, A_rows: torch.Tensor) -> None:
        """Record fused pairs ``B_cols (rows, k)``, ``A_rows (k, n)`` (cast to the storage dtype)."""
        k = int(A_rows.shape[0])
        self._reserve(self.count + k)
        self._Bt[self.count : self.count + k] = B_cols.T
        self._A[self.count : self.count + k] = A_rows
        self.count += k

    def counted(self, k: int) -> None:
        """``k`` more pairs were written into the storage by the group this record belongs to."""
        if self.count + k > self.capacity:
            raise RuntimeError("a group wrote past the record's capacity.")
        self.count += k

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F_B, F_A)`` in float32."""
        return self.B.float(), self.A.float()

    def state_dict(self, prefix: str = "fused") -> dict[str, torch.Tensor]:
        """``{prefix_B: F_B, prefix_A: F_A}`` (copies)."""
        return {f"{prefix}_B": self.B.contiguous().clone(), f"{prefix}_A": self.A.clone()}

    def check_state(self, state: dict[str, Any], count: int, where: str, prefix: str = "fused") -> None:
        """Raise :class:`CheckpointError` unless ``state`` holds ``count`` pairs of this shape."""
        expected = {f"{prefix}_B": (self.rows, count), f"{prefix}_A": (count, self.n)}
        for key, shape in expected.items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise CheckpointError(f"{where}: {key} has shape {found}, expected {shape}.")

    def load_state_dict(self, state: dict[str, Any], prefix: str = "fused") -> None:
        B, A = state[f"{prefix}_B"], state[f"{prefix}_A"]
        count = int(A.shape[0])
        self._reserve(count)
        self._Bt.zero_()
        self._A.zero_()
        self._Bt[:count] = B.T
        self._A[:count] = A
        self.count = count
