"""How much of the windowed gradient's top-r' part the single-pass sketch recovers, per
``sketch_oversample`` (``direction_policy="gradient_subspace"``).

The gradient summed over one capture window (19 absorption batches of 4 x 128 tokens, at the
pretrained SmolLM2-135M) is formed in full for the 7 projections of blocks 0, 10 and 20. For
each oversample p, r' and 5 draws of the test matrices, the sketch's top vectors ``(u, v)`` are
computed from ``Y = G Omega`` and ``Z = Psi G`` exactly as at a switch
(:func:`srlora.subspace.sketch_top_vectors`), and their captured energy
``||u^T G v||_F^2`` is divided by the optimum ``sigma_1^2 + ... + sigma_r'^2``. The capture's
cost per token and layer is ``(m + n)(k + l)`` multiply-adds with ``k = r' + p``,
``l = 2k + 1``: a smaller p is cheaper and recovers less.

    python benchmarks/sketch_quality.py            # r' = 1, 2, 4; p = 8 (the default), 4, 2, 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from srlora.atomic import atomic_write_text
from srlora.experiments.absorb import AbsorbConfig, load_smollm2
from srlora.experiments.corpus import build_corpus
from srlora.schedule import ema_warmup_steps
from srlora.subspace import sketch_top_vectors


def _without_json(argv: list[str] | None) -> list[str]:
    """The arguments that made a result, where its JSON went left out."""
    argv = sys.argv[1:] if argv is None else argv
    kept = []
    for i, a in enumerate(argv):
        if a == "--json" or a.startswith("--json=") or (i > 0 and argv[i - 1] == "--json"):
            continue
        kept.append(a)
    return kept


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="0,10,20", help="comma-separated decoder blocks whose projections are used")
    ap.add_argument("--draws", type=int, default=5, help="test-matrix draws per matrix and setting")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base, tok = load_smollm2()
    corpus = build_corpus(tok, AbsorbConfig("srlora", 2, 20, switch_interval=40, steps=400))
    for p in base.parameters():
        p.requires_grad_(False)
    mats: dict[str, torch.nn.Parameter] = {}
    for b in (int(x) for x in args.blocks.split(",")):
        layer = base.model.layers[b]
        for name, mod in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
            if isinstance(mod, torch.nn.Linear):
                mod.weight.requires_grad_(True)
                mats[f"{b}.{name}"] = mod.weight
    window = ema_warmup_steps(0.85)
    g = torch.Generator().manual_seed(1)
    for _ in range(window):
        x = corpus.train[torch.randint(0, len(corpus.train), (4,), generator=g)]
        base(input_ids=x, labels=x).loss.backward()
    grads = {name: W.grad.double() for name, W in mats.items()}
    svals = {name: torch.linalg.svdvals(G) for name, G in grads.items()}
    rows = []
    for rp in (1, 2, 4):
        for over in (8, 4, 2, 1):
            fractions = []
            for name, G in grads.items():
                m, n = G.shape
                k = min(rp + over, m, n)
                k_co = min(2 * k + 1, m)
                best = float((svals[name][:rp] ** 2).sum())
                for d in range(args.draws):
                    gen = torch.Generator().manual_seed(100 * d + 7)
                    omega, psi = torch.randn(n, k, generator=gen), torch.randn(k_co, m, generator=gen)
                    u, v = sketch_top_vectors((G @ omega.double()).float(), (psi.double() @ G).float(), psi, rp)
                    fractions.append(float(((u.double().T @ G @ v.double()) ** 2).sum()) / best)
            f = torch.tensor(fractions)
            k = rp + over
            rows.append(
                {
                    "r_prime": rp,
                    "oversample": over,
                    "k_plus_l": 3 * k + 1,
                    "captured_mean": float(f.mean()),
                    "captured_min": float(f.min()),
                }
            )
            print(
                f"r'={rp} oversample {over} (k + l = {3 * k + 1}): captured / optimal top-{rp} energy "
                f"mean {f.mean():.3f}, min {f.min():.3f} over {len(mats)} matrices x {args.draws} draws",
                flush=True,
            )
    decay = {name: [round(float(s / svals[name][0]), 3) for s in svals[name][:6]] for name in list(mats)[:7]}
    out = {
        "model": "SmolLM2-135M (float32), the absorption corpus",
        "command": shlex.join(["python", "benchmarks/sketch_quality.py", *_without_json(argv)]),
        "window_batches": window,
        "matrices": list(mats),
        "rows": rows,
        "sigma_1_to_6_over_sigma_1": decay,
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
