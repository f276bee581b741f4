"""Run by test_sharded.py under torchrun (2 processes, gloo on CPU): SRLoRA under FSDP2
whatever ``fully_shard`` wraps, each rank on its half of every global batch; also without
torchrun, as the single-process reference on the full batches.

Wraps (each followed by the root, as FSDP2 wants): ``root`` only, transformer ``blocks``,
each PEFT ``lora-layer``, each LoRA layer's ``base-layer``, each ``lora_A`` / ``lora_B``
``leaf`` (PEFT's own auto-wrap policy), a ``mix`` of the last three, and ``blocks-bf16``
(``MixedPrecisionPolicy(param_dtype=bfloat16)``: bfloat16 compute, float32 masters), and
``built-before``: blocks and root, with SRLoRA built before ``fully_shard`` (as a Trainer does).

    torchrun --nproc_per_node 2 fsdp_wraps_worker.py OUT [WRAP ...]
    python fsdp_wraps_worker.py OUT --reference
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CASES, make_peft
from launch import init_group
from procgroup import leave_process_group

from srlora import SRLoRA, SRLoRAConfig
from srlora.kinds.fsdp2 import full

STEPS, GLOBAL_BATCH = 35, 8  # switches at steps 15 and 30, then one forced
WRAPS = ("root", "blocks", "lora-layer", "base-layer", "leaf", "mix", "blocks-bf16", "built-before")
CONFIG = SRLoRAConfig(r_target=16, gamma=0.5, switch_interval=15)


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "input_ids": torch.randint(0, 100, (GLOBAL_BATCH, 12), generator=g),
        "labels": torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
    }


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def wrap(model: torch.nn.Module, how: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = list(model.base_model.model.bert.encoder.layer)
    layers = lora_layers(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if how == "blocks-bf16" else {}

    def leaves(layer: torch.nn.Module) -> None:
        fully_shard(layer.lora_A["default"])
        fully_shard(layer.lora_B["default"])

    if how in ("blocks", "blocks-bf16", "built-before"):
        for block in blocks:
            fully_shard(block, **kwargs)
    elif how == "lora-layer":
        for layer in layers:
            fully_shard(layer)
    elif how == "base-layer":
        for layer in layers:
            fully_shard(layer.base_layer)
    elif how == "leaf":
        for layer in layers:
            leaves(layer)
    elif how == "mix":  # block 0: whole LoRA layers / base layers alternately; block 1: leaves
        for i, layer in enumerate(layers):
            if i < len(layers) // 2:
                fully_shard(layer if i % 2 == 0 else layer.base_layer)
            else:
                leaves(layer)
    elif how != "root":
        raise ValueError(how)
    fully_shard(model, **kwargs)


def effective_weights(ctl: SRLoRA) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in ctl.layers.items():
        t = layer.target
        W = full(t.base_param.data).float()
        out[name] = W + t.scaling * (full(t.lora_B.data).float() @ full(t.lora_A.data).float())
    return out


def run(how: str | None, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)  # no dropout: every run sees the same function
    if how == "built-before":  # SRLoRA on the whole model, then fully_shard, then attach
        ctl = SRLoRA(model, CONFIG)
        wrap(model, how)
    else:
        if how is not None:
            wrap(model, how)
        ctl = SRLoRA(model, CONFIG)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    kinds = sorted({layer.target.kind for layer in ctl.layers.values()})
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        b = {k: v[rank * share : (rank + 1) * share] for k, v in batch(step).items()}
        CASES["bert"].loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    masters = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    before = effective_weights(ctl)
    ctl.switch(opt)  # a forced switch leaves every effective weight (float32 masters) unchanged
    moved = max(float((w - before[n]).norm() / before[n].norm()) for n, w in effective_weights(ctl).items())
    return {
        "switch_moved": moved,
        "kinds": kinds,
        "masters": masters,
        "weights": effective_weights(ctl),
        "history": [e.to_dict() for e in ctl.history],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("wraps", nargs="*", default=list(WRAPS))
    ap.add_argument("--reference", action="store_true")
    args = ap.parse_args()
    if args.reference:
        torch.save(run(None, 0, 1), args.out / "wraps-reference.pt")
        return
    rank, world = init_group()
    results = {}
    for how in args.wraps:
        try:
            results[how] = run(how, rank, world)
        except Exception as exc:  # recorded, so that the test names the wrap that failed
            results[how] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(results, args.out / f"wraps-rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    leave_process_group()  # after main's objects are gone: tests/procgroup.py
