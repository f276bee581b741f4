"""The quantized kind: a bitsandbytes 4-bit (NF4/FP4) or 8-bit base that is never written.

A switch cannot add ``s (B_old A_old - B_new A_new)`` to a packed weight, so what SRLoRA
would write into ``W`` stays beside it as low-rank *side factors*, applied by a forward
hook on the PEFT layer::

    W_eff = dequant(W_q) + s F_B F_A - s E_B E_A + s B A

``F``: the pairs fused so far (the layer's :class:`~srlora.record.FusedRecord`, shared with
the method), ``E``: every pair that ever entered the slots (the top ``r`` at the
initialisation, then each switch's new pairs). The total update relative to
``W0 = dequant(W_q)`` is ``s F_B F_A - s E_B E_A + s B A``, which is what export writes;
merging gives a float32 ``nn.Linear`` of ``dequant(W_q)`` plus it.

Memory (docs/INTEGRATIONS.md, QLoRA). ``D = s (F_B F_A - E_B E_A)`` has rank up to
``k = 2p - r`` after ``p`` directions, so keeping the output exact needs ``k (m + n - k)``
numbers at least; the records hold ``k (m + n)``, in ``side_factor_dtype`` (bfloat16 by
default), and grow by ``r'`` pairs each per switch: nothing is allocated for directions
that have not entered. New pairs enter the slots rounded to that dtype, so ``E`` records
exactly what entered; a fused pair is rounded once, when it is recorded (the only change a
switch makes to the layer's output, below ``2^-7`` of that pair's contribution in
bfloat16, none in float32). The SVD cache waits on the CPU unless ``svd_device`` says
otherwise; a switch moves the ``r'`` directions it brings in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import SRLoRAConfig
from ..devices import to_device
from ..recompose import pissa_factors
from ..record import FusedRecord
from ..svd import SVDCache
from .dense import DenseTarget

_BNB_LINEAR = ("Linear4bit", "Linear8bitLt")


def is_bnb_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (or a subclass), checked by class without
    importing bitsandbytes."""
    return any(c.__module__.startswith("bitsandbytes") and c.__name__ in _BNB_LINEAR for c in type(module).__mro__)


class BnbTarget(DenseTarget):
    """A LoRA layer over a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (see the module doc),
    whichever PEFT class wraps it.

    Attributes:
        entered: the record of every pair that entered the slots, ``E_B (m, p)``, ``E_A (p, n)``.
        record: the layer's record of fused pairs ``F`` (shared with its ``LayerState``).
        side_dtype: the records' storage dtype.
    """

    kind = "bnb"
    writes_base_weight = False
    records_entries = True

    batches = False  # switches layer by layer

    def __init__(self, name: str, module: nn.Module, adapter: str) -> None:
        super().__init__(name, module, adapter)
        self.side_dtype = torch.bfloat16
        self.cache_device: str | None = "cpu"
        self.entered: FusedRecord | None = None
        self.record: FusedRecord | None = None
        self._hook: Any = None

    def setup(self, config: SRLoRAConfig) -> None:
        self.side_dtype = getattr(torch, config.side_factor_dtype)
        self.cache_device = None if config.svd_device is not None else "cpu"

    def prepare_cache(self, cache: SVDCache, full_rows: bool) -> SVDCache:
        return cache.to(self.cache_device) if self.cache_device is not None else cache

    def new_record(self, capacity: int) -> FusedRecord:
        """A record that grows with the pairs fused (nothing allocated up front), in ``side_dtype``."""
        m, n = self.shape
        return FusedRecord(m, n, self.device, capacity=0, dtype=self.side_dtype)

    def _rounded(self, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New factors as the slots will hold them: rounded to the side dtype, then to the
        adapter's, so that the record of what entered is exact."""
        B = B.to(self.side_dtype).to(self.lora_B.dtype)
        return B, A.to(self.side_dtype).to(self.lora_A.dtype)

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

    def bind(self, record: FusedRecord | None, entered: FusedRecord | None) -> None:
        """Keep the layer's records of fused and entered pairs (the latter starts with the
        first ``r`` pairs) and hook the side factors into the layer's forward."""
        if record is None or entered is None:
            raise ValueError(f"layer {self.name!r}: a quantized base needs the records of fused and entered pairs.")
        self.record, self.entered = record, entered
        if self._hook is None:
            self._hook = self.module.register_forward_hook(self._add_side_factors)

    def _add_side_factors(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """``output + s x (F_B F_A - E_B E_A)^T`` in the input's dtype: the writes a quantized
        base never receives (:class:`_SideFactors`: nothing but the records is kept for the backward)."""
        assert self.entered is not None and self.record is not None
        x = args[0]
        side = _SideFactors.apply(x, self.record.A, self.record.B, self.entered.A, self.entered.B, self.scaling)
        return output + side.to(output.dtype)

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
        B_new, A_new = self._rounded(*pissa_factors(U, S, V, self.scaling))
        self.lora_B.data.copy_(B_new)
        self.lora_A.data.copy_(A_new)

    @torch.no_grad()
    def switch_pairs_(
        self, slots: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Only ``B`` and ``A`` change; the caller records the fused pairs and the entered ones
        (the side factors read both records)."""
        device = self.lora_A.device
        slots = to_device(slots, device)
        B_old, A_old = self.lora_B.data[:, slots].float(), self.lora_A.data[slots].float()
        B_new, A_new = self._rounded(*pissa_factors(U.to(device), S.to(device), V.to(device), self.scaling))
        self.lora_B.data[:, slots] = B_new
        self.lora_A.data[slots] = A_new
        return B_old, A_old, B_new.float(), A_new.float()

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
        """Memory of the side factors (the fused and entered records, as allocated)."""
        return sum(rec.nbytes for rec in (self.entered, self.record) if rec is not None)


class _SideFactors(torch.autograd.Function):
    """``y = s x (F_B F_A - E_B E_A)^T`` and its gradient with respect to ``x`` only (the
    records are not trained). Computed in ``x``'s dtype; the backward recomputes the casts of
    the records instead of keeping them, so a step holds no float32 copy of bfloat16 records."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        F_A: torch.Tensor,
        F_B: torch.Tensor,
        E_A: torch.Tensor,
        E_B: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(F_A, F_B, E_A, E_B)
        ctx.scaling = scaling
        return _side(x, F_A, F_B, E_A, E_B, scaling, transpose=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        F_A, F_B, E_A, E_B = ctx.saved_tensors
        grad_x = _side(grad, F_A, F_B, E_A, E_B, ctx.scaling, transpose=True) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def _side(
    x: torch.Tensor,
    F_A: torch.Tensor,
    F_B: torch.Tensor,
    E_A: torch.Tensor,
    E_B: torch.Tensor,
    scaling: float,
    transpose: bool,
) -> torch.Tensor:
    """``s x D^T`` (or ``s x D`` with ``transpose``) for ``D = F_B F_A - E_B E_A``, by factors;
    the sign and the scaling go into the small factors, so the output is written once."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    x = x.to(dtype)
    first, second = (E_B, E_A) if transpose else (E_A.T, E_B.T)
    out = (x @ first.to(dtype)) @ (second.to(dtype) * -scaling)
    if F_A.shape[0]:
        f1, f2 = (F_B, F_A) if transpose else (F_A.T, F_B.T)
        flat = out.view(-1, out.shape[-1])
        flat.addmm_(x.reshape(-1, x.shape[-1]) @ f1.to(dtype), f2.to(dtype) * scaling)
    return out
