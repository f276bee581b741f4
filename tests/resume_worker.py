"""Trains the tiny BERT with SRLoRA, checkpointing every few steps; used by
test_checkpoint.py as a subprocess that can be killed with SIGKILL and resumed.

    python resume_worker.py CKPT OUT --steps 60 --every 10 [--kill-at 37] [--resume]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CASES, adam, build

from srlora import load_checkpoint, save_checkpoint


def batch(step: int) -> dict:
    # Stateless data order: batch t depends on t only, as a resumable loader's would.
    return CASES["bert"].batch(torch.Generator().manual_seed(1000 + step))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, ctl = build(
        "bert", r=4, r_target=16, gamma=0.5, total_steps=args.steps, lora_kwargs={"lora_dropout": 0.1}
    )  # dropout: the RNG state matters too
    opt = adam(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / (args.steps + 1))
    ctl.attach(opt)
    start = load_checkpoint(args.ckpt, model, ctl, opt, sched) if args.resume else 0
    model.train()
    for step in range(start + 1, args.steps + 1):
        CASES["bert"].loss(model, batch(step)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % args.every == 0:
            save_checkpoint(args.ckpt, model, ctl, opt, sched, step=step)
        if args.kill_at == step:
            os.kill(os.getpid(), signal.SIGKILL)
    final = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "controller": ctl.state_dict(),
        "optimizer": opt.state_dict(),
    }
    torch.save(final, args.out)
    return final


if __name__ == "__main__":
    main(sys.argv[1:])
