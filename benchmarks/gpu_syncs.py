"""Device-to-host synchronisations per training step, counted by
``torch.cuda.set_sync_debug_mode("warn")``: PEFT LoRA against SRLoRA (both direction
policies), on a BERT-base-shaped model (72 adapted layers), outside switch steps; then
the syncs and wall time of one switch of all layers, batched by shape group and layer by layer.

    python benchmarks/gpu_syncs.py            # needs a CUDA device
"""

from __future__ import annotations

import copy
import time
import warnings

import peft
import torch
from transformers import BertConfig, BertForSequenceClassification

from srlora import SRLoRA, SRLoRAConfig

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def count(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[dict]) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for b in batches:
                model(**b).loss.backward()
                opt.step()
                opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in record)


def main() -> None:
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(num_labels=2)).cuda()
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 30000, (8, 128), generator=g).cuda(), "labels": torch.randint(0, 2, (8,)).cuda()}
        for _ in range(10)
    ]
    rows = []
    for name, policy in (("PEFT LoRA", None), ("SRLoRA spectrum", "spectrum"), ("SRLoRA gradient", "gradient")):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=TARGETS))
        layers = 0
        if policy is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Switch far away; the gradient policy captures every step (its window is open).
                ctl = SRLoRA(model, SRLoRAConfig(r_target=64, switch_interval=12, direction_policy=policy))
            layers = len(ctl.layer_names)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if policy is not None:
            ctl.attach(opt)
        count(model, opt, batches[:1])  # warm-up (optimizer state creation)
        n = count(model, opt, batches[1:])  # steps 2-10: no switch (the first is after step 12)
        rows.append((name, layers, n / 9))
    print("| model | adapted layers | device-to-host syncs per step |")
    print("|---|---|---|")
    for name, layers, per_step in rows:
        print(f"| {name} | {layers or 72} | {per_step:.2f} |")
    # One forced switch of every layer, batched by shape group and layer by layer.
    from srlora.kinds.dense import DenseTarget

    print()
    print("| switch of all layers | adapted layers | device-to-host syncs | wall time (ms) |")
    print("|---|---|---|---|")
    for label, batched in (("batched (3 shape groups)", True), ("layer by layer", False)):
        key = DenseTarget.batch_key
        if not batched:
            DenseTarget.batch_key = lambda self: None  # type: ignore[method-assign]
        try:
            model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=TARGETS))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctl = SRLoRA(model, SRLoRAConfig(r_target=64, switch_interval=10**6))
        finally:
            DenseTarget.batch_key = key  # type: ignore[method-assign]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ctl.attach(opt)
        count(model, opt, batches[:2])
        ctl.switch(opt)  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ctl.switch(opt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in record)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            ctl.switch(opt)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(f"| {label} | {len(ctl.layers)} | {syncs} | {1e3 * sorted(times)[2]:.1f} |")


if __name__ == "__main__":
    main()
