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
        self._B = torch.zeros(rows, capacity, dtype=dtype, device=device)
        self._A = torch.zeros(capacity, n, dtype=dtype, device=device)

    @property
    def B(self) -> torch.Tensor:
        """``F_B``, ``(rows, u)`` in the storage dtype (a view)."""
        return self._B[:, : self.count]

    @property
    def A(self) -> torch.Tensor:
        """``F_A``, ``(u, n)`` in the storage dtype (a view)."""
        return self._A[: self.count]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the capacity, not only the pairs recorded)."""
        return self._B.numel() * self._B.element_size() + self._A.numel() * self._A.element_size()

    def _reserve(self, total: int) -> None:
        if total <= self._A.shape[0]:
            return
        more = total - self._A.shape[0]
        self._B = torch.cat([self._B, self._B.new_zeros(self.rows, more)], dim=1)
        self._A = torch.cat([self._A, self._A.new_zeros(more, self.n)], dim=0)

    def append_(self, B_cols: torch.Tensor, A_rows: torch.Tensor) -> None:
        """Record fused pairs ``B_cols (rows, k)``, ``A_rows (k, n)`` (cast to the storage dtype)."""
        k = int(A_rows.shape[0])
        self._reserve(self.count + k)
        self._B[:, self.count : self.count + k] = B_cols
        self._A[self.count : self.count + k] = A_rows
        self.count += k

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F_B, F_A)`` in float32."""
        return self.B.float(), self.A.float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"fused_B": self.B.clone(), "fused_A": self.A.clone()}

    def check_state(self, state: dict[str, Any], count: int, where: str) -> None:
        """Raise :class:`CheckpointError` unless ``state`` holds ``count`` pairs of this shape."""
        expected = {"fused_B": (self.rows, count), "fused_A": (count, self.n)}
        for key, shape in expected.items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise CheckpointError(f"{where}: {key} has shape {found}, expected {shape}.")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count = int(state["fused_A"].shape[0])
        self._reserve(count)
        self._B.zero_()
        self._A.zero_()
        self._B[:, :count] = state["fused_B"]
        self._A[:count] = state["fused_A"]
        self.count = count
