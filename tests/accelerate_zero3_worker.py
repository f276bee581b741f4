"""Run by test_trainer_sharded.py under torchrun (2 CPU processes, DS_ACCELERATOR=cpu): a
user's Accelerate loop with DeepSpeed ZeRO-3 or (``--stage 2``) ZeRO-2 (accelerate's
DeepSpeedPlugin), (``--ddp``) accelerate's DDP, or (``--fsdp2``, on GPUs: accelerate applies its
FSDP plugin only on an accelerator) its FSDP2 plugin; SRLoRA built on
the model before ``accelerator.prepare`` and attached to the optimizer it returns. The data
are the Trainer test's, interleaved over the ranks, so the reference is the same.

    torchrun --nproc_per_node 2 accelerate_zero3_worker.py OUT [--stage 2 | --ddp | --fsdp2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CASES, make_peft
from procgroup import leave_process_group
from trainer_zero3_worker import CONFIG, LR, PER_RANK, STEPS, WORLD, examples, save_result

from srlora import SRLoRA, SRLoRAConfig


def main() -> None:
    from accelerate import Accelerator, DeepSpeedPlugin, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DummyOptim

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--stage", type=int, default=3, help="DeepSpeed ZeRO stage")
    ap.add_argument("--ddp", action="store_true", help="no DeepSpeed: accelerate's DDP")
    ap.add_argument("--fsdp2", action="store_true", help="accelerate's FSDP2 plugin (GPU only: ignored on a CPU)")
    args = ap.parse_args()
    ds = {
        "zero_optimization": {"stage": args.stage},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "train_micro_batch_size_per_gpu": PER_RANK,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
    }
    deepspeed = not (args.ddp or args.fsdp2)
    if deepspeed:
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --use_deepspeed` sets
    if not args.fsdp2:
        PartialState(backend="gloo", cpu=args.ddp)  # on the CPU: gloo, every process counted (as `accelerate launch`)
    accelerator = Accelerator(
        cpu=args.ddp,
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds) if deepspeed else None,
        fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2) if args.fsdp2 else None,
    )
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    ctl = SRLoRA(model, SRLoRAConfig(total_steps=STEPS, **CONFIG))  # before prepare: followed into ZeRO / FSDP2
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DummyOptim(params, lr=LR) if deepspeed else torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    engine, optimizer = accelerator.prepare(model, optimizer)
    ctl.attach(optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    data, per_step = examples(), PER_RANK * WORLD  # the reference's global batch, whatever the world size
    for step in range(STEPS):
        chunk = data[step * per_step : (step + 1) * per_step][rank::world]
        batch = {k: torch.stack([e[k] for e in chunk]).to(accelerator.device) for k in chunk[0]}
        accelerator.backward(engine(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    tag = "ddp" if args.ddp else "fsdp2" if args.fsdp2 else f"zero{args.stage}"
    save_result(ctl, model, args.out / f"accelerate-{tag}-rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
    leave_process_group(strict=False)  # after main: a framework keeps its groups (tests/procgroup.py)
