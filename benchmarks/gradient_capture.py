"""What the gradient capture of ``direction_policy="gradient_subspace"`` costs a training step.

Four models of the same base train on the same batch in rotation (machine noise hits all):
PEFT LoRA, a second identical PEFT LoRA (the A/A control), SRLoRA with the paper's entries
and SRLoRA with new pairs along the gradient's subspace, both switching every 19 steps, so
that every step lies in a capture window (19 steps at beta1 = 0.85): the worst case, where
the sketch hooks run on every step. A switch step is in the medians as it falls.

    python benchmarks/gradient_capture.py                       # MiniLM (srlora fetch minilm), 16 x 128, r = 8
    python benchmarks/gradient_capture.py --smollm2             # the absorption study's setting: SmolLM2-135M,
                                                                # 4 x 128 tokens, r = 2, both pairs per switch

Prints each median step, the ratios to LoRA, the capture's own cost per step (gradient
subspace over the paper's entries), and what it adds to a run whose switches come every
``--interval`` steps (the capture runs in 19 of them).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from step_overhead import load_base, lora, timed  # benchmarks/ is on the path when run as a script

from srlora import SRLoRA, SRLoRAConfig, SRLoRAWarning
from srlora.atomic import atomic_write_text
from srlora.schedule import ema_warmup_steps


def command(argv: list[str]) -> str:
    """The command that made a result, as the docs print it (where its JSON went left out)."""
    kept, skip = [], False
    for a in argv:
        if skip or a == "--json":
            skip = not skip
            continue
        if not a.startswith("--json="):
            kept.append(a)
    return shlex.join(["python", "benchmarks/gradient_capture.py", *kept])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="Hugging Face folder (default: the fetched MiniLM, else a tiny BERT)")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M (the absorption task's model), causal LM")
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per model (after 3 warm-up steps each)")
    ap.add_argument("--interval", type=int, default=40, help="the run's switch interval, for the whole-run figure")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    if args.smollm2:
        from srlora.experiments.absorb import load_smollm2

        base, source = load_smollm2()[0], "SmolLM2-135M (float32)"
    else:
        base, source = load_base(args.model)
    base.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    labels = ids if args.smollm2 else torch.randint(0, 2, (args.batch_size,), generator=g)
    batch = {"input_ids": ids, "labels": labels}
    window = ema_warmup_steps(0.85)
    models = {name: lora(base, args.r, args.r) for name in ("lora", "control", "paper", "gradient subspace")}
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SRLoRAWarning)
        for name, policy in (("paper", "spectrum"), ("gradient subspace", "gradient_subspace")):
            config = SRLoRAConfig(
                r_target=args.r * 16, switch_interval=window, gamma=args.gamma, direction_policy=policy
            )
            SRLoRA(models[name], config).attach(opts[name])

    def step(name: str) -> None:
        models[name](**batch).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    started = time.perf_counter()
    for i in range(3 + args.steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = timed(lambda n=name: step(n))
            if i >= 3:
                times[name].append(t)
    med = {n: statistics.median(v) for n, v in times.items()}
    capture = (med["gradient subspace"] - med["paper"]) / med["lora"]
    out = {
        "model": source,
        "command": command(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "batch": f"{args.batch_size}x{args.seq_len}",
        "r": args.r,
        "gamma": args.gamma,
        "steps": args.steps,
        "median_step_s": med,
        "ratio_to_lora": {n: med[n] / med["lora"] for n in names},
        "capture_per_captured_step": capture,
        "interval": args.interval,
        "capture_whole_run": capture * min(window, args.interval) / args.interval,
        "benchmark_s": time.perf_counter() - started,
    }
    print(f"{source}, batch {out['batch']}, r={args.r}, {args.steps} timed steps each; {out['machine']}")
    for n in names:
        print(f"  {n:18s} median step {med[n] * 1e3:8.1f} ms   / LoRA {out['ratio_to_lora'][n]:.3f}")
    print(
        f"the capture costs {100 * capture:.1f}% of a LoRA step on a captured step; with a switch every "
        f"{args.interval} steps (captured: {min(window, args.interval)}), "
        f"{100 * out['capture_whole_run']:.1f}% of a run"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
