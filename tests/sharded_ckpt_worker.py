"""Run by test_sharded_checkpoint.py under torchrun (2 processes, CPU): checkpoints of a sharded run.
Trains to step SAVE (15) under FSDP2 (``--mode fsdp``) or DeepSpeed ZeRO-1/2/3 (``--mode zero1|2|3``), saves
(every rank), trains on to step END (25); then builds everything again, loads the checkpoint and
trains the same steps again; every ``MODE:ENTRY`` given in one launch. With ``--kill`` a
second save is interrupted by SIGKILL after the rank files are written and before the folder
is swapped in.

    torchrun --nproc_per_node 2 sharded_ckpt_worker.py OUT --runs fsdp:paper zero3:subspace ... [--kill]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CASES, make_peft
from launch import each, init_group
from procgroup import leave_process_group
from sharded_worker import CONFIGS, GLOBAL_BATCH, MODES, batch, general_text, whole_state, zero_engine

import srlora.checkpoint_sharded as sharded
from srlora import SRLoRA, SRLoRAConfig, load_checkpoint, save_checkpoint

# Saved 5 steps into the window after the first switch (step 10); the second (step 20) comes
# after the resume.
SAVE, END = 15, 25


def build(mode: str, rank: int, world: int, config: SRLoRAConfig) -> tuple:
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.bert.encoder.layer:
            fully_shard(block)
        fully_shard(model)
        ctl = SRLoRA(model, config, run_model=general_text(model, config, rank, world))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        ctl.attach(opt)
        return model, ctl, opt, None
    engine, opt = zero_engine(model, int(mode[-1]), world)
    return model, SRLoRA(model, config, run_model=general_text(model, config, rank, world)), opt, engine


def train(model, ctl, opt, engine, rank: int, world: int, start: int, stop: int) -> None:
    share = GLOBAL_BATCH // world
    for step in range(start, stop):
        b = {k: v[rank * share : (rank + 1) * share] for k, v in batch(step).items()}
        if engine is not None:
            engine.backward(engine(**b).loss)
            ctl.update_importance()
            engine.step()
            ctl.step(opt)
        else:
            CASES["bert"].loss(model, b).backward()
            opt.step()
            opt.zero_grad()


def checkpointed_run(mode: str, entry: str, out: Path, rank: int, world: int, kill: bool = False) -> dict:
    """Train to step SAVE, save, train on to END; then rebuild, load and train SAVE-END again. A
    checkpoint already in place (left by a killed save) is loaded first, as the survivor."""
    config = CONFIGS[entry]
    ckpt = out / f"ckpt-{mode}-{entry}"
    survivor = None
    if (ckpt / "manifest.json").is_file():  # left by an earlier (killed) run: it must load whole
        model, ctl, opt, engine = build(mode, rank, world, config)
        survivor = {"step": load_checkpoint(ckpt, model, ctl, engine or opt), "state": whole_state(model, mode)}

    model, ctl, opt, engine = build(mode, rank, world, config)
    train(model, ctl, opt, engine, rank, world, 0, SAVE)
    at_save = whole_state(model, mode)
    save_checkpoint(ckpt, model, ctl, engine or opt)
    if kill:
        train(model, ctl, opt, engine, rank, world, SAVE, SAVE + 3)
        calls = {"n": 0}
        original = sharded.barrier

        def dying_barrier(what: str = "") -> None:
            calls["n"] += 1
            if calls["n"] == 2 and rank == 1:  # rank 1's file is written; the swap has not happened
                os.kill(os.getpid(), signal.SIGKILL)
            original(what)

        sharded.barrier = dying_barrier
        save_checkpoint(ckpt, model, ctl, engine or opt)  # never returns: rank 1 dies, torchrun stops both
        return {}
    train(model, ctl, opt, engine, rank, world, SAVE, END)
    straight = {"history": [e.to_dict() for e in ctl.history], "state": whole_state(model, mode)}

    model, ctl, opt, engine = build(mode, rank, world, config)
    step = load_checkpoint(ckpt, model, ctl, engine or opt)
    train(model, ctl, opt, engine, rank, world, step, END)
    resumed = {"history": [e.to_dict() for e in ctl.history], "state": whole_state(model, mode), "step": step}
    return {"straight": straight, "resumed": resumed, "survivor": survivor, "at_save": at_save}


def main() -> bool:
    """Every ``--runs MODE:ENTRY`` in one launch; returns whether DeepSpeed ran."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument(
        "--runs", nargs="+", required=True, help="MODE:ENTRY (MODE in " + ", ".join(MODES) + ") or wrong-rank"
    )
    ap.add_argument("--kill", action="store_true", help="kill rank 1 inside the second save of the (one) run")
    args = ap.parse_args()
    deepspeed_ran = any(run.startswith("zero") for run in args.runs)
    rank, world = init_group(deepspeed=deepspeed_ran)

    def one(run: str) -> dict:
        if run == "wrong-rank":  # the same two ranks: rank 0's state offered to rank 1
            from wrong_rank_state_worker import state_of_another_rank

            return state_of_another_rank()
        return checkpointed_run(*run.split(":"), args.out, rank, world, args.kill)

    results = each(args.runs, one)
    torch.save(results, args.out / f"ckpt-rank{rank}.pt")
    return deepspeed_ran


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed_ran = main()
    leave_process_group(strict=not deepspeed_ran)  # DeepSpeed keeps its groups (tests/procgroup.py)
