"""Run by test_sharded.py: the trained result out of a sharded run. Under torchrun (2
processes, CPU): SRLoRA on a model sharded by FSDP2 (``fsdp``) or partitioned by DeepSpeed
ZeRO-1/2/3 (``zero1``...), each rank on its half of every global batch; then ``export_lora``
and ``merge_and_unload`` (every rank calls them). Every ``MODE:ENTRY`` given runs in the one
launch (``tests/launch.py``); the test runs the one-process reference
(:func:`train_and_export` with mode ``reference``) itself.

    torchrun --nproc_per_node 2 sharded_worker.py OUT --runs fsdp:paper zero3:subspace ...
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CASES, make_base, make_peft
from launch import each, init_group
from procgroup import leave_process_group

from srlora import SRLoRA, SRLoRAConfig

# Two switches (steps 10 and 20) in 25 steps: enough to test each exactly, cheap to launch.
STEPS, GLOBAL_BATCH = 25, 8
CONFIG = SRLoRAConfig(r_target=16, gamma=0.5, switch_interval=10, optimizer_reset="zero")
# The entries of issue 24: new pairs along the windowed gradient's subspace, at half the first
# pairs' scale (the records of entered pairs, the sketches and their all-reduce all take part).
SUBSPACE = SRLoRAConfig(
    r_target=16,
    gamma=0.5,
    switch_interval=10,
    optimizer_reset="zero",
    direction_policy="gradient_subspace",
    entry_scale=0.5,
)
# The same, with W0's top 4 singular directions projected out of the sketched gradient (the
# cache keeps every row of U_4 on every rank; each rank projects the whole activations).
LEFT_ALONE = dataclasses.replace(SUBSPACE, subspace_exclude=4)
CONFIGS = {
    "paper": CONFIG,
    "subspace": SUBSPACE,
    "left-alone": LEFT_ALONE,
    "lora-start": dataclasses.replace(SUBSPACE, first_pairs="lora"),  # the slots start as PEFT built them
    # No record of fused or entered pairs: W holds them; the export takes the base's weights.
    "no-records": dataclasses.replace(SUBSPACE, fused_records=False),
    # Whitened by the input covariance of a general batch, each rank its half (summed over ranks).
    "whitened": dataclasses.replace(SUBSPACE, subspace_whiten=4),
}
MODES = ["fsdp", "zero1", "zero2", "zero3"]


def zero_engine(model: torch.nn.Module, stage: int, world: int) -> tuple:
    """``deepspeed.initialize`` at ZeRO ``stage`` with DeepSpeed's AdamW (lr 1e-2): ``(engine, optimizer)``."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine, opt


def root_sharded_controller() -> tuple[SRLoRA, int]:
    """Join the process group (gloo), shard the tiny BERT at its root with ``fully_shard`` and
    build SRLoRA on it; returns the controller and this process's rank."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        init_group()
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    fully_shard(model)
    return SRLoRA(model, CONFIG), dist.get_rank()


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "input_ids": torch.randint(0, 100, (GLOBAL_BATCH, 12), generator=g),
        "labels": torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
    }


def general_text(model: torch.nn.Module, config: SRLoRAConfig, rank: int, world: int):
    """``run_model`` of a whitened entry (``None`` otherwise): the model's forward on this rank's
    share of two batches no training step uses (every rank runs it: a sharded forward)."""
    if not config.subspace_whiten:
        return None
    share = GLOBAL_BATCH // world

    def run_model() -> None:
        for step in (500, 501):
            model(**{k: v[rank * share : (rank + 1) * share] for k, v in batch(step).items() if k != "labels"})

    return run_model


def whole_state(model: torch.nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the (merged) model, whole, on the CPU."""
    if mode == "zero3":  # partitioned parameters; under ZeRO-1/2 they are whole on every rank
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    from srlora.kinds.fsdp2 import full

    return {k: full(v).detach().float().cpu().clone() for k, v in model.state_dict().items()}


def train_and_export(mode: str, entry: str, out: Path, rank: int = 0, world: int = 1) -> dict:
    """Train under ``mode`` (fsdp, zero1/2/3; reference: one process, the full batches) with
    ``entry``'s configuration, export into ``out/adapter-MODE-ENTRY`` and merge."""
    config = CONFIGS[entry]
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    engine = None
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.bert.encoder.layer:
            fully_shard(block)
        fully_shard(model)
    if mode.startswith("zero"):
        engine, opt = zero_engine(model, int(mode[-1]), world)
        ctl = SRLoRA(model, config, run_model=general_text(model, config, rank, world))
    else:
        ctl = SRLoRA(model, config, run_model=general_text(model, config, rank, world))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        b = {k: v[rank * share : (rank + 1) * share] for k, v in batch(step).items()}
        if engine is not None:
            engine.backward(engine(**b).loss)
            ctl.update_importance()
            engine.step()
            ctl.step(opt)
        else:
            CASES["bert"].loss(model, b).backward()
            ctl.update_importance()
            opt.step()
            ctl.step(opt)
            opt.zero_grad()
    probe = batch(999)
    (engine or model).eval()
    with torch.no_grad():
        trained = (engine or model)(**{k: v[rank * share : (rank + 1) * share] for k, v in probe.items()}).logits
    base = None if config.fused_records else make_base(CASES["bert"])  # every rank passes the original
    errors = ctl.export_lora(out / f"adapter-{mode}-{entry}", base=base)
    merged = ctl.merge_and_unload()
    with torch.no_grad():  # through the root that was sharded (its hooks gather the parameters)
        after = (engine or model)(**{k: v[rank * share : (rank + 1) * share] for k, v in probe.items()}).logits
    return {"errors": errors, "trained": trained, "merged_logits": after, "merged": whole_state(merged, mode)}


def main() -> bool:
    """Every ``--runs MODE:ENTRY`` in one launch; returns whether DeepSpeed ran."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", nargs="+", required=True, help="MODE:ENTRY, MODE in " + ", ".join(MODES))
    args = ap.parse_args()
    rank, world = init_group(deepspeed=any(run.startswith("zero") for run in args.runs))
    results = each(args.runs, lambda run: train_and_export(*run.split(":"), args.out, rank, world))
    torch.save(results, args.out / f"sharded-rank{rank}.pt")
    return any(run.startswith("zero") for run in args.runs)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed_ran = main()
    leave_process_group(strict=not deepspeed_ran)  # DeepSpeed keeps its groups (tests/procgroup.py)
