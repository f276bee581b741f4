"""Run by test_distributed.py under torchrun (2 processes, gloo on CPU): SRLoRA under
DistributedDataParallel, each rank on its own data; writes this rank's final state."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CASES, make_peft
from launch import init_group
from procgroup import leave_process_group

from srlora import SRLoRA, SRLoRAConfig


def main() -> None:
    out = Path(sys.argv[1])
    rank, _ = init_group()
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    if rank == 1:
        # Make sure rank 1 cannot get its directions by itself: its own SVD would differ.
        for name, p in model.named_parameters():
            if "base_layer.weight" in name:
                p.data.add_(1e-3 * torch.randn_like(p))
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, gamma=0.5, total_steps=120, svd_method="randomized", seed=rank))
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(120):
        batch = CASES["bert"].batch(g)
        ddp(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(
        {"model": {k: v.clone() for k, v in model.state_dict().items()}, "controller": ctl.state_dict()},
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    leave_process_group()  # after main's objects are gone: tests/procgroup.py
