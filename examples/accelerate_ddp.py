"""SRLoRA with Hugging Face Accelerate (data-parallel on CPU or GPUs).

    torchrun --standalone --nproc_per_node 2 examples/accelerate_ddp.py

(run here on 2 CPU processes, gloo: both ranks print the same switch count and weight
fingerprint). On GPUs, ``accelerate launch --num_processes N examples/accelerate_ddp.py``
starts the same script (not run on this project's CPU-only machines).

Build the PEFT model and SRLoRA *before* ``accelerator.prepare``: under torch.distributed
the SVD is computed on rank 0 and broadcast, so every process starts from the same
directions; ``prepare`` then wraps the model in DDP and the optimizer in
``AcceleratedOptimizer``, whose inner optimizer SRLoRA hooks. Gradients are all-reduced
before the optimizer step, so every rank scores and switches identically.
"""

from __future__ import annotations

import peft
import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification

from srlora import SRLoRA, SRLoRAConfig


def main(steps: int = 60) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    base = BertForSequenceClassification(
        BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    )
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, gamma=0.5, total_steps=steps))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ddp_model, opt = accelerator.prepare(model, opt)
    ctl.attach(opt)  # unwraps AcceleratedOptimizer
    g = torch.Generator().manual_seed(100 + accelerator.process_index)  # each rank its own data
    for _ in range(steps):
        ids = torch.randint(0, 100, (8, 16), generator=g).to(accelerator.device)
        labels = torch.randint(0, 2, (8,), generator=g).to(accelerator.device)
        loss = ddp_model(input_ids=ids, labels=labels).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    # Every rank holds the same switches and weights; print a fingerprint from each.
    fingerprint = sum(float(p.double().sum()) for p in model.parameters())
    print(f"rank {accelerator.process_index}: {len(ctl.history)} switches, weights fingerprint {fingerprint:.10f}")


if __name__ == "__main__":
    main()
