"""The methods the absorption runs compare, each built over the same base model with its own
package's code: PEFT LoRA and its initialisations (PiSSA; CorDA in its knowledge-preserved
mode; MiCA; LoRA-GA), SRLoRA on top of PEFT LoRA, full fine-tuning of the adapted matrices, and
GaLore (galore-torch's own AdamW) on them; with what each learnt (:func:`spectra`) and what it
keeps in memory beside the frozen model (:func:`trainable_state_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..memory import tensor_bytes
from .adapters import peft_model


class MethodConfig(Protocol):
    """What a run's configuration gives the builders (the absorption runs' ``AbsorbConfig``)."""

    method: str
    r: int
    lr: float
    batch: int
    seed: int
    switch_interval: int | None
    galore_scale: float
    start: str | None  # SRLoRA's slots from this PEFT initialisation (corda, lora_ga)

    def srlora_config(self) -> Any: ...


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@torch.no_grad()
def update_spectrum(P: torch.Tensor, Q: torch.Tensor, keep: int = 64) -> dict[str, Any]:
    """Singular values of ``P Q`` (an update given as factors), from the small core
    ``R_P R_Q^T`` of their QR decompositions; with its effective rank
    ``exp(H(sigma^2 / sum sigma^2))`` and the ranks holding 90% / 99% of its energy."""
    _, rp = torch.linalg.qr(P.double())
    _, rq = torch.linalg.qr(Q.double().T)
    return summarise(torch.linalg.svdvals(rp @ rq.T), keep)


def summarise(sv: torch.Tensor, keep: int = 64) -> dict[str, Any]:
    """The summary :func:`update_spectrum` gives, from singular values ``sv`` (descending)."""
    energy = sv.square()
    total = float(energy.sum())
    if total == 0:
        return {"sv": [], "effective_rank": 0.0, "rank90": 0, "rank99": 0, "norm": 0.0}
    p = energy / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    cum = torch.cumsum(p, 0)
    return {
        "sv": [float(x) for x in sv[:keep]],
        "effective_rank": math.exp(entropy),
        "rank90": int((cum < 0.90).sum()) + 1,
        "rank99": int((cum < 0.99).sum()) + 1,
        "norm": total**0.5,
    }


def _require(module: str, extra: str, method: str) -> Any:
    """Import ``module`` for ``--method method``, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"--method {method} needs the {module!r} package: pip install 'srlora[{extra}]' ({exc})."
        ) from exc


def target_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every adapted projection (``TARGETS``), by module name."""
    return {
        name: mod.weight
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }


@dataclass
class Built:
    """One method ready to train: the model, its optimizer, SRLoRA's controller (or None) and
    what the learnt update is measured against (:func:`spectra`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    controller: Any = None
    # adapters that start away from B A = 0 (PiSSA, CorDA, LoRA-GA): each layer's (B0, A0)
    init: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    # full fine-tuning and GaLore: each adapted weight as it was at step 0
    w0: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _lora_config(cfg: MethodConfig) -> Any:
    import peft

    init: Any = {"pissa": "pissa", "corda": "corda", "mica": "mica", "lora_ga": "lora_ga"}.get(cfg.method, True)
    init = cfg.start or init  # an SRLoRA run's slots from CorDA's or LoRA-GA's start
    extra: dict[str, Any] = {}
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig

        extra["corda_config"] = CordaConfig(corda_method="kpm")  # knowledge-preserved mode
    if init == "lora_ga":
        extra["lora_ga_config"] = peft.LoraGAConfig()
    return peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.r, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=init, **extra
    )


def _run_batches(model: nn.Module, blocks: torch.Tensor, batch: int, backward: bool) -> None:
    for i in range(0, len(blocks), batch):
        ids = blocks[i : i + batch]
        out = model(input_ids=ids, labels=ids)
        if backward:
            out.loss.backward()


