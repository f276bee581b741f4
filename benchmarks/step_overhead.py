"""What SRLoRA costs over plain PEFT LoRA, measured side by side in one run.

Prints, for a text encoder (MiniLM from ``srlora fetch minilm`` when it is in the cache,
else a tiny random BERT) at batch ``B x L`` on the CPU:

* the median training-step time of PEFT LoRA and of SRLoRA (the same model, data and
  optimizer, steps alternating between the two so that machine noise hits both), and
  their ratio;
* the cost of one switch of all layers, and that cost spread over the switch interval;
* the SVD + PiSSA initialisation time, full and randomized, and the SVD cache's bytes.

    python benchmarks/step_overhead.py                     # MiniLM, 16 x 128, r=8, r_target=64
    python benchmarks/step_overhead.py --r-target 256 --steps 30
    python benchmarks/step_overhead.py --base-size --steps 6   # BERT-base shapes, random init
    python benchmarks/step_overhead.py --decoder-1b --device cuda --dtype bfloat16   # a 1B Llama shape on a GPU

On a GPU every timing synchronises the device first and last, so it covers the work the
step launched.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import peft
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from srlora import SRLoRA, SRLoRAConfig, SRLoRAWarning
from srlora.atomic import atomic_write_text
from srlora.experiments.assets import local_path

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEVICE = torch.device("cpu")


def load_base(
    model: str | None, base_size: bool = False, decoder_1b: bool = False, decoder_layers: int = 16
) -> tuple[torch.nn.Module, str]:
    if decoder_1b:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=decoder_layers,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=2048,
        )
        shape = f"Llama: hidden 2048, {decoder_layers} layers, MLP 8192, GQA 32/8"
        return LlamaForCausalLM(cfg), f"random-init 1B decoder shapes ({shape})"
    if base_size:
        # No base-size checkpoint can be fetched offline here. Step, switch and SVD costs
        # depend on the shapes, not on the values, so random weights measure the same.
        source = "random-init BERT-base shapes (768x12, MLP 3072)"
        return BertForSequenceClassification(BertConfig(num_labels=2)), source
    path = Path(model) if model else local_path("minilm")
    if path is not None:
        name = "MiniLM (srlora fetch minilm)" if model is None else str(path)
        return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2), name
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, num_labels=2)
    return BertForSequenceClassification(cfg), "tiny random BERT (run `srlora fetch minilm` for MiniLM)"


def lora(base: torch.nn.Module, r: int, alpha: int) -> torch.nn.Module:
    targets = DECODER_TARGETS if base.config.model_type == "llama" else TARGETS
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face folder (default: the fetched MiniLM, else a tiny BERT)")
    ap.add_argument(
        "--base-size", action="store_true", help="a random-init BERT-base-size encoder (110M) instead of MiniLM"
    )
    ap.add_argument("--decoder-1b", action="store_true", help="a random-init decoder with the shapes of a 1B Llama")
    ap.add_argument("--decoder-layers", type=int, default=16, help="blocks of the 1B decoder (16)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the base model's weights")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=8)
    ap.add_argument("--r-target", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method (after 3 warm-up steps each)")
    ap.add_argument("--switches", type=int, default=5, help="timed forced switches")
    ap.add_argument("--skip-full-init", action="store_true", help="time only the randomized SVD init (big models)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    global DEVICE
    DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    base, source = load_base(args.model, args.base_size, args.decoder_1b, args.decoder_layers)
    base = base.to(device=DEVICE, dtype=getattr(torch, args.dtype))
    base.train()
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long)}
    batch["labels"] = ids if args.decoder_1b else torch.randint(0, 2, (args.batch_size,), generator=g)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}

    # --- initialisation: SVD + PiSSA, full vs randomized -------------------------------
    init = {"full": float("nan")}
    for method in ("randomized",) if args.skip_full_init else ("full", "randomized"):
        model = lora(base, args.r, args.alpha)
        cfg = SRLoRAConfig(r_target=args.r_target, switch_interval=10**9, svd_method=method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SRLoRAWarning)
            seconds = timed(lambda m=model, c=cfg: SRLoRA(m, c))
        init[method] = seconds
        del model

    # --- step time: PEFT LoRA vs SRLoRA, rotating ----------------------------------------
    # A second, identical PEFT LoRA model ("control") runs in the same rotation: its
    # ratio to the first is the noise floor of this machine for this measurement.
    models = {"lora": lora(base, args.r, args.alpha), "control": lora(base, args.r, args.alpha)}
    models["srlora"] = lora(base, args.r, args.alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SRLoRAWarning)
        # A huge interval: the timed steps measure importance tracking, not switches,
        # which are timed on their own below.
        ctl = SRLoRA(models["srlora"], SRLoRAConfig(r_target=args.r_target, switch_interval=10**9))
    opts = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for name, model in models.items()
    }
    ctl.attach(opts["srlora"])

    def step(name: str) -> None:
        loss = models[name](**batch).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(3 + args.steps):
        for name in names[i % 3 :] + names[: i % 3]:
            t = timed(lambda n=name: step(n))
            if i >= 3:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(s / p for s, p in zip(times["srlora"], times["lora"], strict=True))

    # SRLoRA's own per-step work (importance EMAs, finiteness check), timed alone: far
    # below the noise of a whole step, so it is the sharper figure of the overhead.
    models["srlora"](**batch).loss.backward()
    ctl.detach()
    own = statistics.median(timed(ctl.update_importance) for _ in range(20))
    opts["srlora"].zero_grad(set_to_none=True)

    # --- one switch of every layer -------------------------------------------------------
    r_prime = SRLoRAConfig(r_target=args.r_target, switch_interval=1).recycled_per_switch(args.r)
    n_switch = (args.r_target - args.r) // r_prime
    # Only switches within the budget: once the directions run out a switch does nothing,
    # and timing those would report the cost of a no-op.
    switch_times = [timed(lambda: ctl.switch()) for _ in range(min(args.switches, n_switch))]

    out = {
        "model": source,
        "layers": len(ctl.layer_names),
        "machine": (
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
            if DEVICE.type == "cuda"
            else f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        ),
        "dtype": args.dtype,
        "batch": f"{args.batch_size}x{args.seq_len}",
        "r": args.r,
        "r_target": args.r_target,
        "step_s_lora": med["lora"],
        "step_s_srlora": med["srlora"],
        "step_s_control": med["control"],
        "ratio_of_medians": med["srlora"] / med["lora"],
        "control_ratio": med["control"] / med["lora"],
        "importance_update_s": own,
        "ratio_from_own_work": (med["lora"] + own) / med["lora"],
        "median_paired_ratio": paired,
        "switch_s": statistics.median(switch_times),
        "switches_timed": len(switch_times),
        "init_s_full": init["full"],
        "init_s_randomized": init["randomized"],
        "svd_cache_bytes": ctl.svd_cache_bytes(),
        "n_switch": n_switch,
    }
    print(
        f"model: {source} ({out['layers']} adapted layers), batch {out['batch']}, r={args.r}, "
        f"r_target={args.r_target}; {out['machine']}"
    )
    print(
        f"step time  PEFT LoRA {med['lora'] * 1e3:8.1f} ms   SRLoRA {med['srlora'] * 1e3:8.1f} ms   "
        f"ratio {out['ratio_of_medians']:.3f} (median of paired ratios {paired:.3f}, {args.steps} steps each)"
    )
    print(f"noise floor: a second PEFT LoRA model in the same rotation: ratio {out['control_ratio']:.3f}")
    print(
        f"SRLoRA's own work per step (importance update, timed alone) {own * 1e3:.2f} ms "
        f"-> ratio {out['ratio_from_own_work']:.4f}"
    )
    print(
        f"one switch of all layers {out['switch_s'] * 1e3:.1f} ms "
        f"(= {out['switch_s'] / med['lora'] * 100:.2f}% of a step; {n_switch} switches in a paper schedule)"
    )
    print(
        f"SVD + PiSSA init: full {init['full']:.2f} s, randomized {init['randomized']:.2f} s; "
        f"SVD cache {out['svd_cache_bytes'] / 2**20:.2f} MiB"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
