"""The results study: runs what is missing, then writes docs/RESULTS.md.

    srlora study                      # every study but the long ones (resumable; 1 h 47 min on 2 cores)
    srlora study --part short         # a study by its name: all of its parts
    srlora study --part main          # one part (each study module lists its own, PARTS)
    srlora study --part render        # only rewrite docs/RESULTS.md from what is here

Run from the repository root (``--root``). The studies, their jobs and the sections they
write are :mod:`srlora.experiments.studies`, one module each; training runs go ``--jobs`` at a
time with one thread each (:mod:`srlora.experiments.jobs`); :mod:`srlora.experiments.report`
puts the sections together. The performance benchmarks run first, alone, so that no training
run disturbs them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .studies import STUDIES

# What --part all runs, in order: everything but the parts that take hours each.
ALL = ("perf", "main", "ablations", "long", "rank", "known-rank")
# The seeds every study reports on: the document shows their runs whatever seeds a part ran.
DOC_SEEDS = (1, 2, 3)


def parts() -> dict[str, tuple[str, object]]:
    """Every part of every study: part name -> (study name, runner)."""
    return {part: (name, fn) for name, module in STUDIES.items() for part, fn in module.PARTS.items()}


def part_names() -> list[str]:
    return ["all", *STUDIES, *parts(), "render"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--part",
        choices=part_names(),
        default="all",
        help="What to run before rendering: all (perf, main, ablations, long, rank, known-rank), a study by its "
        "name (all its parts: " + ", ".join(STUDIES) + "), one part (perf; main, ablations: 150 steps; long: 600 "
        "steps, paper regime; rank-pilot, rank: 600 steps, rank-bound regime; known-rank: the known-rank map; "
        "absorb-pilot, absorb: SmolLM2 corpus absorption, ~5 h; new-pairs-screen, new-pairs-confirm, "
        "new-pairs-known-rank, new-pairs-long: what enters at a switch), or render (nothing).",
    )
    for module in STUDIES.values():  # a study's own options
        if hasattr(module, "add_arguments"):
            module.add_arguments(ap)
    ap.add_argument(
        "--seeds",
        default=",".join(map(str, DOC_SEEDS)),
        help="Comma-separated seeds the parts run. The document always shows the runs of these and of "
        f"{', '.join(map(str, DOC_SEEDS))} (a part run on one seed keeps the others' rows).",
    )
    ap.add_argument("--jobs", type=int, default=2, help="Training runs at a time (one thread each).")
    ap.add_argument("--root", default=".", help="The repository root (runs/study and docs/ live there).")


def run_parts(ns: argparse.Namespace) -> tuple[list[int], Path]:
    """Run the parts ``--part`` names (what is missing of them); returns the seeds the document
    shows (``--seeds`` and :data:`DOC_SEEDS`) and the root."""
    seeds = [int(s) for s in ns.seeds.split(",") if s.strip()]
    root = Path(ns.root).resolve()
    known = parts()
    if ns.part == "all":
        chosen = list(ALL)
    elif ns.part in STUDIES:
        chosen = list(STUDIES[ns.part].PARTS)
    elif ns.part in known:
        chosen = [ns.part]
    else:
        chosen = []
    try:
        for part in chosen:
            known[part][1](root, seeds, ns)  # type: ignore[operator]
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; run the study again to go on", file=sys.stderr)
    return sorted(set(seeds) | set(DOC_SEEDS)), root
