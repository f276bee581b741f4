"""Find and check the PEFT LoRA layers that SRLoRA drives.

PEFT does the LoRA plumbing; this module only reads it. One adapted layer is seen
through :class:`LoraTarget`, which hides ``fan_in_fan_out`` (GPT-2's ``Conv1D`` stores
its weight transposed): ``target.weight`` is always the ``(m, n)`` matrix ``W`` with
``y = x W^T``, as a view sharing storage with the module's parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .sharding import check_row_sharded, full, is_sharded, local, row_span
from .zero3 import is_partitioned


@dataclass
class LoraTarget:
    """One PEFT ``lora.Linear`` layer, one adapter.

    Attributes:
        name: module name inside the PEFT model.
        module: the PEFT LoRA layer.
        adapter: adapter name.
    """

    name: str
    module: nn.Module
    adapter: str

    @property
    def base_layer(self) -> nn.Module:
        return self.module.get_base_layer()

    @property
    def base_param(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def sharded(self) -> bool:
        """The layer's parameters are FSDP2 DTensors (:mod:`srlora.sharding`)."""
        return is_sharded(self.base_param)

    @property
    def zero3(self) -> bool:
        """The layer's parameters are DeepSpeed ZeRO-3 partitions (:mod:`srlora.zero3`)."""
        return is_partitioned(self.base_param) or is_partitioned(self.lora_A)

    @property
    def quantized(self) -> bool:
        """The base is a bitsandbytes 4-bit or 8-bit layer: its weight is never written
        (the layer's low-rank side factors carry what SRLoRA adds, :mod:`srlora.layer_state`)."""
        return _is_quantized_lora(self.module)

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """The weight a quantized base applies, as float32 ``(m, n)`` (a new tensor).

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

    @property
    def weight(self) -> torch.Tensor:
        """``W``, shape ``(m, n)``: a view of the frozen base weight's storage (under FSDP2,
        of this rank's rows ``row_span``). Not for a quantized base, which is never written."""
        if self.quantized:
            raise RuntimeError(f"layer {self.name!r}: the quantized base weight is never written; use dequantized().")
        data = local(self.base_param.data)
        return data.T if self.module.fan_in_fan_out else data

    @property
    def row_span(self) -> tuple[int, int]:
        """The rows of ``W`` and ``B`` (output features) this rank holds: all, unless sharded."""
        return row_span(self.base_param) if self.sharded else (0, self.shape[0])

    @property
    def pair_span(self) -> tuple[int, int]:
        """The rows of ``A`` (pairs) this rank holds: all, unless sharded."""
        return row_span(self.lora_A) if is_sharded(self.lora_A) else (0, self.r)

    @property
    def lora_A(self) -> nn.Parameter:
        """``A``, shape ``(r, n)``."""
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        """``B``, shape ``(m, r)``."""
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        """``s`` in ``W + s B A`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA)."""
        return float(self.module.scaling[self.adapter])

    @property
    def r(self) -> int:
        return int(self.module.r[self.adapter])

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the whole layer (sharded or not; a quantized weight is stored packed)."""
        if self.quantized:
            return int(self.base_layer.out_features), int(self.base_layer.in_features)
        m, n = getattr(self.base_param, "ds_shape", self.base_param.shape)  # ZeRO-3 keeps its whole shape there
        return (int(n), int(m)) if self.module.fan_in_fan_out else (int(m), int(n))


def fingerprint(*tensors: torch.Tensor | None) -> list[float]:
    """A cheap identity of some tensors: sum, absolute sum, sum of squares and a strided sum
    of each, in float64, on their device (one host transfer in all). Equal tensors give
    equal values (up to reduction order across devices: compare with :func:`same_fingerprint`);
    two pretrained weights differ in every one of them."""
    parts = []
    for t in tensors:
        if t is None:
            parts.append(torch.zeros(4, dtype=torch.float64))
            continue
        x = full(t.detach()).double().flatten()
        stride = max(1, x.numel() // 97)
        parts.append(torch.stack([x.sum(), x.abs().sum(), x.square().sum(), x[::stride].sum()]).cpu())
    return torch.cat(parts).tolist()


def same_fingerprint(a: list[float], b: list[float], rtol: float = 1e-6) -> bool:
    """``a`` and ``b`` agree to ``rtol`` of each tensor's absolute sum (reductions on another
    device or in another order may differ in the last bits)."""
    if len(a) != len(b):
        return False
    for i in range(0, len(a), 4):
        abs_sum = abs(a[i + 1])
        for x, y in zip(a[i : i + 4], b[i : i + 4], strict=True):
            if abs(x - y) > rtol * max(abs(x), abs(y), abs_sum, 1e-30):
                return False
    return True


def _refuse_fsdp1(model: nn.Module) -> None:
    """FSDP1 flattens the parameters SRLoRA reads and rewrites: refused, FSDP2 is the path."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    if any(isinstance(m, FSDP) for m in model.modules()):
        raise NotImplementedError(
            "SRLoRA does not support FSDP1 (FullyShardedDataParallel, flat parameters). Use FSDP2: "
            "get_peft_model -> torch.distributed.fsdp.fully_shard on each block and the root -> SRLoRA(model, "
            "config) -> optimizer -> attach (docs/INTEGRATIONS.md, FSDP2)."
        )


