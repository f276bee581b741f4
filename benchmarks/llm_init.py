"""SRLoRA's initialisation at LLM scale: SVD time and SVD-cache memory for decoders with the
shapes of a 1B and a 7B Llama (q, k, v, o, gate, up, down adapted in every block).

The weights are random (the cost depends on the shapes, not the values) and are made one
at a time, so the run fits this machine. Each distinct shape is decomposed ``--repeats``
times with the randomized SVD (and once with the full SVD unless ``--no-full``); the time of
a whole model is the median per shape times the number of layers of that shape: an
extrapolation from a sample, said so in the output. What is timed is what
``SRLoRA(model, config)`` does per layer: the SVD of ``W0`` and the PiSSA split
``W <- W0 - U_r diag(S_r) V_r^T``.

    python benchmarks/llm_init.py                        # 1B and 7B shapes, r_target 256
    python benchmarks/llm_init.py --r-target 64 --no-full --json out.json

The SVD cache holds ``(m + n + 1) k`` float32 numbers per layer; with ``svd_device="cpu"``
it stays in host memory (the accelerator keeps only the model), at the price of moving
the ``r'`` directions of each switch to the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from srlora.atomic import atomic_write_text
from srlora.svd import top_singular_triplets

# name -> (hidden, MLP, key/value width, blocks, parameters of the model)
MODELS = {
    "1B": (2048, 8192, 512, 16, 1.24e9),
    "7B": (4096, 11008, 4096, 32, 6.74e9),
}


def layer_shapes(hidden: int, mlp: int, kv: int) -> dict[str, tuple[int, int]]:
    """``(m, n)`` (out, in) of each adapted projection of one block."""
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (mlp, hidden),
        "up_proj": (mlp, hidden),
        "down_proj": (hidden, mlp),
    }


def init_time(m: int, n: int, k: int, method: str, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) / n**0.5
    start = time.perf_counter()
    cache = top_singular_triplets(w, min(k, m, n), method=method)
    r = 8
    w -= (cache.U[:, :r] * cache.S[:r]) @ cache.V[:, :r].T  # the PiSSA split of the top r
    return time.perf_counter() - start


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r-target", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="randomized SVDs timed per distinct shape")
    ap.add_argument("--no-full", action="store_true", help="skip the (slow) full SVD")
    ap.add_argument("--models", default="1B,7B")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    k = args.r_target
    out: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "r_target": k,
        "models": {},
    }
    print(f"{out['machine']}; r_target = {k}; random weights, one layer at a time")
    timings: dict[tuple[int, int, str], float] = {}
    for name in args.models.split(","):
        hidden, mlp, kv, blocks, params = MODELS[name]
        shapes = layer_shapes(hidden, mlp, kv)
        counts: dict[tuple[int, int], int] = {}
        for shape in shapes.values():
            counts[shape] = counts.get(shape, 0) + blocks
        methods = ["randomized"] if args.no_full else ["randomized", "full"]
        for method in methods:
            for (m, n), _ in counts.items():
                if (m, n, method) not in timings:
                    reps = args.repeats if method == "randomized" else 1
                    timings[m, n, method] = statistics.median(init_time(m, n, k, method, i) for i in range(reps))
                    print(f"  {m:>5} x {n:<5} {method:>10}: {timings[m, n, method]:7.2f} s per layer")
        cache_bytes = sum(c * (m + n + 1) * min(k, m, n) * 4 for (m, n), c in counts.items())
        entry = {
            "layers": sum(counts.values()),
            "shapes": {f"{m}x{n}": c for (m, n), c in counts.items()},
            "svd_cache_bytes": cache_bytes,
            "model_bf16_bytes": params * 2,
            "cache_over_model_bf16": cache_bytes / (params * 2),
        }
        for method in methods:
            entry[f"init_s_{method}_extrapolated"] = sum(c * timings[m, n, method] for (m, n), c in counts.items())
        out["models"][name] = entry
        line = (
            f"{name}: {entry['layers']} layers; randomized init {entry['init_s_randomized_extrapolated'] / 60:.1f} min"
        )
        if "full" in methods:
            line += f", full {entry['init_s_full_extrapolated'] / 60:.1f} min"
        line += (
            f" (extrapolated from the timed shapes); SVD cache {cache_bytes / 2**30:.2f} GiB = "
            f"{entry['cache_over_model_bf16']:.1%} of the model's bf16 weights ({params * 2 / 2**30:.1f} GiB)"
        )
        print(line)
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
