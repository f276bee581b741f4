"""Find the PEFT LoRA layers that SRLoRA drives, and give each its kind.

PEFT does the LoRA plumbing; this module only reads it. Each adapted layer is seen through
a :class:`~srlora.kinds.base.LoraTarget` whose subclass, its *kind*, is chosen here once
(:func:`kind_of`) from where the layer's tensors live: a dense float weight, FSDP2 row
shards, DeepSpeed ZeRO-3 partitions, or a bitsandbytes quantized base
(:mod:`srlora.kinds`). Everything that differs between them is the kind's business; the
rest of the method asks the target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .kinds.base import LoraTarget
from .kinds.bnb import BnbTarget, is_bnb_linear
from .kinds.dense import DenseTarget
from .kinds.fsdp2 import Fsdp2Target, full, is_sharded, local
from .kinds.zero3 import Zero3Target, gathered, is_partitioned, write_partition_
from .kinds.zero12 import Zero12Target, is_linked

__all__ = [
    "LoraTarget",
    "current_kind",
    "find_lora_targets",
    "fingerprint",
    "gathered_trainable",
    "is_sharded_model",
    "kind_of",
    "same_fingerprint",
    "shard_like",
    "shard_of",
    "whole_tensor",
    "write_shard_",
]


def kind_of(module: nn.Module, adapter: str) -> type[LoraTarget]:
    """The kind of a PEFT LoRA layer carrying ``adapter``, from where its tensors live now."""
    weight = module.get_base_layer().weight
    A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if is_partitioned(weight) or is_partitioned(A):
        return Zero3Target
    if is_sharded(weight) or is_sharded(A) or is_sharded(B):
        return Fsdp2Target
    if _is_quantized_lora(module):
        return BnbTarget
    if is_linked(A) or is_linked(B):
        return Zero12Target
    return DenseTarget


def current_kind(target: LoraTarget) -> LoraTarget | None:
    """A target of the layer's kind now, when it differs from ``target``'s (``None``: same);
    whether SRLoRA's state can follow is :meth:`~srlora.layer.LayerState.retarget`'s
    call. A kind that keeps state of its own (a quantized base) cannot change."""
    kind = kind_of(target.module, target.adapter)
    if kind is type(target):
        return None
    if target.state_dict():
        raise RuntimeError(f"adapted layer {target.name!r} ({target.kind}) cannot become {kind.kind}.")
    kind.check_module(target.name, target.module, target.adapter, _is_quantized_lora(target.module))
    return kind(target.name, target.module, target.adapter)


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole in this process: an FSDP2 DTensor is gathered (a collective); a ZeRO-3
    parameter must be inside :func:`gathered_trainable` (or DeepSpeed's own gather)."""
    return full(t)


@contextlib.contextmanager
def gathered_trainable(model: nn.Module) -> Iterator[None]:
    """Inside the block the model's trainable ZeRO-3 partitions are whole on every rank
    (the adapters and heads: small); nothing to do for other models."""
    params = [p for p in model.parameters() if p.requires_grad and is_partitioned(p)]
    with gathered(params, modify=False):
        yield


def is_sharded_model(targets: list[LoraTarget]) -> bool:
    """The model (or its optimizer) is split among processes (FSDP2 shards, ZeRO-3 partitions,
    ZeRO-1/2 optimizer partitions): its checkpoint is a folder with one file per rank."""
    return any(t.split_among_processes for t in targets)


def shard_of(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``t``: an FSDP2 DTensor's local shard, a ZeRO-3 parameter's
    flat partition, or ``t`` itself."""
    if is_partitioned(t):
        return t.ds_tensor  # type: ignore[attr-defined]
    return local(t)


def write_shard_(t: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (saved by :func:`shard_of`) into what this process holds of ``t`` (for
    a ZeRO-3 parameter a collective: :func:`~srlora.kinds.zero3.write_partition_`)."""
    if is_partitioned(t):
        write_partition_(t, value)
        return
    with torch.no_grad():
        shard_of(t.data).copy_(value)


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a local shard) as the kind of tensor ``like`` is: a DTensor with ``like``'s
    mesh and placements when ``like`` is one (an optimizer moment of a sharded parameter)."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        value.to(like.device),
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


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


def real_class(module: nn.Module) -> type:
    """The module's own class, under the dynamic subclass FSDP2's ``fully_shard`` swaps in
    (``FSDPLinear``, a subclass of ``FSDPModule`` and ``Linear``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _is_quantized_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer over a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``, whichever
    PEFT class wraps it (PEFT's bnb layers for a model loaded in 4/8 bits, its plain
    ``lora.Linear`` for one built by hand)."""
    return is_bnb_linear(module.get_base_layer())


def _is_peft_linear(module: nn.Module) -> bool:
    """PEFT's ``lora.Linear`` or one of its bitsandbytes LoRA layers (by the real class)."""
    from peft.tuners.lora import Linear as LoraLinear

    cls = real_class(module)
    return cls is LoraLinear or (
        cls.__module__ == "peft.tuners.lora.bnb" and cls.__name__ in ("Linear4bit", "Linear8bitLt")
    )


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
        if not _is_peft_linear(mod):
            raise ValueError(
                f"SRLoRA supports LoRA on nn.Linear, transformers' Conv1D and bitsandbytes' Linear4bit / "
                f"Linear8bitLt; layer {name!r} is a {type(mod).__module__}.{type(mod).__name__} (other quantized "
                f"bases and embedding/conv LoRA are not supported). Fix: {fix}, or load the base model unquantized "
                f"or in bitsandbytes 4/8 bits."
            )
        kind = kind_of(mod, adapter)
        base = mod.get_base_layer()
        if quantized:
            pass  # the weight is packed integers; SRLoRA reads it dequantized and never writes it
        elif real_class(base) is not nn.Linear and not _is_conv1d(base):
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
        kind.check_module(name, mod, adapter, quantized)  # what this kind refuses, with the way out
        target = kind(name, mod, adapter)
        if target.base_param.device.type == "meta":
            raise ValueError(f"Layer {name!r} lives on the meta device; load real weights before SRLoRA.")
        targets.append(target)
    return targets
