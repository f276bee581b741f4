"""Run by test_trainer_sharded.py: TRL's SFTTrainer (which builds the PEFT model from a
``peft_config``) with SRLoRACallback(config), on a tiny random Llama and a word-level
tokenizer built here. Under torchrun (2 CPU processes): DeepSpeed ZeRO-3, each rank on half
of every global batch; ``--single``: one process, no DeepSpeed, the whole global batches.

    torchrun --nproc_per_node 2 trl_zero3_worker.py OUT
    python trl_zero3_worker.py OUT --single
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_llama
from procgroup import leave_process_group
from trainer_zero3_worker import save_result

from srlora import SRLoRAConfig

STEPS, GLOBAL = 25, 8
WORDS = [f"w{i}" for i in range(60)]


def tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def texts() -> list[str]:
    rng = random.Random(3)  # every text 12 words: no padding, equal token counts on every rank
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(STEPS * GLOBAL)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--single", action="store_true")
    ap.add_argument("--ddp", action="store_true", help="2 processes without DeepSpeed")
    ap.add_argument("--stage", type=int, default=3, help="DeepSpeed ZeRO stage (3, 2 or 1)")
    args = ap.parse_args(argv)
    tag = "trl-ddp" if args.ddp else f"trl-zero{args.stage}"
    import peft
    from datasets import Dataset
    from torch.utils.data import DistributedSampler
    from trl import SFTConfig, SFTTrainer

    from srlora.integrations import SRLoRACallback

    class InOrder(SFTTrainer):  # step t's global batch is texts 8t .. 8t + 7 on every run (under
        # DeepSpeed accelerate leaves a custom sampler's dataloader whole on every rank: split it here)
        def _get_train_sampler(self, *a, **k):  # type: ignore[no-untyped-def]
            if torch.distributed.is_initialized() and not args.ddp:
                return DistributedSampler(self.train_dataset, shuffle=False)
            return torch.utils.data.SequentialSampler(self.train_dataset)

    base = make_llama(vocab_size=70, max_position_embeddings=64)
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
    sft = SFTConfig(
        output_dir=str(args.out / ("trl-single" if args.single else tag)),
        per_device_train_batch_size=GLOBAL if args.single else GLOBAL // 2,
        max_steps=STEPS,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        save_strategy="no",
        logging_steps=1000,
        report_to=[],
        deepspeed=None if args.single or args.ddp else ds,
        use_cpu=args.ddp,  # on the CPU, DDP needs both, or the Trainer runs each process on its own
        ddp_backend="gloo" if args.ddp else None,
        max_length=32,
        bf16=False,
        packing=False,
        seed=0,
        dataloader_drop_last=True,
    )
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    callback = SRLoRACallback(SRLoRAConfig(r_target=12, switch_interval=10, total_steps="auto", optimizer_reset="zero"))
    trainer = InOrder(
        model=base,
        args=sft,
        train_dataset=Dataset.from_dict({"text": texts()}),
        processing_class=tokenizer(),
        peft_config=peft_config,
        callbacks=[callback],
    )
    if torch.distributed.is_initialized():
        # accelerate's gather of TRL's 0-dim token metrics fails on gloo (CPU) ("invalid output
        # tensor list"), not on NCCL: gather them as 1-element tensors here.
        def gather(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(1)
            out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(out, t)
            return torch.cat(out)

        trainer.accelerator.gather_for_metrics = gather
    trainer.train()
    ctl = callback.controller
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    save_result(ctl, trainer.model, args.out / ("trl-single.pt" if args.single else f"{tag}-rank{rank}.pt"))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
    leave_process_group(strict=False)  # after main: a framework keeps its groups (tests/procgroup.py)
