"""Run by test_trainer_sharded.py: the Hugging Face Trainer with DeepSpeed ZeRO (stage 3, 2 or 1)
on 2 CPU processes (torchrun, ``DS_ACCELERATOR=cpu``), SRLoRA from its callback (built from
a config when training starts), each rank on half of every global batch; ``--reference``:
one process, no Trainer, SRLoRA on the full batches in the same order.

    torchrun --nproc_per_node 2 trainer_zero3_worker.py OUT [--stage 3] [--stop-at N] [--resume]
    python trainer_zero3_worker.py OUT --reference
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

from srlora import SRLoRA, SRLoRAConfig

STEPS, PER_RANK, WORLD, LR = 25, 4, 2, 1e-2  # switches at steps 10 and 20; a checkpoint at 15
CONFIG = dict(r_target=16, gamma=0.5, switch_interval=10, optimizer_reset="zero")


def examples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    n = STEPS * PER_RANK * WORLD
    ids = torch.randint(0, 100, (n, 12), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def effective_weights(ctl: SRLoRA, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``W + s B A`` of every layer, whole, on the CPU (ZeRO-3: gathered; FSDP2: full tensors)."""
    import contextlib

    def whole(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu()

    out = {}
    kinds = {layer.target.kind for layer in ctl.layers.values()}
    if "zero3" in kinds:
        from srlora.kinds.zero3 import gathered

        context = gathered(list(model.parameters()), modify=False)
    else:
        context = contextlib.nullcontext()
    with context:
        for name, layer in ctl.layers.items():
            t = layer.target
            W = whole(t.base_param)
            out[name] = (W.T if t.fan_in_fan_out else W) + t.scaling * (whole(t.lora_B) @ whole(t.lora_A))
    return out


def save_result(ctl: SRLoRA, model: torch.nn.Module, path: Path, **extra: object) -> None:
    """Write this process's effective weights, switch history and layer kinds (and ``extra``) to
    ``path``."""
    result = {
        "weights": effective_weights(ctl, model),
        "history": [e.to_dict() for e in ctl.history],
        "kinds": sorted({layer.target.kind for layer in ctl.layers.values()}),
        **extra,
    }
    torch.save(result, path)


def reference(out: Path) -> None:
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    ctl = SRLoRA(model, SRLoRAConfig(total_steps=STEPS, **{k: v for k, v in CONFIG.items()}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    ctl.attach(opt)
    data = examples()
    for step in range(STEPS):
        chunk = data[step * PER_RANK * WORLD : (step + 1) * PER_RANK * WORLD]
        batch = {k: torch.stack([e[k] for e in chunk]) for k in chunk[0]}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(
        {"weights": effective_weights(ctl, model), "history": [e.to_dict() for e in ctl.history]},
        out / "trainer-reference.pt",
    )
    ctl.export_lora(out / "adapter-reference")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--stage", type=int, default=3, help="DeepSpeed ZeRO stage; 0: no DeepSpeed (DDP)")
    ap.add_argument("--stop-at", type=int, default=0, help="exit every rank after this optimizer step")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--export", action="store_true", help="every rank calls export_lora into OUT/adapter-TAG")
    ap.add_argument("--tag", default="run")
    ap.add_argument(
        "--fsdp2", action="store_true", help="the Trainer's FSDP2 (needs CUDA: transformers refuses FSDP on a CPU)"
    )
    args = ap.parse_args()
    if args.fsdp2:
        args.stage = 0
    if args.reference:
        reference(args.out)
        return
    from torch.utils.data import DistributedSampler, SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from srlora.integrations import SRLoRACallback

    class InOrder(Trainer):  # the data in file order: step t's global batch is examples 8t .. 8t + 7
        # on every run, as the reference sees them. Under DeepSpeed accelerate leaves a custom
        # sampler's dataloader whole on every rank, so it is split here; under DDP it splits it.
        def _get_train_sampler(self, *a, **k):  # type: ignore[no-untyped-def]
            if args.stage and not args.fsdp2:
                return DistributedSampler(self.train_dataset, shuffle=False)
            return SequentialSampler(self.train_dataset)

    class Stop(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if args.stop_at and state.global_step == args.stop_at:
                os._exit(0)  # killed: no clean shutdown, the checkpoint before is all that is left

    ds = {
        "zero_optimization": {"stage": args.stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
        },
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    targs = TrainingArguments(
        output_dir=str(args.out / f"trainer-{args.tag}"),
        per_device_train_batch_size=PER_RANK * WORLD // int(os.environ.get("WORLD_SIZE", WORLD)),
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        save_strategy="steps",
        save_steps=15,
        logging_steps=int(os.environ.get("LOG_STEPS", "1000")),
        report_to=[],
        deepspeed=ds if args.stage else None,  # stage 0: plain DDP
        fsdp="full_shard" if args.fsdp2 else "",
        fsdp_config={"fsdp_version": 2} if args.fsdp2 else None,
        ddp_backend=None if args.fsdp2 else "gloo",
        use_cpu=not (args.stage or args.fsdp2),  # on the CPU: without both the Trainer runs each process alone
        average_tokens_across_devices=False,  # BERT ignores num_items_in_batch: the loss would be doubled
        dataloader_drop_last=True,
        seed=0,
    )
    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    callback = SRLoRACallback(SRLoRAConfig(total_steps="auto", **CONFIG))
    trainer = InOrder(model=model, args=targs, train_dataset=examples(), callbacks=[callback, Stop()])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if args.export:  # a collective: every rank calls it, rank 0 writes
        callback.controller.export_lora(args.out / f"adapter-{args.tag}")
    ctl = callback.controller
    rank = torch.distributed.get_rank()  # the Trainer started the process group
    save_result(ctl, model, args.out / f"trainer-{args.tag}-rank{rank}.pt", log=trainer.state.log_history)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
    leave_process_group(strict=False)  # after main: a framework keeps its groups (tests/procgroup.py)
