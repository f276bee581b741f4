"""A whole run of SRLoRA against a whole run of PEFT LoRA, side by side in one process.

Each run builds its adapter on a fresh copy of the same base model (SRLoRA: its SVD and PiSSA
initialisation included), then trains the same steps on the same batches; SRLoRA's switches
happen on its schedule. An identical second LoRA run is the A/A control: its ratio to the
first is the noise of this machine. Rounds alternate the order of the runs. With
``--layer-by-layer`` SRLoRA also runs with every layer switching on its own (the path before
the batched switch), for the before/after comparison; with ``--gradient-subspace`` it also runs
with ``direction_policy="gradient_subspace"`` (new pairs along the windowed gradient's top
singular vectors: the hooks that sketch the gradient in the 19 steps before each switch, and
the randomized SVD at each switch), for what the gradient capture adds to a whole run.

    python benchmarks/run_overhead.py                                  # MiniLM, 150 steps, r_target 64
    python benchmarks/run_overhead.py --layer-by-layer --json docs/results/run_overhead.json
    python benchmarks/run_overhead.py --gradient-subspace --json docs/results/run_overhead_gradient.json
    python benchmarks/run_overhead.py --base-size --steps 40           # BERT-base shapes (random init)
    python benchmarks/run_overhead.py --device cuda --steps 2000 --r-target 256   # paper scale on a GPU

Prints each run's wall time (init, training, switches), SRLoRA / LoRA and the control's
LoRA / LoRA, and the mean cost of one switch step over a plain step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from step_overhead import load_base, lora  # benchmarks/ is on the path when run as a script

from srlora import SRLoRA, SRLoRAConfig, SRLoRAWarning
from srlora.atomic import atomic_write_text
from srlora.kinds.dense import DenseTarget


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_run(base, args, method: str, batches, device: torch.device) -> dict:
    """Build and train one method; returns its timings."""
    _sync(device)
    started = time.perf_counter()
    model = lora(base, args.r, args.alpha)
    ctl = None
    if method.startswith("srlora"):
        entry = {"direction_policy": "gradient_subspace"} if method == "srlora-gradient-subspace" else {}
        config = SRLoRAConfig(r_target=args.r_target, total_steps=args.steps, svd_method=args.svd, **entry)
        if method == "srlora-layer-by-layer":
            batch_key = DenseTarget.batch_key
            DenseTarget.batch_key = lambda self: None  # type: ignore[method-assign]
            try:
                ctl = SRLoRA(model, config)
            finally:
                DenseTarget.batch_key = batch_key  # type: ignore[method-assign]
        else:
            ctl = SRLoRA(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if ctl is not None:
        ctl.attach(opt)
    _sync(device)
    init_s = time.perf_counter() - started
    steps, switch_steps = [], []
    for batch in batches:
        t0 = time.perf_counter()
        before = 0 if ctl is None else len(ctl.history)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        (switch_steps if ctl is not None and len(ctl.history) > before else steps).append(dt)
    _sync(device)
    total = time.perf_counter() - started
    return {
        "method": method,
        "total_s": total,
        "init_s": init_s,
        "train_s": total - init_s,
        "median_step_s": statistics.median(steps),
        "switch_steps": len(switch_steps),
        "switch_step_extra_s": (statistics.fmean(switch_steps) - statistics.median(steps)) if switch_steps else 0.0,
        "switches": 0 if ctl is None else len(ctl.history),
    }


def switch_cost(base, args, batches, device: torch.device, batched: bool, reps: int = 5) -> dict:
    """Median wall time and ATen ops of one forced switch of every layer (after a few steps)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    model = lora(base, args.r, args.alpha)
    batch_key = DenseTarget.batch_key
    if not batched:
        DenseTarget.batch_key = lambda self: None  # type: ignore[method-assign]
    try:
        ctl = SRLoRA(model, SRLoRAConfig(r_target=args.r_target, switch_interval=10**6, svd_method=args.svd))
    finally:
        DenseTarget.batch_key = batch_key  # type: ignore[method-assign]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ctl.attach(opt)
    for batch in batches[:2]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    times = []
    with Ops() as ops:
        ctl.switch(opt)
    for _ in range(min(reps, max(0, ctl.layers[ctl.layer_names[0]].budget.num_switches - 1))):
        _sync(device)
        t0 = time.perf_counter()
        ctl.switch(opt)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "layers": len(ctl.layers),
        "groups": len(ctl.switch_groups()),
        "switch_s": statistics.median(times) if times else float("nan"),
        "aten_ops": sum(ops.n.values()),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face folder (default: the fetched MiniLM, else a tiny BERT)")
    ap.add_argument("--base-size", action="store_true", help="random-init BERT-base shapes instead of MiniLM")
    ap.add_argument("--minilm-shapes", action="store_true", help="random-init MiniLM shapes (nothing to fetch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=8)
    ap.add_argument("--r-target", type=int, default=64)
    ap.add_argument("--svd", default="full", choices=["full", "randomized"])
    ap.add_argument("--rounds", type=int, default=2, help="each round runs every method once, order alternating")
    ap.add_argument("--layer-by-layer", action="store_true", help="also SRLoRA with the batched switch turned off")
    ap.add_argument(
        "--gradient-subspace", action="store_true", help='also SRLoRA with direction_policy="gradient_subspace"'
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.minilm_shapes:
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        base, source = BertForSequenceClassification(cfg), "random-init MiniLM shapes (384 x 6, MLP 1536)"
    else:
        base, source = load_base(args.model, args.base_size)
    base = base.to(device)
    base.train()
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    batches = [
        {
            "input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device),
            "labels": torch.randint(0, 2, (args.batch_size,), generator=g).to(device),
        }
        for _ in range(args.steps)
    ]
    methods = ["lora", "srlora", "lora-control"] + (["srlora-layer-by-layer"] if args.layer_by_layer else [])
    methods += ["srlora-gradient-subspace"] if args.gradient_subspace else []
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SRLoRAWarning)  # a short run's interval may be below the EMA warm-up
        for round_ in range(args.rounds):
            order = methods if round_ % 2 == 0 else methods[::-1]
            for method in order:
                res = one_run(base, args, "lora" if method == "lora-control" else method, batches, device)
                runs[method].append(res)
                print(
                    f"round {round_ + 1} {method:22s} total {res['total_s']:7.2f} s (init {res['init_s']:.2f} s, "
                    f"{res['switches']} switches, a switch step +{1e3 * res['switch_step_extra_s']:.1f} ms)",
                    flush=True,
                )

    def total(method: str) -> float:
        return statistics.fmean(r["total_s"] for r in runs[method])

    out = {
        "source": source,
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "runs": runs,
        "ratio_srlora_to_lora": total("srlora") / total("lora"),
        "ratio_control": total("lora-control") / total("lora"),
        "srlora_init_s": statistics.fmean(r["init_s"] for r in runs["srlora"]),
        "switch_step_extra_s": statistics.fmean(r["switch_step_extra_s"] for r in runs["srlora"]),
    }
    costs = {"batched": switch_cost(base, args, batches, device, True)}
    costs["layer_by_layer"] = switch_cost(base, args, batches, device, False)
    out["switch_of_all_layers"] = costs
    if args.layer_by_layer:
        out["ratio_layer_by_layer_to_lora"] = total("srlora-layer-by-layer") / total("lora")
        out["switch_step_extra_s_layer_by_layer"] = statistics.fmean(
            r["switch_step_extra_s"] for r in runs["srlora-layer-by-layer"]
        )
    print(
        f"\n{source}, {device}, {args.steps} steps of {args.batch_size} x {args.seq_len}, r={args.r}, "
        f"r_target={args.r_target}, {args.rounds} rounds"
    )
    print(f"SRLoRA / LoRA, whole run: {out['ratio_srlora_to_lora']:.3f}   (A/A control: {out['ratio_control']:.3f})")
    print(
        f"SRLoRA init: {out['srlora_init_s']:.2f} s; one switch step costs "
        f"+{1e3 * out['switch_step_extra_s']:.1f} ms over a plain step"
    )
    for name, c in costs.items():
        print(
            f"one switch of all {c['layers']} layers ({c['groups']} groups), {name}: {1e3 * c['switch_s']:.1f} ms, "
            f"{c['aten_ops']} ATen ops"
        )
    if args.layer_by_layer:
        print(
            f"layer by layer (before): SRLoRA / LoRA {out['ratio_layer_by_layer_to_lora']:.3f}, a switch step "
            f"+{1e3 * out['switch_step_extra_s_layer_by_layer']:.1f} ms"
        )
    if args.gradient_subspace:
        out["ratio_gradient_subspace_to_lora"] = total("srlora-gradient-subspace") / total("lora")
        out["ratio_gradient_subspace_to_srlora"] = total("srlora-gradient-subspace") / total("srlora")
        print(
            f"gradient subspace: SRLoRA / LoRA {out['ratio_gradient_subspace_to_lora']:.3f}, over SRLoRA with the "
            f"paper's entries {out['ratio_gradient_subspace_to_srlora']:.3f}"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
