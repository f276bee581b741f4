"""The known-rank benchmark: where do more directions pay?

A pretrained layer ``W0`` (or a small stack of them with a GELU between) must learn a target
update of known rank ``K``: the teacher is ``W0 + dW`` with ``rank(dW) = K``. The student is
``W0`` with a LoRA adapter of rank ``r`` trained by AdamW on fresh Gaussian inputs, so there
is no overfitting and the only limit is what the adapter can represent and learn in time.

* ``W0``: ``m x n`` with random singular vectors and the singular values of a Gaussian
  matrix (``spectrum="gauss"``, Marchenko-Pastur: no direction dominates) or a power law
  ``sigma_i = i^-0.5`` (``"power"``: a few directions dominate, as in many pretrained
  weights), scaled to entries of order ``1 / sqrt(n)``;
* ``dW``: ``K`` orthonormal pairs with singular values falling geometrically from 1 to 1/4,
  either random directions (``target="random"``) or the tail of ``W0``'s spectrum, its last
  ``K`` singular directions (``target="tail"``: what PiSSA's and SRLoRA's principal
  directions are furthest from), scaled to ``||dW||_F = 0.3 ||W0||_F``.

The error is relative to what there is to learn. One layer: ``||W_eff - W0 - dW||^2_F /
||dW||^2_F``, which is the expected squared error on a fresh input exactly (``x ~ N(0, I)``).
A stack: the mean squared output error on 4,096 fixed held-out inputs over that of the
untrained stack. For one layer the best any rank-``r`` adapter can reach is
``sum_{k > r} s_k^2 / sum_k s_k^2`` (Eckart-Young): SRLoRA below it has added rank.

    python benchmarks/known_rank.py --quick                 # the mechanism, one seed
    srlora study --part known-rank                          # the map (docs/RESULTS.md)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .spec import digest

METHODS = ("lora", "pissa", "srlora")


@dataclass(frozen=True)
class KnownRankRun:
    """One run of the benchmark.

    Attributes:
        method: ``lora``, ``pissa`` or ``srlora``.
        r: the adapter's rank.
        K: the rank of the target update.
        target: ``random`` or ``tail`` directions of ``dW``.
        spectrum: ``W0``'s singular values: ``gauss`` (a Gaussian matrix: Marchenko-Pastur,
            flat-ish) or ``power`` (``i^-0.5``: a few dominant directions).
        layers: 1 (one layer) or more (a stack with GELU between).
        steps: optimizer steps ``N``.
        interval: SRLoRA's steps between switches (``r_target`` follows: enough directions
            for ``N / interval`` switches).
        gamma: SRLoRA's fusion ratio (``r' = gamma r``).
        width: ``m = n``.
        lr: AdamW's learning rate (cosine decay to 10%, no warm-up).
        seed: the teacher, the inputs and LoRA's initialisation.
    """

    method: str
    r: int
    K: int
    target: str = "random"
    spectrum: str = "gauss"
    layers: int = 1
    steps: int = 2000
    interval: int = 0
    gamma: float = 0.5
    width: int = 128
    lr: float = 2e-3
    batch: int = 64
    seed: int = 1
    direction_policy: str = "spectrum"  # SRLoRA's entry options: SRLoRAConfig's fields
    entry_scale: float | None = None
    # Any other SRLoRAConfig field of an SRLoRA run, as (name, value) pairs (hashable)
    srlora: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "srlora", tuple((str(k), v) for k, v in self.srlora))  # from JSON: lists
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.target not in ("random", "tail"):
            raise ValueError(f"target must be 'random' or 'tail', got {self.target!r}")
        if self.spectrum not in ("gauss", "power"):
            raise ValueError(f"spectrum must be 'gauss' or 'power', got {self.spectrum!r}")
        if self.method == "srlora" and self.interval < 1:
            raise ValueError("an SRLoRA run needs interval >= 1")

    @property
    def r_prime(self) -> int:
        return max(1, round(self.gamma * self.r))

    @property
    def r_target(self) -> int:
        """Directions for every switch the run has room for: ``r + r' * floor((N - 1) / interval)``."""
        switches = (self.steps - 1) // self.interval if self.interval else 0
        return min(self.width, self.r + self.r_prime * max(1, switches))

    @property
    def key(self) -> str:
        """The run's identity (:mod:`srlora.experiments.spec`): SRLoRA's entry options count
        only where set (they came after the first runs)."""
        later = ("direction_policy", "entry_scale", "srlora")
        first = [f.name for f in dataclasses.fields(self) if f.name not in later]
        return digest(self, first)

    def label(self) -> str:
        if self.method != "srlora":
            return f"{self.method} r={self.r}"
        entry = "" if self.direction_policy == "spectrum" else f" {self.direction_policy}"
        entry += "" if self.entry_scale is None else f" scale={self.entry_scale:g}"
        entry += "".join(f" {name}={value}" for name, value in self.srlora)
        return f"srlora r={self.r} T={self.interval} gamma={self.gamma:g}{entry}"


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def make_problem(spec: KnownRankRun) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``([W0 per layer], [dW per layer])`` (float32), fixed by the seed, the shape and the target."""
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    n = spec.width
    W0s, dWs = [], []
    for _ in range(spec.layers):
        U, V = _orthonormal(n, n, gen), _orthonormal(n, n, gen)
        if spec.spectrum == "power":
            sigma = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5
        else:
            sigma = torch.linalg.svdvals(torch.randn(n, n, generator=gen, dtype=torch.float64))
        W0 = (U * sigma) @ V.T
        W0 = W0 * (math.sqrt(n) / W0.norm())  # entries of order 1 / sqrt(n): unit-gain layers
        s = torch.logspace(0, math.log10(0.25), spec.K, dtype=torch.float64)
        if spec.target == "tail":
            P, Q = U[:, n - spec.K :], V[:, n - spec.K :]
        else:
            P, Q = _orthonormal(n, spec.K, gen), _orthonormal(n, spec.K, gen)
        dW = (P * s) @ Q.T
        dW = dW * (0.3 * W0.norm() / dW.norm())
        W0s.append(W0.float())
        dWs.append(dW.float())
    return W0s, dWs


def best_rank_error(dW: torch.Tensor, r: int) -> float:
    """The least relative error any update of rank ``r`` reaches on ``dW`` (Eckart-Young)."""
    sv = torch.linalg.svdvals(dW.double()).square()
    return float(sv[r:].sum() / sv.sum())


class Stack(nn.Module):
    """``layers`` bias-free linear layers, GELU between them."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for w in weights:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            self.layers.append(lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.functional.gelu(x)
        return x


