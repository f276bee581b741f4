"""What the alternatives study runs: each method's configuration, its learning-rate sweep,
SRLoRA's options, the rank users pick and the 3-seed confirmation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

from ...absorb import AbsorbConfig
from ...jobs import run_jobs
from ..absorption import STEPS, AbsorbJob, load_absorb
from ..new_pairs.jobs import BEST, VARIANTS

TUNING = """Every method is tuned the same way: a 3-point learning-rate sweep on seed 1 (held-out chunks
decide), the adapters at r = 2 included (LoRA, PiSSA and SRLoRA ran at 5e-4, chosen once, before),
and SRLoRA's confirmed options as methods of their own (screened at 5e-4, then swept).
A sweep whose best point is one of its ends grows by one point beyond that end (at most two), so
that no method is compared at the edge of its range; the next `--part alternatives-screen` runs it.
GaLore's update is ``lr x scale x`` its projected Adam step (no weight decay), so its learning
rate and scale are one knob: the sweep moves the learning rate at galore-torch's scale 0.25."""

# The adapters' learning rate before this study (chosen once).
ADAPTER_LR = 5e-4
# 3 points each, 2.5x apart around the value a user would try first.
SWEEPS: dict[str, tuple[float, ...]] = {
    "full": (1e-5, 3e-5, 1e-4),
    "galore": (1e-4, 3e-4, 1e-3),
    "adapter": (2e-4, ADAPTER_LR, 1.25e-3),
}
GALORE_INTERVAL = 40  # GaLore refreshes its subspace as often as SRLoRA switches (INTERVAL)


def config(method: str, r: int, lr: float, seed: int) -> tuple[str, AbsorbConfig]:
    """The run name and configuration of ``method`` at rank ``r`` (GaLore's rank; full fine-tuning
    has none) and learning rate ``lr``; ``srlora-<tag>``: SRLoRA's chosen entry with the option
    :data:`OPTIONS` ``[tag]``, the option's tag in the name."""
    if method.startswith("srlora-"):
        tag = method.removeprefix("srlora-")
        if tag not in OPTIONS:
            raise ValueError(f"{method!r}: no such SRLoRA option; the options are {', '.join(OPTIONS)}.")
        name, cfg = config("srlora", r, lr, seed)
        option = OPTIONS[tag]
        return name.replace(f"-lr{lr:g}", f"-{tag}-lr{lr:g}"), dataclasses.replace(
            cfg, srlora=dict(option.srlora), **option.run
        )
    if method == "srlora":  # the chosen entry, r_target = 10 r as at r = 2
        cfg = dataclasses.replace(VARIANTS[BEST][0], r=r, r_target=10 * r, lr=lr, seed=seed)
        name = BEST.replace("-r2-", f"-r{r}-")
    elif method == "full":
        cfg, name = AbsorbConfig("full", r, steps=STEPS, lr=lr, seed=seed), "full"
    elif method == "galore":
        cfg = AbsorbConfig("galore", r, switch_interval=GALORE_INTERVAL, steps=STEPS, lr=lr, seed=seed)
        name = f"galore-r{r}"
    else:
        cfg, name = AbsorbConfig(method, r, steps=STEPS, lr=lr, seed=seed), f"{method}-r{r}"
    # Every name carries its learning rate: the runs at 5e-4 are new runs beside the absorption
    # and new-pairs studies' runs of the same configuration, with the second text and the memory.
    return f"{name}-lr{lr:g}", cfg


# LoRA's ladder towards full fine-tuning: r = 16 holds about SRLoRA r = 2's trainable state
# (SRLoRA's records and sketches: ~70 MiB on SmolLM2), r = 64 four times that.
LADDER = (16, 64)


