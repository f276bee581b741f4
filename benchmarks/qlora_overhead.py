"""SRLoRA against PEFT QLoRA on a 4-bit (NF4) model with the shapes of SmolLM2-135M:
step time (PEFT QLoRA, a second identical PEFT QLoRA as the noise floor, and SRLoRA in
rotation, in one process) and the memory of SRLoRA's side
factors against the 4-bit weights, worst case (every layer at r_target).

    python benchmarks/qlora_overhead.py                 # r = 8, r_target = 64, 8 timed steps each
    python benchmarks/qlora_overhead.py --device cuda

Random weights (the costs depend on the shapes): a Llama with hidden 576, MLP 1536, 30
blocks, 9 heads, 3 key/value heads, vocabulary 49152; LoRA on q, k, v, o, gate, up, down.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from srlora import SRLoRA, SRLoRAConfig
from srlora.atomic import atomic_write_text

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(folder: str, device: str, r: int) -> torch.nn.Module:
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map=device)
    return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, lora_dropout=0.0))


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--r-target", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--batch", default="4x128", help="batch x sequence length")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    batch_size, seq = (int(x) for x in args.batch.split("x"))
    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(cfg).save_pretrained(folder)
        # "control": a second, identical PEFT QLoRA model in the same rotation, whose ratio to
        # "qlora" is the noise floor of the step-time ratio.
        models = {name: build(folder, args.device, args.r) for name in ("qlora", "control", "srlora")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctl = SRLoRA(models["srlora"], SRLoRAConfig(r_target=args.r_target, switch_interval=10**9))
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    ctl.attach(opts["srlora"])
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(steps: int) -> dict[str, float]:
        """Median step time of each model over ``steps`` steps (after 2 warm-up steps), the
        models in rotation, the order reversed every step."""
        times: dict[str, list[float]] = {k: [] for k in models}
        for i in range(2 + steps):
            for name in list(models) if i % 2 == 0 else list(reversed(list(models))):
                sync()
                start = time.perf_counter()
                models[name](input_ids=ids, labels=ids).loss.backward()
                opts[name].step()
                opts[name].zero_grad()
                sync()
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
        return {k: statistics.median(v) for k, v in times.items()}

    for model in models.values():
        model.train()
    med = timed(args.steps)  # before any switch: side factors of rank r

    # Worst-case memory: run every layer's switches up to r_target (side factors then full).
    weight_4bit = sum(
        layer.target.base_param.numel() * layer.target.base_param.element_size()
        + layer.target.base_param.quant_state.absmax.numel() * 4
        for layer in ctl.layers.values()
    )
    side_allocated = sum(layer.side_factor_bytes for layer in ctl.layers.values())
    while ctl.switch(opts["srlora"]):
        pass
    med_full = timed(max(args.steps // 2, 2))  # every layer at r_target: side factors of rank 2 r_target - r
    used = sum(
        (layer.target.shape[0] + layer.target.shape[1]) * (2 * layer.pointer - layer.r) * 4
        for layer in ctl.layers.values()
    )
    out = {
        "machine": (
            torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        ),
        "layers": len(ctl.layer_names),
        "r": args.r,
        "r_target": args.r_target,
        "batch": args.batch,
        "steps": args.steps,
        "step_s_qlora": med["qlora"],
        "step_s_srlora": med["srlora"],
        "step_s_control": med["control"],
        "ratio": med["srlora"] / med["qlora"],
        "control_ratio": med["control"] / med["qlora"],
        "ratio_at_r_target": med_full["srlora"] / med_full["qlora"],
        "control_ratio_at_r_target": med_full["control"] / med_full["qlora"],
        "weights_4bit_bytes": weight_4bit,
        "side_factor_bytes_at_r_target": used,
        "side_factor_bytes_allocated": side_allocated,
        "svd_cache_bytes": ctl.svd_cache_bytes(),
    }
    print(
        f"SmolLM2-135M shapes, NF4, {out['layers']} adapted layers, r={args.r}, r_target={args.r_target}, "
        f"batch {args.batch}; {out['machine']}"
    )
    print(
        f"step time  PEFT QLoRA {med['qlora'] * 1e3:.0f} ms   SRLoRA {med['srlora'] * 1e3:.0f} ms   "
        f"ratio {out['ratio']:.3f}; control (a second PEFT QLoRA) / QLoRA {out['control_ratio']:.3f} "
        f"(medians of {args.steps} steps each, in rotation)"
    )
    print(
        f"after every switch (side factors at rank 2 r_target - r): ratio {out['ratio_at_r_target']:.3f}; "
        f"control / QLoRA {out['control_ratio_at_r_target']:.3f}"
    )
    print(
        f"4-bit weights of the adapted layers {weight_4bit / 2**20:.1f} MiB; SRLoRA's side factors at r_target "
        f"{used / 2**20:.1f} MiB ({used / weight_4bit:.2f}x), SVD cache {out['svd_cache_bytes'] / 2**20:.1f} MiB"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
