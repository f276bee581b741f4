"""Run by test_trainer_sharded.py under torchrun (2 CPU processes, DS_ACCELERATOR=cpu): a
user's Accelerate loop with DeepSpeed ZeRO-3 (accelerate's DeepSpeedPlugin); SRLoRA built on
the model before ``accelerator.prepare`` and attached to the optimizer it returns. The data
are the Trainer test's, interleaved over the ranks, so the reference is the same.

    torchrun --nproc_per_node 2 accelerate_zero3_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CASES, make_peft
from trainer_zero3_worker import CONFIG, LR, PER_RANK, STEPS, WORLD, examples, save_result

from srlora import SRLoRA, SRLoRAConfig


def main() -> None:
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DummyOptim

    out = Path(sys.argv[1])
    ddp = "--ddp" in sys.argv  # no DeepSpeed: accelerate's DDP
    ds = {
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "train_micro_batch_size_per_gpu": PER_RANK,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
    }
    from accelerate import PartialState

    if not ddp:
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --use_deepspeed` sets
    PartialState(backend="gloo", cpu=ddp)  # on the CPU: gloo, every process counted (as `accelerate launch` does)
    accelerator = Accelerator(cpu=ddp, deepspeed_plugin=None if ddp else DeepSpeedPlugin(hf_ds_config=ds))
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    ctl = SRLoRA(model, SRLoRAConfig(total_steps=STEPS, **CONFIG))  # before prepare: followed into ZeRO-3
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0) if ddp else DummyOptim(params, lr=LR)
    engine, optimizer = accelerator.prepare(model, optimizer)
    ctl.attach(optimizer)
    rank = accelerator.process_index
    data = examples()
    for step in range(STEPS):
        chunk = data[step * PER_RANK * WORLD : (step + 1) * PER_RANK * WORLD][rank::WORLD]
        batch = {k: torch.stack([e[k] for e in chunk]) for k in chunk[0]}
        accelerator.backward(engine(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    save_result(ctl, model, out / f"accelerate{'-ddp' if ddp else ''}-rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
