"""The 600-step study's paper regime at paper scale, on one GPU (issue 13, point 5).

MiniLM on ``mr`` and ``mr-reg``: LoRA, PiSSA, SRLoRA (spectrum) and SRLoRA (gradient),
2,000 steps, r = 8, r_target = 256 (r' = 4: 62 switches, t_interval 32), three seeds,
paired by seed. Runs go ``--jobs`` at a time on the one GPU (a MiniLM step is launch-bound,
so several processes fill the device better than one). Writes ``OUT/gpu_study.md`` (the
tables of docs/RESULTS.md's 600-step section) and keeps every run under ``OUT/runs/study``.

    python scripts/gpu_study.py --model MINILM_FOLDER --out OUT            # on a GPU machine
    python scripts/gpu_study.py --model M --out O --device cpu --steps 40 --r-target 16 --seeds 1   # a dry run

``--model`` may be an fp16 copy of MiniLM (runs load it in float32): with the MR data that
is under 64 MiB, the most a device call carries. The MR data comes from ``$SRLORA_CACHE``.
Launching stops after ``--deadline-s`` seconds; what finished is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout, installed or not

from srlora.atomic import atomic_write_text
from srlora.experiments.rundata import load_runs
from srlora.experiments.tables import by_seed, dynamics_table, paired_table, variant_table

VARIANTS = {  # label -> (cell suffix, method, options)
    "LoRA": ("", "lora", []),
    "PiSSA": ("", "pissa", []),
    "SRLoRA spectrum": ("", "srlora", []),
    "SRLoRA gradient": ("-gradient", "srlora", ["--direction-policy", "gradient"]),
}
PAIRS = [
    ("SRLoRA spectrum", "LoRA"),
    ("SRLoRA spectrum", "PiSSA"),
    ("SRLoRA gradient", "LoRA"),
    ("SRLoRA gradient", "PiSSA"),
    ("SRLoRA gradient", "SRLoRA spectrum"),
]


def argv_of(args: argparse.Namespace, task: str, label: str, seed: int) -> tuple[list[str], Path]:
    suffix, method, options = VARIANTS[label]
    out = Path(args.out) / "runs/study" / f"gpu-{task}{suffix}" / method / f"seed{seed}"
    argv = [
        "train",
        "--task",
        task,
        "--method",
        method,
        "--seed",
        str(seed),
        "--preset",
        "quick",
        "--model",
        str(Path(args.model).resolve()),
        "--device",
        args.device,
        "--max-steps",
        str(args.steps),
        "--warmup-steps",
        str(args.steps // 10),
        "--eval-every",
        "1000000",
        "--r-target",
        str(args.r_target),
        *options,
        "--out",
        str(out),
        "--resume",
    ]
    return argv, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="MiniLM folder (an fp16 copy is fine)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--r-target", type=int, default=256)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--tasks", default="mr,mr-reg")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--deadline-s", type=float, default=480.0)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = args.tasks.split(",")
    started = time.time()
    # Tasks outermost: a task's whole paired set finishes first if the deadline cuts the list.
    todo = [(task, label, seed) for task in tasks for seed in seeds for label in VARIANTS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")

    def one(item: tuple[str, str, int]) -> str:
        task, label, seed = item
        if time.time() - started > args.deadline_s:
            return f"{task}/{label}/seed{seed}: not started (deadline)"
        argv, out = argv_of(args, task, label, seed)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(out / "train.log", "w") as log:
            cmd = [sys.executable, "-m", "srlora.experiments.cli", *argv]
            rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        return f"{task}/{label}/seed{seed}: rc {rc}, {time.time() - t0:.0f} s"

    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(one, todo):
            print(line, flush=True)

    root = Path(args.out)
    md = [
        f"# Paper regime at paper scale: {args.steps} steps, r = 8, r_target = {args.r_target}",
        "",
        f"`python scripts/gpu_study.py --model MINILM --out OUT` ({args.jobs} runs at a time on one GPU; "
        f"{time.time() - started:.0f} s in all). MiniLM (an fp16 copy, trained in float32), the quick preset "
        f"otherwise (batch 16, lr 5e-4, {args.steps // 10} warm-up steps), dev = a fixed 1,000-example subset after "
        "the last step. Differences are paired by seed: mean [95% Student-t interval].",
        "",
    ]
    for task in tasks:
        runs = {}
        for label, (suffix, method, _) in VARIANTS.items():
            rs = load_runs(root, f"gpu-{task}{suffix}", method)
            if rs:
                runs[label] = rs
        if not runs:
            continue
        md += [f"## {task}", "", *variant_table(runs), *paired_table(runs, PAIRS), *dynamics_table(runs)]
        first = next(iter(runs.values()))[0]
        md += [f"Seeds per variant: { {k: sorted(by_seed(v, first['headline_metric'])) for k, v in runs.items()} }", ""]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    md += [f"Device: {device}, torch {torch.__version__}.", ""]
    atomic_write_text(root / "gpu_study.md", "\n".join(md))
    keep = ("task", "method", "seed", "steps", "final", "early_train_loss", "wall_s", "directions_used")
    per_run = []
    for task in tasks:
        for label, (suffix, method, _) in VARIANTS.items():
            for r in load_runs(root, f"gpu-{task}{suffix}", method):
                entry = {"variant": label, **{k: r.get(k) for k in keep}}
                used = entry.pop("directions_used") or {}
                entry["mean_directions_used"] = sum(used.values()) / len(used) if used else None
                per_run.append(entry)
    atomic_write_text(root / "gpu_runs.json", json.dumps(per_run, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
