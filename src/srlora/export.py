"""Export an SRLoRA-trained model: merged, or as a standard PEFT LoRA adapter.

SRLoRA changes the frozen weight, so a plain ``save_pretrained`` of the adapter says
nothing about the model relative to the original pretrained weights. For each layer,
with ``p`` the number of singular directions used, the total update is exactly
low-rank::

    W_t + s B A - W0 = s F_B F_A + s B A - U[:, :p] diag(S[:p]) V[:, :p]^T

where ``F_B (m, p - r)``, ``F_A (p - r, n)`` are the pairs fused so far (recorded by each
:class:`~srlora.layer.LayerState` at its switches). Its rank is at most
``(p - r) + r + p = 2p``, as PiSSA's conversion to LoRA doubles r. :func:`export_lora`
writes it as PEFT LoRA factors (scaling 1), exact
when ``rank`` is ``None``, else truncated by SVD with the per-layer relative error
reported. A run that kept no records (``fused_records=False``) gives the same update as the
difference from the original model's weights (``base=``), factored at its rank.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_dir
from .collective import barrier, is_writer
from .layer import LayerState
from .targets import gathered_trainable, whole_tensor


@torch.no_grad()
def truncate(P: torch.Tensor, Q: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors ``(B, A)`` of ``P Q`` and the relative Frobenius error.

    Works on the small ``k x k`` core: ``P = Q_P R_P``, ``Q^T = Q_Q R_Q``,
    ``P Q = Q_P (R_P R_Q^T) Q_Q^T``; the SVD of the core gives the singular values of
    ``P Q``. ``rank=None`` keeps the numerical rank (error 0 up to float rounding).
    """
    P64, Q64 = P.double(), Q.double()
    qp, rp = torch.linalg.qr(P64)
    qq, rq = torch.linalg.qr(Q64.T)
    u, sv, vh = torch.linalg.svd(rp @ rq.T)
    total = float(sv.square().sum())
    if rank is None:
        tol = sv.max() * max(P.shape[0], Q.shape[1]) * torch.finfo(torch.float32).eps if sv.numel() else 0
        keep = int((sv > tol).sum())
    else:
        keep = min(rank, sv.numel())
    keep = max(keep, 1)
    root = sv[:keep].sqrt()
    B = (qp @ u[:, :keep]) * root
    A = root[:, None] * (vh[:keep] @ qq.T)
    err = (float(sv[keep:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return B.float(), A.float(), err


def export_lora(
    model: nn.Module,
    layers: Mapping[str, LayerState],
    adapter: str,
    path: str | Path,
    rank: int | None = None,
    base: nn.Module | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Write a PEFT LoRA adapter of the total update relative to the original weights.

    ``PeftModel.from_pretrained(original_base_model, path)`` then computes what the
    trained SRLoRA model computes. Layer ``i`` gets rank ``min(rank, rank of its update)``
    (``rank=None``: exact) and scaling 1; other trainable modules PEFT saves with the
    adapter (``modules_to_save``, e.g. a classification head) are copied as they are.
    The folder is written atomically (built beside ``path``, then swapped in). Returns
    and writes (``reconstruction_error.json``) each layer's relative Frobenius error.

    Under torch.distributed (FSDP2, DeepSpeed ZeRO-3) every rank calls it: each layer's
    factors are gathered in turn (``m x 2p`` numbers, never a whole weight), and rank 0
    writes the folder (the other ranks return ``{}`` once it is written).

    Args:
        model: the PEFT model SRLoRA trained.
        layers: the controller's layers (``SRLoRA.layers``).
        adapter: the adapter name.
        base: the original pretrained model (or its state dict), needed only where the layers
            keep no record of their fused pairs (``fused_records=False``): each layer's update
            is then ``W_t + s B A - W0``, factored at its rank (every process passes it).
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 or None (exact), got {rank}.")
    barrier("export_lora")  # every rank, or a clear error before the first gather
    writer = is_writer()
    with gathered_trainable(model):  # ZeRO-3: the adapter's and the head's partitions, gathered
        state = {
            k: whole_tensor(v).detach().cpu().clone().contiguous()
            for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()
        }
    peft_config = copy.deepcopy(model.peft_config[adapter])
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    for name, layer in layers.items():
        # one layer at a time; a collective for a sharded layer
        P, Q = layer.total_update_factors(None if layer.keeps_records else base_weight(base, name))
        if not writer:
            continue
        B, A, err = truncate(P, Q, rank)
        key = name.split("base_model.model.", 1)[-1]
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if a_key not in state or b_key not in state:
            raise KeyError(f"PEFT state dict has no {a_key}; unsupported PEFT layout.")
        state[a_key] = A.cpu().contiguous()
        state[b_key] = B.cpu().contiguous()
        ranks[key] = B.shape[1]
        errors[key] = err
    if not writer:
        barrier("export_lora")  # returns once rank 0 has written the folder
        return {}
    r_max = max(ranks.values())
    peft_config.r = r_max
    peft_config.lora_alpha = r_max
    peft_config.use_rslora = False
    peft_config.rank_pattern = dict(ranks)
    peft_config.alpha_pattern = dict(ranks)  # scaling = alpha / r = 1 in every layer
    peft_config.init_lora_weights = True
    peft_config.inference_mode = True

    with atomic_dir(path) as tmp:
        peft_config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "reconstruction_error.json").write_text(
            json.dumps({"rank": rank, "ranks": ranks, "relative_frobenius_error": errors}, indent=2)
        )
    barrier("export_lora")
    return errors


def base_weight(base: nn.Module | Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor:
    """The pretrained weight of the PEFT layer ``name`` in ``base`` (the original model, or its
    state dict), by the module path under PEFT's wrapper."""
    if base is None:
        raise ValueError(
            f"layer {name!r} keeps no record of its fused pairs (fused_records=False): pass the original "
            f"pretrained model, export_lora(..., base=AutoModel...from_pretrained(<the run's base>))."
        )
    key = name.split("base_model.model.", 1)[-1]
    if isinstance(base, nn.Module):
        try:
            return base.get_submodule(key).weight
        except AttributeError as err:
            raise KeyError(f"the base model has no module {key!r}: pass the model the run started from.") from err
    if f"{key}.weight" not in base:
        raise KeyError(f"the base state dict has no {key}.weight: pass that of the model the run started from.")
    return base[f"{key}.weight"]


@torch.no_grad()
def merge_layers_(model: nn.Module, layers: Mapping[str, LayerState]) -> None:
    """Merge every layer's adapter, as its kind does it: ``W += s B A`` in the weight each
    process holds, or a new module (a quantized base becomes a float32 ``nn.Linear`` of
    ``dequant(W_q)`` plus its total update). PEFT's ``unload`` then removes the LoRA modules."""
    for name, layer in layers.items():

        def update(layer: LayerState = layer) -> torch.Tensor:
            P, Q = layer.total_update_factors()
            return P @ Q

        module = layer.target.merged_module(update)
        if module is None:
            layer.target.merge_adapter_()
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
