"""Against the alternatives a user would pick where LoRA's rank binds: full fine-tuning, GaLore,
PEFT's knowledge-keeping initialisations (CorDA in its knowledge-preserved mode, MiCA, LoRA-GA)
and LoRA's own ladder, on the absorption task (:mod:`srlora.experiments.absorb`), with the
trainable-state memory of every run.

    srlora study --part alternatives-screen   # seed 1: every method's learning-rate sweep
    srlora study --part alternatives-options  # seed 1: SRLoRA's options on its chosen entry
    srlora study --part alternatives-confirm  # each method at its best point on 3 seeds, paired
    srlora study --part alternatives-r16      # the rank users pick: r = 16 around each best point

The package: :mod:`.jobs` (what runs, and how each method is tuned), :mod:`.frontier` (learning
against forgetting: LoRA's curve, each method at a forgetting budget, the plot), :mod:`.section`
(the doc's section).
"""

from __future__ import annotations

from ...rundata import Section
from .frontier import at_budget, curve_at, plot_frontier
from .jobs import (
    CONFIRMED,
    OPTIONS,
    PARTS,
    RANK,
    RANKED,
    SWEEPS,
    best_lr,
    config,
    confirm_jobs,
    option_jobs,
    rank_jobs,
    screen_jobs,
    sweep,
)
from .section import TITLE, section

SECTIONS: dict[str, Section] = {"alternatives": lambda ctx: section(ctx.root)}


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """This study's run-table rows built from ``srlora train`` runs: none."""
    return {}


__all__ = [
    "CONFIRMED",
    "OPTIONS",
    "PARTS",
    "RANK",
    "RANKED",
    "SWEEPS",
    "TITLE",
    "at_budget",
    "best_lr",
    "config",
    "confirm_jobs",
    "curve_at",
    "option_jobs",
    "plot_frontier",
    "rank_jobs",
    "row_sources",
    "screen_jobs",
    "section",
    "sweep",
]
