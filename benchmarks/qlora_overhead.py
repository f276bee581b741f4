"""SRLoRA against PEFT QLoRA on 4-bit (NF4) bases: memory and step time.

    python benchmarks/qlora_overhead.py                          # SmolLM2-135M shapes, r 8, r_target 64
    python benchmarks/qlora_overhead.py --shapes 7b --blocks 1   # 7B shapes (4096 x 4096, 4096 x 11008)
    python benchmarks/qlora_overhead.py --device cuda

Random weights (the costs depend on the shapes), quantized to NF4 on this device. SmolLM2
shapes: a Llama with hidden 576, MLP 1536, 30 blocks, 9 heads, 3 key/value heads, loaded
through transformers' BitsAndBytesConfig; 7B shapes: Llama-2-7B blocks (hidden 4096, MLP
11008, 32 heads), their linear layers quantized by hand (bitsandbytes ``Linear4bit``). LoRA
on q, k, v, o, gate, up, down.

Memory, in bytes actually allocated by SRLoRA (its tensors' storage), at the start and
after every layer has used its whole budget (``p = r_target``): the side factors (records of
the fused and the entered pairs), the importance EMAs, and the SVD cache with where it lives
(``--cache-on-device`` keeps it beside the weights; by default it waits on the CPU), against
the 4-bit weights (packed bytes and quantization state); and the least memory the kept
information needs, ``k (m + n - k)`` numbers per layer for the rank-``k = 2p - r`` side term.
A training step's peak (PEFT QLoRA and SRLoRA at r_target, same process; on the CPU from the
profiler's memory timeline, on a GPU from ``max_memory_allocated``). Step time (SmolLM2
shapes): PEFT QLoRA, a second identical PEFT QLoRA (the A/A control) and SRLoRA in rotation.
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

import bitsandbytes as bnb
import peft
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from srlora import SRLoRA, SRLoRAConfig
from srlora.atomic import atomic_write_text

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
LLAMA7B = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=256
)


def build_loaded(folder: str, device: str, r: int) -> torch.nn.Module:
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map=device)
    return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, lora_dropout=0.0))


def build_by_hand(cfg: LlamaConfig, device: str, r: int) -> torch.nn.Module:
    """A Llama whose adapted linear layers are replaced by NF4 ``Linear4bit`` modules."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.float(), requires_grad=False, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to(device))
    model = model.to(device).float()  # the rest in float32 (the 4-bit weights stay packed)
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, lora_dropout=0.0))


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def weight_bytes(ctl: SRLoRA) -> int:
    """Packed 4-bit bytes and quantization state (absmax, nested quantization) of the adapted layers."""
    total = 0
    for layer in ctl.layers.values():
        w = layer.target.base_param
        total += nbytes(w)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            total += nbytes(qs.absmax) + nbytes(getattr(qs, "code", None))
            nested = getattr(qs, "state2", None)
            if nested is not None:
                total += nbytes(nested.absmax) + nbytes(nested.code)
    return total


def memory(ctl: SRLoRA) -> dict[str, float]:
    side = sum(layer.side_factor_bytes for layer in ctl.layers.values())
    ema = sum(sum(nbytes(t) for t in layer.importance.tensors()) for layer in ctl.layers.values())
    cache = ctl.svd_cache_bytes()
    device = {layer.cache.U.device.type for layer in ctl.layers.values()}
    # Least memory for an exact output: the side term of rank k = 2p - r, k (m + n - k) numbers per layer.
    least = 0
    for layer in ctl.layers.values():
        m, n = layer.target.shape
        k = min(2 * layer.pointer - layer.r, m, n)
        least += k * (m + n - k) * torch.tensor([], dtype=layer.target.side_dtype).element_size()
    return {"side": side, "ema": ema, "cache": cache, "cache_device": ",".join(sorted(device)), "least_side": least}


