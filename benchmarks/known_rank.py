"""The known-rank benchmark (srlora.experiments.known_rank): LoRA, PiSSA and SRLoRA at rank r
against a target update of known rank K, and LoRA at 4r and 8r.

    python benchmarks/known_rank.py --quick                  # one cell, one seed (about a minute)
    python benchmarks/known_rank.py --K 16 --steps 2000      # one cell, three seeds
    python benchmarks/known_rank.py --study --out runs/known-rank   # the whole map, resumable

Prints each method's final relative error (mean over seeds) and, for one layer, the best
error any rank-r adapter can reach. The map is rendered into docs/RESULTS.md by
``srlora study --part known-rank``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from srlora.experiments.known_rank import KnownRankRun, cell_runs, run, run_study


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=16, help="rank of the target update")
    ap.add_argument("--r", type=int, default=2, help="the adapter's rank")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--target", choices=["random", "tail"], default="random")
    ap.add_argument("--spectrum", choices=["gauss", "power"], default="gauss")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument("--study", action="store_true", help="run the whole map into --out (resumable)")
    ap.add_argument("--out", default="runs/known-rank")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [1] if args.quick else [int(s) for s in args.seeds.split(",")]
    if args.study:
        rows = run_study(Path(args.out), seeds)
        print(f"{len(rows)} runs in {args.out}/results.jsonl", file=sys.stderr)
        return 0
    base = KnownRankRun(
        "lora", args.r, args.K, target=args.target, spectrum=args.spectrum, layers=args.layers, steps=args.steps
    )
    results: dict[str, list[float]] = defaultdict(list)
    floor = None
    for spec in cell_runs(base, seeds):
        row = run(spec)
        results[row["label"]].append(row["error"])
        floor = row["floor_r"] if floor is None else floor
        print(f"{row['label']:32s} seed {spec.seed}: error {row['error']:.4f} ({row['wall_s']:.1f} s)", flush=True)
    print(f"\n{dataclasses.asdict(base) | {'seeds': seeds}}")
    if floor is not None:
        print(f"best error of any rank-{args.r} update: {floor:.4f}")
    for label, errs in results.items():
        sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
        print(f"{label:32s} {statistics.mean(errs):.4f} ± {sd:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
