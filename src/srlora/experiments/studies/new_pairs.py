"""What enters at a switch (issue 24): new pairs that point where the loss needs them and learn
as fast as the pairs they replace, measured where LoRA's rank binds (corpus absorption).

    srlora study --part new-pairs-screen   # seed 1: the diagnosis and every option (~25 min a run)
    srlora study --part new-pairs          # the best option on 3 seeds, paired with PiSSA and LoRA

SRLoRA r = 2 with both pairs recycled every 40 steps (the known-rank rule; 9 switches) is the
baseline; each option changes one thing about the pairs that enter (docs/METHOD.md section 7):

* where they point: W0's next singular directions (the paper) or the top singular vectors of
  the gradient summed over the window before the switch (``direction_policy="gradient_subspace"``);
* how large they enter: their own singular value (the paper), or ``entry_scale`` times the
  layer's first pairs' (which does not shrink with the spectrum);
* what the optimizer keeps of the recycled slots (``optimizer_reset``).

The baseline and the main options run with ``--diagnose``
(:mod:`srlora.experiments.new_pairs_diagnosis`): the loss before and after each switch, and
the alignment, size and speed of the pairs that enter and leave.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..absorb import AbsorbConfig
from ..jobs import run_jobs
from .absorption import STEPS, AbsorbJob

INTERVAL = 40
# The variant confirmed on 3 seeds (chosen from the screen: docs/RESULTS.md, section "What enters at a switch").
BEST = "srlora-r2-T40-g1-gsub"


def srlora(gamma: float = 1.0, **entry: object) -> AbsorbConfig:
    """SRLoRA r = 2, a switch every 40 steps, as many directions as the 9 switches bring in."""
    r_prime = round(2 * gamma)
    r_target = 2 + r_prime * ((STEPS - 1) // INTERVAL)
    return AbsorbConfig("srlora", 2, r_target, switch_interval=INTERVAL, gamma=gamma, steps=STEPS, **entry)  # type: ignore[arg-type]


# name: (config, diagnosed)
VARIANTS: dict[str, tuple[AbsorbConfig, bool]] = {
    "srlora-r2-T40-g1": (srlora(), True),  # the baseline of issue 20
    "srlora-r2-T40-g1-w0scale1": (srlora(entry_scale=1.0), True),  # (b): W0's directions, the first pairs' scale
    "srlora-r2-T40-g1-gsub": (srlora(direction_policy="gradient_subspace"), True),  # (a) + (b)
    "srlora-r2-T40-g1-gsub-s0.25": (srlora(direction_policy="gradient_subspace", entry_scale=0.25), False),
    "srlora-r2-T40-g0.5-gsub": (srlora(0.5, direction_policy="gradient_subspace"), False),
    "srlora-r2-T40-g1-reset-none": (srlora(optimizer_reset="none"), False),  # (c): the moments kept
    "srlora-r2-T40": (srlora(0.5), False),  # the paper's gamma
}


def screen_jobs(seed: int = 1) -> list[AbsorbJob]:
    """Every variant on one seed (PiSSA r = 2 and LoRA r = 2 / 8 / 32 are the absorption study's)."""
    return [
        AbsorbJob(name, dataclasses.replace(cfg, seed=seed), diagnose) for name, (cfg, diagnose) in VARIANTS.items()
    ]


def confirm_jobs(seeds: list[int], best: str) -> list[AbsorbJob]:
    """``best`` and the baselines it is compared with, paired by seed: PiSSA r = 2, LoRA r = 2
    and LoRA r = 8 on every seed."""
    jobs: list[AbsorbJob] = []
    cfg, diagnose = VARIANTS[best]
    for seed in seeds:
        jobs.append(AbsorbJob(best, dataclasses.replace(cfg, seed=seed), diagnose and seed == seeds[0]))
        for method, r in (("pissa", 2), ("lora", 2), ("lora", 8)):
            jobs.append(AbsorbJob(f"{method}-r{r}", AbsorbConfig(method, r, steps=STEPS, seed=seed)))
    return jobs


def out_of(name: str, seed: int) -> Path:
    return Path("runs/absorb") / name / f"seed{seed}"


# ---------------------------------------------------------------------------- the known-rank map
KNOWN_RANK_FILE = "runs/known-rank/new_pairs.jsonl"
KNOWN_RANK_ENTRIES: dict[str, dict[str, object]] = {
    "paper": {},
    "w0 scale 1": {"entry_scale": 1.0},
    "gradient subspace": {"direction_policy": "gradient_subspace"},
    "gradient subspace, scale 0.25": {"direction_policy": "gradient_subspace", "entry_scale": 0.25},
}


def known_rank_specs(seeds: list[int]) -> list[tuple[str, object]]:
    """SRLoRA r = 2, gamma 1, T = 30 and 60, on one layer learning a rank-16 and a rank-64
    target in 2,000 steps, with each entry: how much of what is left does a fused pair remove,
    against the greedy bound (each pair the largest remaining component)?"""
    from ..known_rank import KnownRankRun

    specs = []
    for K in (16, 64):
        for T in (30, 60):
            for entry in KNOWN_RANK_ENTRIES.values():
                for seed in seeds:
                    spec = KnownRankRun("srlora", 2, K, steps=2000, interval=T, gamma=1.0, seed=seed, **entry)  # type: ignore[arg-type]
                    specs.append((f"K{K}-N2000", spec))
    return specs


def run_known_rank(root: Path, seeds: list[int]) -> None:
    from ..known_rank import run_specs

    run_specs(root / KNOWN_RANK_FILE, known_rank_specs(seeds))  # type: ignore[arg-type]


PARTS = {
    "new-pairs-screen": lambda root, seeds, ns: run_jobs(screen_jobs(seeds[0]), ns.jobs, root),
    "new-pairs-confirm": lambda root, seeds, ns: run_jobs(confirm_jobs(seeds, BEST), ns.jobs, root),
    "new-pairs-known-rank": lambda root, seeds, ns: run_known_rank(root, seeds),
}


# ---------------------------------------------------------------------------- the doc's section
TITLE = "## What enters at a switch: new pairs where the rank binds"


def render(root: Path, old: dict[str, list[str]]) -> list[str]:
    """The section (kept from the current doc until its runs are here)."""
    from ..rundata import section_key

    return old.get(section_key(TITLE), [])
