"""The importance's inputs under DeepSpeed ZeRO-3, read once per optimizer step: every adapted
layer's whole fp32 masters and gradients, gathered at once (one all-gather of this rank's
partitions, what SRLoRA does) against one by one through DeepSpeed's full accessors
(``safe_get_full_fp32_param`` / ``safe_get_full_grad``: four all-gathers a layer). A
BERT-base-shaped model (12 blocks, 72 adapted layers, r = 8), one forward and backward, then
each way timed; the values are checked equal first.

    torchrun --nproc_per_node 2 benchmarks/zero3_importance.py [--repeats 20] [--layers 12]

CPU: ``DS_ACCELERATOR=cpu`` (gloo); on GPUs DeepSpeed picks NCCL.
"""

from __future__ import annotations

import argparse
import os
import time

import peft
import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification

from srlora import SRLoRA, SRLoRAConfig
from srlora.kinds.zero3 import Zero3Target

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (ranks in step: a barrier before each)."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layers", type=int, default=12, help="transformer blocks (6 adapted layers each)")
    ap.add_argument("--r", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(num_labels=2, num_hidden_layers=args.layers))
    model = peft.get_peft_model(base, peft.LoraConfig(r=args.r, lora_alpha=args.r, target_modules=TARGETS))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    ctl = SRLoRA(model, SRLoRAConfig(r_target=4 * args.r, total_steps=1000))  # on the partitioned layers
    device = next(engine.parameters()).device
    g = torch.Generator().manual_seed(rank)
    batch = {"input_ids": torch.randint(0, 30000, (2, 64), generator=g), "labels": torch.randint(0, 2, (2,))}
    engine.backward(engine(**{k: v.to(device) for k, v in batch.items()}).loss)

    targets = [layer.target for layer in ctl.layers.values()]
    at_once = Zero3Target.importance_inputs_batched(targets)
    one_by_one = [t.importance_inputs() for t in targets]
    equal = all(torch.equal(a, b) for x, y in zip(at_once, one_by_one, strict=True) for a, b in zip(x, y, strict=True))
    t_once = timed(lambda: Zero3Target.importance_inputs_batched(targets), args.repeats, device)
    t_each = timed(lambda: [t.importance_inputs() for t in targets], args.repeats, device)
    if rank == 0:
        numbers = sum(x.numel() for inputs in at_once for x in inputs)
        print(
            f"ZeRO-3, {world} ranks ({dist.get_backend()}), {len(targets)} adapted layers, r = {args.r}, "
            f"{numbers / 1e6:.2f} M numbers gathered; equal: {equal}"
        )
        print(f"one all-gather:            {t_once * 1e3:8.2f} ms")
        print(f"one by one ({4 * len(targets)} gathers): {t_each * 1e3:8.2f} ms   ({t_each / t_once:.1f}x)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