def step_peak(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, device: str) -> int:
    """Peak bytes of tensors alive during one training step (forward, backward, optimizer)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with (
        warnings.catch_warnings(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof,
    ):
        warnings.simplefilter("ignore")
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return int(max(sum(row) for row in sizes))


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=["smollm2", "7b"], default="smollm2")
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks (default 30 / 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--r", type=int, default=None, help="LoRA rank (default 8 / 16)")
    ap.add_argument("--r-target", type=int, default=None, help="default 64 / 256")
    ap.add_argument("--side-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--cache-on-device", action="store_true", help="keep the SVD cache beside the weights")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps); 0: none")
    ap.add_argument("--batch", default=None, help="batch x sequence length (default 4x128 / 1x64)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    big = args.shapes == "7b"
    r = args.r or (16 if big else 8)
    r_target = args.r_target or (256 if big else 64)
    blocks = args.blocks or (1 if big else 30)
    batch_size, seq = (int(x) for x in (args.batch or ("1x64" if big else "4x128")).split("x"))
    cfg = LlamaConfig(
        **(LLAMA7B if big else SMOLLM2),
        num_hidden_layers=blocks,
        max_position_embeddings=2048,
        tie_word_embeddings=not big,
    )
    torch.manual_seed(0)
    names = ("qlora", "control", "srlora") if args.steps else ("qlora", "srlora")
    if big:
        models = {name: build_by_hand(cfg, args.device, r) for name in names}
    else:
        with tempfile.TemporaryDirectory() as folder:
            LlamaForCausalLM(cfg).save_pretrained(folder)
            models = {name: build_loaded(folder, args.device, r) for name in names}
    config = SRLoRAConfig(
        r_target=r_target,
        switch_interval=10**9,
        svd_method="randomized" if big else "full",
        side_factor_dtype=args.side_dtype,
        svd_device=args.device if args.cache_on_device else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctl = SRLoRA(models["srlora"], config)
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
    weights = weight_bytes(ctl)
    start_mem = memory(ctl)
    med = timed(args.steps) if args.steps else {}
    while ctl.switch(opts["srlora"]):  # every layer's whole budget
        pass
    end_mem = memory(ctl)
    med_full = timed(max(args.steps // 2, 2)) if args.steps else {}
    peaks = {name: step_peak(models[name], opts[name], ids, args.device) for name in ("qlora", "srlora")}
    machine = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    out = {
        "shapes": args.shapes,
        "blocks": blocks,
        "machine": machine,
        "layers": len(ctl.layer_names),
        "r": r,
        "r_target": r_target,
        "side_dtype": args.side_dtype,
        "batch": f"{batch_size}x{seq}",
        "steps": args.steps,
        "weights_4bit_bytes": weights,
        "start": start_mem,
        "end": end_mem,
        "step_peak_bytes": peaks,
    }
    if med:
        out.update(
            step_s_qlora=med["qlora"],
            step_s_srlora=med["srlora"],
            ratio=med["srlora"] / med["qlora"],
            control_ratio=med["control"] / med["qlora"],
            ratio_at_r_target=med_full["srlora"] / med_full["qlora"],
            control_ratio_at_r_target=med_full["control"] / med_full["qlora"],
        )
    mib = 2**20
    print(
        f"{args.shapes} shapes, NF4, {out['layers']} adapted layers, r={r}, r_target={r_target}, side factors in "
        f"{args.side_dtype}; {machine}"
    )
    print(f"4-bit weights of the adapted layers: {weights / mib:.1f} MiB")
    for when, mem in (("start", start_mem), ("after the whole budget", end_mem)):
        device_bytes = mem["side"] + mem["ema"] + (mem["cache"] if args.cache_on_device else 0)
        print(
            f"{when}: side factors {mem['side'] / mib:.1f} MiB ({mem['side'] / weights:.2f}x the 4-bit weights), "
            f"EMAs {mem['ema'] / mib:.1f} MiB, SVD cache {mem['cache'] / mib:.1f} MiB on {mem['cache_device']}; "
            f"on the device {device_bytes / mib:.1f} MiB ({device_bytes / weights:.2f}x); least side factors for "
            f"an exact output {mem['least_side'] / mib:.1f} MiB"
        )
    print(
        f"a training step's peak (tensors alive): PEFT QLoRA {peaks['qlora'] / mib:.1f} MiB, SRLoRA at r_target "
        f"{peaks['srlora'] / mib:.1f} MiB ({peaks['srlora'] / peaks['qlora']:.3f}x)"
    )
    if med:
        print(
            f"step time before any switch: ratio {out['ratio']:.3f} (control {out['control_ratio']:.3f}); every "
            f"layer at r_target: ratio {out['ratio_at_r_target']:.3f} (control {out['control_ratio_at_r_target']:.3f})"
            f"; medians of {args.steps} steps, in rotation"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