# SRLoRA's options confirmed on 3 seeds, chosen from the seed-1 screen of OPTIONS: the whitened
# gradient alone landed below LoRA's curve on both texts (docs/RESULTS.md, the options table).
# Each is then tuned as a method of its own ("srlora-<tag>": its own sweep, its own best point).
CONFIRMED_OPTIONS = ("w32",)
# Every method of the screen, compared at its best r = 2 point on 3 seeds, paired by seed.
CONFIRMED = (
    "full",
    "galore",
    "lora",
    "pissa",
    "srlora",
    *(f"srlora-{tag}" for tag in CONFIRMED_OPTIONS),
    "corda",
    "mica",
    "lora_ga",
)
# How many points a sweep may grow by beyond an end where its best point lies.
EXTENSIONS = 2


def screen_jobs(seed: int = 1, results: list[dict[str, Any]] | None = None) -> list[AbsorbJob]:
    """Seed 1, r = 2: first the points that ``results`` (the committed runs) add to the sweeps
    whose best lies at an end (:func:`sweep`): each may grow its sweep again, so they are the
    longest chain to a method's best; then every method's sweep, the points a user tries first
    ahead of the others, and LoRA's ladder (r = 16, 64 at 5e-4) after the first round."""
    order: list[tuple[str, int, float]] = []
    for method in CONFIRMED:
        base = SWEEPS.get(method, SWEEPS["adapter"])
        order += [(method, 2, lr) for lr in sweep(results or [], method) if lr not in base]
    for i in (1, 0, 2):  # middle points first: a sweep's edges only matter if the middle is not best
        order += [("full", 2, SWEEPS["full"][i]), ("galore", 2, SWEEPS["galore"][i])]
        order += [(m, 2, SWEEPS["adapter"][i]) for m in ("lora", "srlora")]
        if i == 1:
            order += [("lora", r, ADAPTER_LR) for r in LADDER]
        order += [(m, 2, SWEEPS["adapter"][i]) for m in ("corda", "mica", "lora_ga", "pissa")]
        order += [(f"srlora-{tag}", 2, SWEEPS["adapter"][i]) for tag in CONFIRMED_OPTIONS]
    return [AbsorbJob(*config(method, r, lr, seed)) for method, r, lr in order]


def seed1_runs(results: list[dict[str, Any]], method: str, r: int, lrs: list[float]) -> dict[float, dict[str, Any]]:
    """``{lr: run}`` of ``method``'s seed-1 runs at rank ``r`` among ``results`` at ``lrs``."""
    names = {config(method, r, lr, 1)[0]: lr for lr in lrs}
    return {names[e["name"]]: e for e in results if e["name"] in names and e["config"]["seed"] == 1}


def _best(done: dict[float, dict[str, Any]]) -> float:
    """The learning rate whose run ends lowest on held-out chunks."""
    return min(done, key=lambda lr: done[lr]["evals"][-1]["held_chunks"])


def sweep(results: list[dict[str, Any]], method: str, r: int = 2) -> tuple[float, ...]:
    """``method``'s learning rates: its 3 points (:data:`SWEEPS`), and while every point has run
    (``results``) and the best (held-out chunks) is the highest or the lowest, one more beyond
    it at the sweep's own ratio (the upper pair's above, the lower pair's below), at most
    :data:`EXTENSIONS` of them."""
    points = list(SWEEPS.get(method, SWEEPS["adapter"]))
    up, down = points[1] / points[0], points[2] / points[1]
    for _ in range(EXTENSIONS):
        done = seed1_runs(results, method, r, points)
        if len(done) < len(points):
            break
        best = _best(done)
        if best == points[-1]:
            points.append(float(f"{points[-1] * up:.3g}"))
        elif best == points[0]:
            points.insert(0, float(f"{points[0] / down:.3g}"))
        else:
            break
    return tuple(points)


class Option(NamedTuple):
    """One of SRLoRA's options: the SRLoRAConfig fields it sets, what it does (the docs' words),
    and the run's own fields it sets (``AbsorbConfig.start``: the PEFT start of the slots)."""

    srlora: dict[str, Any]
    what: str
    run: dict[str, Any] = {}  # noqa: RUF012 (never mutated)


