"""Run by test_distributed.py under torchrun (2 processes, gloo on CPU): SRLoRA on a model
sharded with FSDP2 (fully_shard per block and the root), each rank on its half of every
global batch, with each direction policy, and SRLoRA switched before the shard (refused); all
in one launch. The test runs the one-process reference on the full batches (:func:`run`).

    torchrun --nproc_per_node 2 fsdp_worker.py OUT [--runs spectrum gradient srlora-first]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CASES, make_peft
from launch import each, init_group
from procgroup import leave_process_group

from srlora import SRLoRA, SRLoRAConfig
from srlora.kinds.fsdp2 import full

STEPS, GLOBAL_BATCH = 45, 8


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "input_ids": torch.randint(0, 100, (GLOBAL_BATCH, 12), generator=g),
        "labels": torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
    }


def effective_weights(ctl: SRLoRA) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in ctl.layers.items():
        t = layer.target
        W = full(t.base_param.data).float()
        out[name] = W + t.scaling * (full(t.lora_B.data).float() @ full(t.lora_A.data).float())
    return out


def shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.base_model.model.bert.encoder.layer:
        fully_shard(block)
    fully_shard(model)


def srlora_first(policy: str) -> dict:
    """SRLoRA built and switched on whole layers, then the model sharded: attach must refuse."""
    config = SRLoRAConfig(r_target=16, gamma=0.5, switch_interval=20, direction_policy=policy)
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    early = SRLoRA(model, config)
    early.switch()  # its state now holds whole layers' fused pairs: it cannot follow a split
    shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    try:
        early.attach(opt)
    except RuntimeError as exc:
        return {"refused": str(exc)}
    return {"refused": None}


def run(policy: str, rank: int = 0, world: int = 1) -> dict:
    """45 steps of SRLoRA with ``policy``'s new pairs: FSDP2 per block and root on ``world``
    ranks, or (``world == 1``) the one-process reference on the full batches."""
    config = SRLoRAConfig(r_target=16, gamma=0.5, switch_interval=20, direction_policy=policy)
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)  # no dropout: both runs see the same function
    if world > 1:
        shard(model)
    ctl = SRLoRA(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        b = {k: v[rank * share : (rank + 1) * share] for k, v in batch(step).items()}
        CASES["bert"].loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    # SRLoRA's own state, saved per rank, loads into a controller built the same way.
    restored = None
    if world > 1:
        torch.manual_seed(0)
        fresh = make_peft(CASES["bert"], r=4, alpha=8)
        shard(fresh)
        again = SRLoRA(fresh, config)
        again.load_state_dict(ctl.state_dict())
        restored = {k: v.cpu() for k, v in again.pair_scores().items()}
    return {
        "restored_scores": restored,
        "weights": effective_weights(ctl),
        "history": [e.to_dict() for e in ctl.history],
        "scores": {k: v.cpu() for k, v in ctl.pair_scores().items()},
        "svd_rows": {name: layer.cache.U.shape[0] for name, layer in ctl.layers.items()},
        "state": ctl.state_dict(),
    }


def main() -> None:
    """Each ``--runs`` check in one launch: a policy's name (:func:`run`) or ``srlora-first``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", nargs="+", default=["spectrum", "gradient", "srlora-first"])
    args = ap.parse_args()
    rank, world = init_group()
    results = each(
        args.runs, lambda name: srlora_first("spectrum") if name == "srlora-first" else run(name, rank, world)
    )
    torch.save(results, args.out / f"fsdp-rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    leave_process_group()  # after main's objects are gone: tests/procgroup.py
