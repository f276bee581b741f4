"""The quantized kind: a bitsandbytes 4-bit (NF4/FP4) or 8-bit base that is never written.

A switch cannot add ``s (B_old A_old - B_new A_new)`` to a packed weight, so what SRLoRA
would write into ``W`` stays beside it as low-rank *side factors*, applied by a forward
hook on the PEFT layer::

    W_eff = dequant(W_q) + s F_B F_A - s E_B E_A + s B A

``F``: the pairs fused so far (the layer's :class:`~srlora.record.FusedRecord`, shared with
the method), ``E``: every pair that ever entered the slots (the top ``r`` at the
initialisation, then each switch's new pairs), as they were stored. The total update
relative to ``W0 = dequant(W_q)`` is then ``s F_B F_A - s E_B E_A + s B A``, which is what
export writes; merging gives a float32 ``nn.Linear`` of ``dequant(W_q)`` plus it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..devices import to_device
from ..errors import CheckpointError
from ..recompose import pissa_factors
from ..record import FusedRecord
from ..svd import SVDCache
from .dense import DenseTarget


class QuantizedTarget(DenseTarget):
    """A LoRA layer over a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (see the module doc).

    Attributes:
        entered_B: ``(m, directions)`` float32, the ``B`` columns of every pair that entered
            (the first ``p`` are set).
        entered_A: ``(directions, n)`` float32, their ``A`` rows.
    """

    kind = "bnb"
    writes_base_weight = False

    def batch_key(self) -> object | None:
        return None  # switches layer by layer

    def __init__(self, name: str, module: nn.Module, adapter: str) -> None:
        super().__init__(name, module, adapter)
        self.entered_B: torch.Tensor | None = None
        self.entered_A: torch.Tensor | None = None
        self.entered = 0
        self.record: FusedRecord | None = None
        self._hook: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: the weight is stored packed, so it is read off the layer's features."""
        return int(self.base_layer.out_features), int(self.base_layer.in_features)

    @property
    def weight(self) -> torch.Tensor:
        raise RuntimeError(f"layer {self.name!r}: the quantized base weight is never written; use dequantized().")

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """The weight the quantized base applies, as float32 ``(m, n)`` (a new tensor).

        Read by applying the layer to the identity (minus its bias), so it is exactly what the
        forward computes whatever the backend's packing (on the CPU, bitsandbytes' own
        ``dequantize_4bit`` was seen to disagree with its forward)."""
        base = self.base_layer
        n = self.shape[1]
        # An input that requires grad: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit
        # weight for its inference kernel (gemv_4bit, which has no backward) on the first
        # eval-mode forward of an input that does not; every later training step would then
        # lose the gradient through the base weight.
        eye = torch.eye(n, dtype=torch.float32, device=self.lora_A.device).requires_grad_(True)
        out = base(eye).float()
        if getattr(base, "bias", None) is not None:
            out = out - base.bias.float()
        return out.T.contiguous()

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        return self.dequantized() + self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def bind(self, record: FusedRecord, directions: int) -> None:
        """Allocate the record of entered pairs (the current ``A``, ``B`` first) and hook the
        side factors into the layer's forward."""
        m, n = self.shape
        device = self.device
        self.record = record
        self.entered_B = torch.zeros(m, directions, dtype=torch.float32, device=device)
        self.entered_A = torch.zeros(directions, n, dtype=torch.float32, device=device)
        self.entered_B[:, : self.r] = self.lora_B.detach().float()
        self.entered_A[: self.r] = self.lora_A.detach().float()
        self.entered = self.r
        if self._hook is None:
            self._hook = self.module.register_forward_hook(self._add_side_factors)

    def _add_side_factors(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """``output + x (s F_B F_A - s E_B E_A)^T``: the writes a quantized base never receives."""
        assert self.entered_A is not None and self.entered_B is not None and self.record is not None
        p = self.entered
        x = args[0].to(torch.float32)
        side = -(x @ self.entered_A[:p].T) @ self.entered_B[:, :p].T
        if self.record.count:
            F_B, F_A = self.record.factors()
            side += (x @ F_A.T) @ F_B.T
        return output + side.mul_(self.scaling).to(output.dtype)

    @torch.no_grad()
    def pissa_init_(self, cache: SVDCache) -> None:
        """``(B, A)`` take the top ``r`` directions; ``W`` is never written: the side factors
        take ``-s B A`` (:meth:`bind` records them as the first entered pairs)."""
        if bool(self.lora_B.detach().any()):
            raise ValueError(
                f"Layer {self.name!r}: a quantized layer whose adapter already carries an update (B != 0) is not "
                f"supported; start SRLoRA from a fresh LoRA adapter."
            )
        U, S, V = cache.directions(torch.arange(self.r), self.lora_A.device)
        B_new, A_new = pissa_factors(U, S, V, self.scaling)
        self.lora_B.data.copy_(B_new)
        self.lora_A.data.copy_(A_new)

    @torch.no_grad()
    def switch_pairs_(
        self, cache: SVDCache, slots: torch.Tensor, directions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Only ``B`` and ``A`` change; the side factors record the pair that entered (the
        caller records the fused one)."""
        assert self.entered_A is not None and self.entered_B is not None
        device = self.lora_A.device
        slots = to_device(slots, device)
        B_old, A_old = self.lora_B.data[:, slots].float(), self.lora_A.data[slots].float()
        U, S, V = cache.directions(directions, device)
        B_new, A_new = pissa_factors(U, S, V, self.scaling)
        self.lora_B.data[:, slots] = B_new.to(self.lora_B.dtype)
        self.lora_A.data[slots] = A_new.to(self.lora_A.dtype)
        p, k = self.entered, int(slots.numel())
        self.entered_B[:, p : p + k] = self.lora_B[:, slots].detach().float()
        self.entered_A[p : p + k] = self.lora_A[slots].detach().float()
        self.entered = p + k
        return B_old, A_old

    @torch.no_grad()
    def total_update_factors(
        self, cache: SVDCache, used: torch.Tensor, record: FusedRecord
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s F_B F_A - s E_B E_A + s B A``."""
        assert self.entered_A is not None and self.entered_B is not None
        p, s = self.entered, self.scaling
        device = record.B.device
        F_B, F_A = record.factors()
        P = torch.cat([s * F_B, -s * self.entered_B[:, :p], s * self.lora_B.float().to(device)], dim=1)
        Q = torch.cat([F_A, self.entered_A[:p], self.lora_A.float().to(device)], dim=0)
        return P, Q

    @torch.no_grad()
    def merged_module(self, update: Callable[[], torch.Tensor]) -> nn.Module:
        """A float32 ``nn.Linear`` holding ``dequant(W_q) + update()`` (and the bias)."""
        weight = self.dequantized() + update()
        bias = self.bias
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.float())
        return linear

    def extra_bytes(self) -> int:
        """Memory of the side factors (the fused and entered records)."""
        tensors = [t for t in (self.entered_A, self.entered_B) if t is not None]
        own = sum(t.numel() * t.element_size() for t in tensors)
        return own + (self.record.nbytes if self.record is not None else 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.entered_A is not None and self.entered_B is not None
        p = self.entered
        return {"entered_B": self.entered_B[:, :p].clone(), "entered_A": self.entered_A[:p].clone()}

    def check_state(self, state: dict[str, torch.Tensor], pointer: int) -> None:
        m, n = self.shape
        for key, shape in {"entered_B": (m, pointer), "entered_A": (pointer, n)}.items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise CheckpointError(f"layer {self.name!r}: {key} has shape {found}, expected {shape}.")

    def load_state_dict(self, state: dict[str, torch.Tensor], pointer: int) -> None:
        assert self.entered_A is not None and self.entered_B is not None
        self.entered_B.zero_()
        self.entered_A.zero_()
        self.entered_B[:, :pointer] = state["entered_B"]
        self.entered_A[:pointer] = state["entered_A"]
        self.entered = pointer