# SRLoRA's options aimed at forgetting, each on the chosen entry (BEST) at the adapters' learning
# rate, seed 1, by the tag in the run name.
OPTIONS: dict[str, Option] = {
    "x32": Option({"subspace_exclude": 32}, "W0's top 32 directions left alone"),
    "lora-start": Option({"first_pairs": "lora"}, "LoRA's first pairs (PEFT's start, W untouched)"),
    "x128": Option({"subspace_exclude": 128}, "W0's top 128 directions left alone"),
    # CorDA's aim at every switch: the gradient whitened by CorDA's general text's top 32 input
    # directions (its covariance from the same Amazon review snippets)
    "w32": Option({"subspace_whiten": 32}, "gradient whitened by general text's top 32 input directions"),
    # first pairs from PEFT's own knowledge-keeping starts: the gradient's SVD at step 0, CorDA's
    "lora-ga-start": Option(
        {"first_pairs": "lora"}, "LoRA-GA's first pairs (the gradient at step 0)", {"start": "lora_ga"}
    ),
    "corda-start": Option({"first_pairs": "lora"}, "CorDA's first pairs (knowledge-preserved)", {"start": "corda"}),
    # not aimed at forgetting: the same run without the records of fused and entered pairs (the
    # larger part of SRLoRA's own memory), exported against the base's weights
    "no-records": Option({"fused_records": False}, "no record of fused pairs (the same run, less memory)"),
}


# Options that change what the run keeps, not how it trains (their point is the chosen entry's).
SAME_TRAINING = {"no-records"}


def option_jobs(seed: int = 1) -> list[AbsorbJob]:
    """Each of :data:`OPTIONS` on the chosen entry, seed ``seed``, r = 2, lr 5e-4."""
    return [AbsorbJob(*config(f"srlora-{tag}", 2, ADAPTER_LR, seed)) for tag in OPTIONS]


# The rank users pick: each method at its best r = 2 learning rate and at the sweep point below
# it (8x the rank moves the weights further per step at the same rate; the one above where the
# best is the lowest). Full fine-tuning has no rank: its screen runs stand. SRLoRA's chosen entry
# and each confirmed option (each from its own best point) keep no records (the same training; at
# r = 16 they would hold ~2 x 160 pairs a layer).
RANK = 16
RANKED = (
    "lora",
    "pissa",
    "srlora",
    *(f"srlora-{tag}" for tag in CONFIRMED_OPTIONS),
    "galore",
    "corda",
    "mica",
    "lora_ga",
)


def best_lr(results: list[dict[str, Any]], method: str, r: int = 2) -> float | None:
    """The learning rate of ``method``'s best seed-1 run at rank ``r`` (held-out chunks) among
    ``results`` (the committed ones, :func:`~srlora.experiments.studies.absorption.load_absorb`),
    once its whole sweep (:func:`sweep`, grown past an end where its best lay) is there; ``None``
    before."""
    state = sweep_state(results, method, r)
    return None if state.missing else state.best


class SweepState(NamedTuple):
    """Where ``method``'s seed-1 sweep at rank ``r`` stands among the committed runs."""

    points: tuple[float, ...]  # its learning rates (:func:`sweep`: grown past an end where its best lay)
    missing: tuple[float, ...]  # those not run yet
    best: float | None  # the best point among those run (held-out chunks); None: none ran
    at_edge: bool  # complete, and its best is still an end after the EXTENSIONS growths


def sweep_state(results: list[dict[str, Any]], method: str, r: int = 2) -> SweepState:
    """:class:`SweepState` of ``method`` at rank ``r`` among ``results``."""
    points = sweep(results, method, r)
    done = seed1_runs(results, method, r, list(points))
    missing = tuple(lr for lr in points if lr not in done)
    best = _best(done) if done else None
    return SweepState(points, missing, best, not missing and best in (points[0], points[-1]))