def _is_quantized_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer over a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``."""
    if type(module).__module__ != "peft.tuners.lora.bnb":
        return False
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), checked without importing transformers up front."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a declared dependency
        return False
    return isinstance(module, Conv1D)


def find_lora_targets(model: nn.Module, adapter: str) -> list[LoraTarget]:
    """All layers of a PEFT LoRA model that carry ``adapter``, checked for SRLoRA.

    Raises:
        TypeError: ``model`` is not a PEFT LoRA model.
        ValueError: the adapter is absent, or a layer cannot be driven by SRLoRA
            (message names the layer and the fix).
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    _refuse_fsdp1(model)

    lora_layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoraLayer)]
    if not lora_layers:
        raise TypeError(
            f"{type(model).__name__} has no PEFT LoRA layer. Wrap the model first: "
            "model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=[...])), "
            "then SRLoRA(model, config)."
        )
    carrying = [(name, mod) for name, mod in lora_layers if adapter in mod.lora_A or adapter in mod.lora_embedding_A]
    if not carrying:
        present = sorted({a for _, mod in lora_layers for a in (*mod.lora_A.keys(), *mod.lora_embedding_A.keys())})
        raise ValueError(f"No LoRA layer carries adapter {adapter!r}; adapters present: {present}. Set adapter_name=.")

    targets: list[LoraTarget] = []
    for name, mod in carrying:
        fix = f"exclude it from LoraConfig.target_modules (e.g. exclude_modules=[{name.rsplit('.', 1)[-1]!r}])"
        quantized = _is_quantized_lora(mod)
        if type(mod) is not LoraLinear and not quantized:
            raise ValueError(
                f"SRLoRA supports LoRA on nn.Linear, transformers' Conv1D and bitsandbytes' Linear4bit / "
                f"Linear8bitLt; layer {name!r} is a {type(mod).__module__}.{type(mod).__name__} (other quantized "
                f"bases and embedding/conv LoRA are not supported). Fix: {fix}, or load the base model unquantized "
                f"or in bitsandbytes 4/8 bits."
            )
        base = mod.get_base_layer()
        if quantized:
            pass  # the weight is packed integers; SRLoRA reads it dequantized and never writes it
        elif type(base) is not nn.Linear and not _is_conv1d(base):
            raise ValueError(
                f"Layer {name!r} wraps a {type(base).__name__}, not nn.Linear or transformers' Conv1D; SRLoRA needs a "
                f"plain float weight to decompose. Fix: {fix}, or load the base model unquantized."
            )
        if not quantized and base.weight.dtype not in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float64,
        ):
            raise ValueError(
                f"Layer {name!r} has a {base.weight.dtype} weight; SRLoRA needs float32/float16/bfloat16. "
                f"Fix: load the base model unquantized."
            )
        if adapter in getattr(mod, "lora_variant", {}) or getattr(mod, "use_dora", {}).get(adapter, False):
            variant = type(mod.lora_variant.get(adapter)).__name__ if adapter in mod.lora_variant else "DoRA"
            raise ValueError(
                f"Layer {name!r} uses the LoRA variant {variant}; SRLoRA drives plain LoRA only. "
                f"Fix: build the LoraConfig without use_dora and other variants."
            )
        if mod.merged:
            raise ValueError(f"Layer {name!r} has merged adapters; call model.unmerge_adapter() before SRLoRA.")
        target = LoraTarget(name=name, module=mod, adapter=adapter)
        if target.zero3 and (quantized or mod.fan_in_fan_out):
            raise ValueError(
                f"Layer {name!r}: DeepSpeed ZeRO-3 with a quantized or Conv1D (fan_in_fan_out) layer is not supported."
            )
        if target.sharded or is_sharded(target.lora_A):
            if mod.fan_in_fan_out:
                raise ValueError(
                    f"Layer {name!r}: transformers' Conv1D (fan_in_fan_out) under FSDP2 is not supported; "
                    f"shard a model with nn.Linear layers, or train it with DDP."
                )
            for what, t in (("weight", target.base_param), ("lora_A", target.lora_A), ("lora_B", target.lora_B)):
                check_row_sharded(t, f"Layer {name!r}'s {what}")
            if not (target.sharded and is_sharded(target.lora_A) and is_sharded(target.lora_B)):
                raise ValueError(
                    f"Layer {name!r}: its base weight and LoRA A/B must be sharded together (fully_shard the "
                    f"block that holds the whole PEFT layer)."
                )
        if target.base_param.device.type == "meta":
            raise ValueError(f"Layer {name!r} lives on the meta device; load real weights before SRLoRA.")
        targets.append(target)
    return targets
