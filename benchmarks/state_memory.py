"""Trainable-state memory of SRLoRA against LoRA's ranks, on the absorption study's model.

    python benchmarks/state_memory.py                     # SmolLM2-135M, r 2 and 16
    python benchmarks/state_memory.py --json docs/results/state_memory.json

Each configuration is built on a fresh SmolLM2-135M (q, k, v, o, gate, up, down adapted, as
``srlora absorb`` does) and takes one AdamW step on a batch of 4 x 128 tokens, so that the
gradients and the optimizer's moments exist; then its trainable state is counted from the
tensors (``srlora.experiments.methods.trainable_state_bytes``: what trains, its gradients, the
optimizer's state, and SRLoRA's own tensors as allocated, ``SRLoRA.memory_bytes``) with every
capture window open, SRLoRA's peak: it allocates its records up front, for every pair a layer
may use. The same count as ``srlora absorb`` at its peak step, without the run.

Printed: each configuration's parts in MiB, its ratio to LoRA r = 2 (the baseline, measured in
the same process), and the LoRA rank of the same memory (LoRA's state grows linearly in r).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import torch

from srlora.atomic import atomic_write_text
from srlora.experiments.absorb import AbsorbConfig, load_smollm2
from srlora.experiments.methods import build, trainable_state_bytes
from srlora.experiments.studies.new_pairs.jobs import BEST, VARIANTS


def configs(ranks: list[int]) -> dict[str, AbsorbConfig]:
    """LoRA at ``ranks`` and every power of 2 between; SRLoRA's chosen entry (the gradient's
    subspace, scale 0.25, both pairs every 40 steps, r_target = 10 r) with and without its
    records, and the paper's entries (W0's next directions), at ``ranks``."""
    out = {f"lora-r{r}": AbsorbConfig("lora", r) for r in sorted({2**i for i in range(1, 7)} | set(ranks))}
    for r in ranks:
        chosen = dataclasses.replace(VARIANTS[BEST][0], r=r, r_target=10 * r)
        out[f"srlora-gsub-r{r}"] = chosen
        out[f"srlora-gsub-r{r}-no-records"] = dataclasses.replace(chosen, srlora={"fused_records": False})
        out[f"srlora-paper-r{r}"] = AbsorbConfig("srlora", r, r_target=10 * r, switch_interval=40, gamma=1.0)
    return out


def measure(cfg: AbsorbConfig, ids: torch.Tensor) -> dict[str, int]:
    built = build(cfg, load_smollm2()[0])
    built.model.train()
    built.model(input_ids=ids, labels=ids).loss.backward()
    built.optimizer.step()
    if built.controller is not None:
        built.controller.directions.update_windows(built.controller.schedule().interval)  # every window open
    return trainable_state_bytes(built)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    rows = {}
    for name, cfg in configs(args.ranks).items():
        rows[name] = measure(cfg, ids)
        m = {k: v / 2**20 for k, v in rows[name].items()}
        print(f"{name:28s} " + " ".join(f"{k} {v:8.1f}" for k, v in m.items()), flush=True)
    base = rows["lora-r2"]["trainable_state_bytes"]
    per_rank = base / 2  # LoRA's state is linear in r (every part is r x (m + n) numbers)
    print(f"\n{'configuration':28s} {'MiB':>8s} {'/ LoRA r=2':>10s} {'LoRA rank of it':>16s}")
    for name, parts in rows.items():
        total = parts["trainable_state_bytes"]
        print(f"{name:28s} {total / 2**20:8.1f} {total / base:10.2f} {total / per_rank:16.1f}")
    if args.json:
        meta = {"machine": f"{platform.machine()}, torch {torch.__version__}", "threads": args.threads}
        atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