def swept(results: list[dict[str, Any]], methods: tuple[str, ...]) -> list[tuple[str, float]]:
    """``(method, best r = 2 learning rate)`` for each of ``methods`` whose sweep is complete
    among ``results`` (:func:`best_lr`); the others are named on stderr."""
    import sys

    out = []
    for method in methods:
        best = best_lr(results, method)
        if best is None:
            print(f"{method}: its r = 2 sweep is not complete yet (--part alternatives-screen)", file=sys.stderr)
        else:
            out.append((method, best))
    return out


def rank_jobs(root: Path, seed: int = 1) -> list[AbsorbJob]:
    """Seed ``seed`` at r = :data:`RANK`: each of :data:`RANKED` whose r = 2 sweep is complete."""
    jobs = []
    results = load_absorb(root)
    for method, best in swept(results, RANKED):
        points = sweep(results, method)
        i = points.index(best)
        for lr in (best, points[i - 1 if i > 0 else i + 1]):
            name, cfg = config(method, RANK, lr, seed)
            if cfg.method == "srlora":  # without records
                cfg = dataclasses.replace(cfg, srlora={**cfg.srlora, "fused_records": False})
                name = name.replace(f"-lr{lr:g}", f"-no-records-lr{lr:g}")
            jobs.append(AbsorbJob(name, cfg))
    return jobs


def confirm_jobs(root: Path, seeds: list[int]) -> list[AbsorbJob]:
    """SRLoRA's :data:`CONFIRMED_OPTIONS` at the adapters' old learning rate (their screen's), then
    each of :data:`CONFIRMED` (the options among them) at its best r = 2 learning rate
    (:func:`best_lr`, once its sweep is complete), on every seed of ``seeds``; seed 1's runs are
    the screen's. Each run once, where a best point is the old rate. SRLoRA's settings go first:
    every other method's runs then complete a row of the paired tables as they land."""
    jobs = [AbsorbJob(*config(f"srlora-{tag}", 2, ADAPTER_LR, seed)) for tag in CONFIRMED_OPTIONS for seed in seeds]
    best = sorted(swept(load_absorb(root), CONFIRMED), key=lambda m_lr: not m_lr[0].startswith("srlora"))
    jobs += [AbsorbJob(*config(method, 2, lr, seed)) for method, lr in best for seed in seeds]
    return list({(j.name, j.config.seed): j for j in jobs}.values())


PARTS = {
    "alternatives-screen": lambda root, seeds, ns: run_jobs(screen_jobs(seeds[0], load_absorb(root)), ns.jobs, root),
    "alternatives-confirm": lambda root, seeds, ns: run_jobs(confirm_jobs(root, seeds), ns.jobs, root),
    "alternatives-options": lambda root, seeds, ns: run_jobs(option_jobs(seeds[0]), ns.jobs, root),
    "alternatives-r16": lambda root, seeds, ns: run_jobs(rank_jobs(root, seeds[0]), ns.jobs, root),
}


# The methods in words (a table's rows, the plot's legend).
LABELS = {
    "full": "full fine-tuning",
    "galore": "GaLore",
    "lora": "LoRA",
    "pissa": "PiSSA",
    "srlora": "SRLoRA (gradient subspace, scale 0.25)",
    "corda": "CorDA (knowledge-preserved)",
    "mica": "MiCA",
    "lora_ga": "LoRA-GA",
}


def option_of(entry: dict[str, Any]) -> str | None:
    """The tag of the SRLoRA option (:data:`OPTIONS`) that ``entry`` ran with, by its name."""
    return next((tag for tag in OPTIONS if f"-{tag}-" in entry["name"]), None)


def label(method: str) -> str:
    """A method of :data:`CONFIRMED` in words (``srlora-<tag>``: SRLoRA with that option)."""
    tag = method.removeprefix("srlora-")
    return LABELS[method] if method in LABELS else f"SRLoRA, {OPTIONS[tag].what}"
