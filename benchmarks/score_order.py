"""How much the pair scores move when the importance uses the weights *after*
``optimizer.step()`` (PEFT AdaLoRA's documented order) instead of before it (the paper's
order, which srlora follows). docs/METHOD.md quotes its output.

    python benchmarks/score_order.py            # tiny random BERT, r=4, AdamW lr 1e-3, 60 steps
    python benchmarks/score_order.py --lr 5e-3

Both score sets see the same gradients; only the ``w`` in ``|w * grad(w)|`` differs. The
first 19 steps (the EMA warm-up) are left out.
"""

from __future__ import annotations

import argparse
import statistics

import peft
import torch
from transformers import BertConfig, BertForSequenceClassification

from srlora import SRLoRA, SRLoRAConfig
from srlora.importance import PairImportance, update_importance_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"])
    model = peft.get_peft_model(BertForSequenceClassification(cfg), lora)
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=10_000))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    layers = list(ctl.layers.values())
    after = [PairImportance(x.r, *x.target.shape, 0.85, 0.85, torch.device("cpu")) for x in layers]
    g = torch.Generator().manual_seed(1)
    diffs = []
    for step in range(args.steps):
        batch = {
            "input_ids": torch.randint(0, 100, (8, 12), generator=g),
            "labels": torch.randint(0, 3, (8,), generator=g),
        }
        model(**batch).loss.backward()
        ctl.update_importance()  # before the step: the paper's order
        grads_A = [x.target.lora_A.grad.clone() for x in layers]
        grads_B = [x.target.lora_B.grad.clone() for x in layers]
        opt.step()
        update_importance_(
            after, [x.target.lora_A for x in layers], grads_A, [x.target.lora_B for x in layers], grads_B
        )  # after the step: AdaLoRA's documented order
        opt.zero_grad()
        ctl.step(opt)
        if step >= 19:
            for layer, other in zip(layers, after, strict=True):
                s0, s1 = layer.importance.pair_scores(), other.pair_scores()
                diffs.append(float(((s1 - s0).abs() / s0.abs()).max()))
    diffs.sort()
    print(
        f"lr {args.lr:g}, {len(layers)} layers, steps 20-{args.steps}: largest relative change of a layer's "
        f"S_k per step: median {statistics.median(diffs):.2%}, 95th percentile "
        f"{diffs[int(0.95 * len(diffs))]:.2%}, max {diffs[-1]:.2%}"
    )


if __name__ == "__main__":
    main()