def effective_weights(model: nn.Module) -> list[torch.Tensor]:
    """``W + s B A`` of each adapted layer, in order."""
    out = []
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            W = module.get_base_layer().weight.detach().float()
            s = float(module.scaling["default"])
            B, A = module.lora_B["default"].weight.detach().float(), module.lora_A["default"].weight.detach().float()
            out.append(W + s * B @ A)
    return out


def run(spec: KnownRankRun, record_every: int = 0) -> dict[str, Any]:
    """Train one student; returns the final error, the error curve (``record_every`` > 0),
    the rank-``r`` floor and the wall time."""
    import peft

    from .. import SRLoRA, SRLoRAConfig

    started = time.perf_counter()
    W0s, dWs = make_problem(spec)
    teacher = Stack([w + d for w, d in zip(W0s, dWs, strict=True)])
    torch.manual_seed(spec.seed)
    student = Stack(W0s)
    names = [f"layers.{i}" for i in range(spec.layers)]
    lora = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.r,
        target_modules=names,
        init_lora_weights="pissa" if spec.method == "pissa" else True,
    )
    model = peft.get_peft_model(student, lora)
    ctl = None
    if spec.method == "srlora":
        config = SRLoRAConfig(
            r_target=spec.r_target,
            gamma=spec.gamma,
            switch_interval=spec.interval,
            direction_policy=spec.direction_policy,  # type: ignore[arg-type]
            entry_scale=spec.entry_scale,
            **dict(spec.srlora),
        )
        ctl = SRLoRA(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.1 + 0.45 * (1 + math.cos(math.pi * t / spec.steps)))
    if ctl is not None:
        ctl.attach(opt)
    gen = torch.Generator().manual_seed(20_000 + spec.seed)
    held = torch.randn(4096, spec.width, generator=gen)
    with torch.no_grad():
        y_held = teacher(held)
        base_err = float((Stack(W0s)(held) - y_held).square().mean())

    def error() -> float:
        with torch.no_grad():
            if spec.layers == 1:
                W = effective_weights(model)[0]
                return float((W - W0s[0] - dWs[0]).square().sum() / dWs[0].square().sum())
            return float((model(held) - y_held).square().mean()) / base_err

    curve = [(0, error())]
    for step in range(1, spec.steps + 1):
        x = torch.randn(spec.batch, spec.width, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if record_every and step % record_every == 0:
            curve.append((step, error()))
    final = error()
    return {
        "spec": dataclasses.asdict(spec),
        "label": spec.label(),
        "r_target": spec.r_target if spec.method == "srlora" else spec.r,
        "error": final,
        "floor_r": best_rank_error(dWs[0], spec.r) if spec.layers == 1 else None,
        "curve": curve,
        "switches": 0 if ctl is None else len(ctl.history) // spec.layers,
        "wall_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------- the study
def srlora_intervals(steps: int) -> list[int]:
    """SRLoRA's intervals tried at a step budget: 15 steps (the EMA warm-up) up to a
    quarter of the run."""
    return [t for t in (15, 30, 60, 120, 250, 500, 1000, 2000) if 4 * t <= steps]


def cell_runs(base: KnownRankRun, seeds: list[int]) -> list[KnownRankRun]:
    """Every run of one cell (``base`` fixes K, target, spectrum, layers, steps): LoRA at r,
    4r and 8r, PiSSA at r, SRLoRA at r over :func:`srlora_intervals` (gamma 0.5) and two of
    them at gamma 1."""
    r = base.r
    runs = []
    for seed in seeds:
        one = dataclasses.replace(base, seed=seed)
        runs += [dataclasses.replace(one, method="lora", r=k) for k in (r, 4 * r, 8 * r)]
        runs.append(dataclasses.replace(one, method="pissa"))
        intervals = srlora_intervals(base.steps)
        runs += [dataclasses.replace(one, method="srlora", interval=t) for t in intervals]
        runs += [dataclasses.replace(one, method="srlora", interval=t, gamma=1.0) for t in intervals[1::3]]
    return runs


def study_cells() -> dict[str, KnownRankRun]:
    """The cells of the map: the step budget and K on one layer (random targets, Gaussian
    spectrum), then the tail target, the power-law spectrum and a 3-layer stack at 2,000 steps."""
    cells = {}
    for K in (4, 16, 64):
        for steps in (500, 2000, 8000):
            cells[f"K{K}-N{steps}"] = KnownRankRun("lora", 2, K, steps=steps)
        cells[f"K{K}-N2000-tail"] = KnownRankRun("lora", 2, K, target="tail")
        cells[f"K{K}-N2000-power"] = KnownRankRun("lora", 2, K, spectrum="power")
        cells[f"K{K}-N2000-stack3"] = KnownRankRun("lora", 2, K, layers=3)
    return cells


def run_study(out: Path, seeds: list[int], cells: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the missing runs of the map (resumable: ``out/results.jsonl`` keeps one line per
    finished run, keyed by its spec), one thread; returns every result."""
    chosen = study_cells() if cells is None else {k: v for k, v in study_cells().items() if k in cells}
    return run_specs(
        out / "results.jsonl", [(name, spec) for name, base in chosen.items() for spec in cell_runs(base, seeds)]
    )


def run_specs(path: Path, specs: list[tuple[str, KnownRankRun]]) -> list[dict[str, Any]]:
    """Run the ``(cell, spec)`` not in ``path`` yet (a JSON line per finished run, keyed by its
    spec: resumable), one thread; returns every result in ``path``."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill: that run runs again
            done[row["key"]] = row
    todo = [(name, spec) for name, spec in specs if spec.key not in done]
    print(f"known-rank: {len(done)} runs done earlier, {len(todo)} to run", file=sys.stderr)
    with open(path, "a") as fh:
        for i, (name, spec) in enumerate(todo, 1):
            row = run(spec, record_every=max(1, spec.steps // 40))
            row.update(key=spec.key, cell=name)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            done[spec.key] = row
            if i % 20 == 0:
                print(f"known-rank: {i}/{len(todo)}", file=sys.stderr, flush=True)
    return list(done.values())
