"""Run by test_distributed.py under torchrun (2 processes, CPU): SRLoRA under DeepSpeed ZeRO-3,
attached to the engine's optimizer (``--order after``: built after ``deepspeed.initialize``)
or driven by hand around the engine (``--order before``), each rank on its half of every
global batch, at ZeRO-3, 2 or 1; every ``ORDER-STAGE`` in one launch. The test runs the
single-process reference on the full batches (:func:`reference`).

    torchrun --nproc_per_node 2 zero3_worker.py OUT [--runs before-3 after-3 after-2 after-1]
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

STEPS, GLOBAL_BATCH = 25, 8  # switches at steps 10 and 20
CONFIG = SRLoRAConfig(r_target=16, gamma=0.5, switch_interval=10, optimizer_reset="zero")


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "input_ids": torch.randint(0, 100, (GLOBAL_BATCH, 12), generator=g),
        "labels": torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
    }


def effective_weights(ctl: SRLoRA, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from srlora.kinds.zero3 import gathered

    out = {}
    with gathered(list(model.parameters()), modify=False):
        for name, layer in ctl.layers.items():
            t = layer.target
            out[name] = t.base_param.detach().float() + t.scaling * (t.lora_B.detach().float() @ t.lora_A.float())
    return out


def reference() -> dict:
    """One process on the full batches, no DeepSpeed."""
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    ctl = SRLoRA(model, CONFIG)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(STEPS):
        CASES["bert"].loss(model, batch(step)).backward()
        ctl.update_importance()
        opt.step()
        ctl.step(opt)
        opt.zero_grad()
    return {"weights": effective_weights(ctl, model), "history": [e.to_dict() for e in ctl.history]}


def run(order: str, stage: int, rank: int, world: int) -> dict:
    """SRLoRA built ``before`` or ``after`` ``deepspeed.initialize`` at ZeRO ``stage``."""
    import deepspeed

    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    if order == "before":
        ctl = SRLoRA(model, CONFIG)  # on the whole model; DeepSpeed partitions the result
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    if order == "after":
        ctl = SRLoRA(model, CONFIG)  # on the partitioned model: gathered per layer
        ctl.attach(optimizer)  # around the ZeRO optimizer's step: the engine loop needs nothing else
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        b = {k: v[rank * share : (rank + 1) * share] for k, v in batch(step).items()}
        loss = engine(**b).loss
        engine.backward(loss)
        if stage == 3 and step == STEPS - 1:
            gathers = gathers_of_importance_inputs(ctl)
        if order == "before":  # by hand, the same
            ctl.update_importance()
        engine.step()
        if order == "before":
            ctl.step(optimizer)
    return {
        "weights": effective_weights(ctl, model),
        "history": [e.to_dict() for e in ctl.history],
        "attached": ctl.attached,
        "gathers": gathers if stage == 3 else None,
    }


def gathers_of_importance_inputs(ctl: SRLoRA) -> dict:
    """The importance's inputs of every layer gathered at once (one all-gather) and one by one
    through DeepSpeed's full accessors: whether they are equal, and each way's all-gathers."""
    import torch.distributed.distributed_c10d as c10d

    from srlora.kinds.zero3 import Zero3Target

    targets = [layer.target for layer in ctl.layers.values()]
    calls = {"n": 0}
    original = c10d.all_gather_single  # under every all_gather_into_tensor, DeepSpeed's included

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    c10d.all_gather_single = counted
    try:
        batched = Zero3Target.importance_inputs_batched(targets)
        at_once, calls["n"] = calls["n"], 0
        one_by_one = [target.importance_inputs() for target in targets]
    finally:
        c10d.all_gather_single = original
    equal = all(torch.equal(a, b) for x, y in zip(batched, one_by_one, strict=True) for a, b in zip(x, y, strict=True))
    return {"equal": equal, "at_once": at_once, "one_by_one": calls["n"], "layers": len(targets)}


def main() -> None:
    """Each ``--runs ORDER-STAGE`` in one launch."""

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", nargs="+", default=["before-3", "after-3", "after-2", "after-1"])
    args = ap.parse_args()
    rank, world = init_group(deepspeed=True)

    def one(name: str) -> dict:
        order, stage = name.split("-")
        return run(order, int(stage), rank, world)

    torch.save(each(args.runs, one), args.out / f"zero-rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
    leave_process_group(strict=False)  # after main: a framework keeps its groups (tests/procgroup.py)