def build(
    cfg: MethodConfig, base: nn.Module, general: torch.Tensor | None = None, train: torch.Tensor | None = None
) -> Built:
    """The model of ``cfg.method`` over ``base``, with its optimizer (AdamW at ``cfg.lr``; GaLore's
    own AdamW for galore). CorDA takes its input covariance from the blocks ``general`` (through
    PEFT's own code, as LoRA-GA its gradient from the first ``8 * batch`` training blocks), and
    so does SRLoRA's ``subspace_whiten``."""
    import peft

    from .. import SRLoRA

    torch.manual_seed(cfg.seed)
    if cfg.method in ("full", "galore"):
        base.requires_grad_(False)
        weights = target_weights(base)
        for w in weights.values():
            w.requires_grad_(True)
        w0 = {name: w.detach().clone() for name, w in weights.items()}
        if cfg.method == "full":
            opt: torch.optim.Optimizer = torch.optim.AdamW(list(weights.values()), lr=cfg.lr, weight_decay=0.0)
        else:
            galore = _require("galore_torch", "galore", "galore")
            group = {
                "params": list(weights.values()),
                "rank": cfg.r,
                "update_proj_gap": cfg.switch_interval,
                "scale": cfg.galore_scale,
                "proj_type": "std",
            }
            opt = galore.GaLoreAdamW([group], lr=cfg.lr, weight_decay=0.0, no_deprecation_warning=True)
        torch.manual_seed(cfg.seed)
        return Built(base, opt, w0=w0)
    lora = _lora_config(cfg)
    start = cfg.start or cfg.method  # whose PEFT initialisation (CorDA's, LoRA-GA's) to run
    whiten = cfg.method == "srlora" and cfg.srlora_config().subspace_whiten > 0
    if ((start == "corda" or whiten) and general is None) or (start == "lora_ga" and train is None):
        raise ValueError(f"--method {cfg.method} needs its calibration blocks (general text / training data).")
    if start == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        # PEFT's covariance hook takes one sequence at a time (it squeezes the batch dimension)
        preprocess_corda(base, lora, run_model=lambda: _run_batches(base, general, 1, backward=False))
    if start == "lora_ga":
        from peft.tuners.lora.loraga import preprocess_loraga

        calibration = train[: 8 * cfg.batch]
        preprocess_loraga(base, lora, train_step=lambda: _run_batches(base, calibration, cfg.batch, backward=True))
        base.zero_grad(set_to_none=True)
    model = peft_model(base, lora)
    # subspace_whiten's input covariance: the same general text as CorDA's
    run_model = (lambda: _run_batches(model, general, cfg.batch, backward=False)) if whiten else None
    ctl = SRLoRA(model, cfg.srlora_config(), run_model=run_model) if cfg.method == "srlora" else None
    init = {}
    if cfg.method in ("pissa", "corda", "lora_ga"):
        for name, mod in model.named_modules():
            if isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in mod.lora_A:
                init[name] = (
                    mod.lora_B["default"].weight.detach().clone(),
                    mod.lora_A["default"].weight.detach().clone(),
                )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed)
    return Built(model, opt, ctl, init=init)


def spectra(built: Built, base: nn.Module | None = None) -> dict[str, Any]:
    """Each adapted layer's :func:`update_spectrum` (``W_t + s B A - W0``); ``base``: the
    pretrained model, for an SRLoRA run that kept no record of its fused pairs."""
    import peft

    from ..export import base_weight

    model, ctl, init = built.model, built.controller, built.init
    out = {}
    if built.w0:
        for name, w in target_weights(model).items():
            out[name] = summarise(torch.linalg.svdvals(w.detach().double() - built.w0[name].double()))
        return out
    if ctl is not None:
        for name, layer in ctl.layers.items():
            out[name] = update_spectrum(
                *layer.total_update_factors(None if layer.keeps_records else base_weight(base, name))
            )
        return out
    for name, mod in model.named_modules():
        if not (isinstance(mod, peft.tuners.lora.LoraLayer) and "default" in mod.lora_A):
            continue
        s = float(mod.scaling["default"])
        B, A = mod.lora_B["default"].weight.detach().float(), mod.lora_A["default"].weight.detach().float()
        if name in init:
            B0, A0 = init[name]
            P, Q = torch.cat([s * B, -s * B0.float()], 1), torch.cat([A, A0.float()], 0)
        else:
            P, Q = s * B, A
        out[name] = update_spectrum(P, Q)
    return out


def trainable_state_bytes(built: Built) -> dict[str, int]:
    """What a method keeps beside the frozen model, counted from the tensors: what trains (and an
    adapter's frozen factors, MiCA's B), its gradients, the optimizer's state, and what the method
    keeps for itself (SRLoRA's SVD cache, importance, records and sketches). Call it after the
    optimizer's step and before the gradients are cleared."""
    import peft

    seen: set[int] = set()
    trains = [p for p in built.model.parameters() if p.requires_grad]
    adapter = [
        p
        for mod in built.model.modules()
        if isinstance(mod, peft.tuners.lora.LoraLayer)
        for p in (*mod.lora_A.parameters(), *mod.lora_B.parameters())
    ]
    parts = {
        "params": tensor_bytes([*trains, *adapter], seen),
        "grads": tensor_bytes([p.grad for p in trains if p.grad is not None], seen),
        "optimizer": tensor_bytes(list(built.optimizer.state.values()), seen),
        "method": 0,
    }
    if built.controller is not None:
        parts["method"] = built.controller.memory_bytes(seen)
    parts["trainable_state_bytes"] = sum(parts.values())
    return parts
