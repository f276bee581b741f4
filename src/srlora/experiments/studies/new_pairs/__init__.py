"""What enters at a switch: new pairs that point where the loss needs them and learn
as fast as the pairs they replace, measured where LoRA's rank binds (corpus absorption).

    srlora study --part new-pairs-screen      # seed 1: the diagnosis and every option (~25 min a run)
    srlora study --part new-pairs-confirm     # the chosen option on 3 seeds, paired with PiSSA and LoRA
    srlora study --part new-pairs-known-rank  # each entry on the known-rank map (48 runs, minutes each)
    srlora study --part new-pairs-long        # the chosen entry in the paper's regime (MiniLM, r = 8)

SRLoRA r = 2 with both pairs recycled every 40 steps (the known-rank rule; 9 switches) is the
baseline; each option changes one thing about the pairs that enter (docs/METHOD.md section 7):

* where they point: W0's next singular directions (the paper) or the top singular vectors of
  the gradient summed over the window before the switch (``direction_policy="gradient_subspace"``);
* how large they enter: their own singular value (the paper), or ``entry_scale`` times the
  layer's first pairs' (which does not shrink with the spectrum);
* what the optimizer keeps of the recycled slots (``optimizer_reset``).

The baseline and the main options run with ``--diagnose``
(:mod:`srlora.experiments.diagnosis`, the runner's): the loss before and after each switch, and
the alignment, size and speed of the pairs that enter and leave.

The package: :mod:`.jobs` (what runs), :mod:`.section` (the doc's section).
"""

from __future__ import annotations

from ...jobs import is_finished
from ...rundata import RenderContext, Section
from .jobs import BEST, PARTS, VARIANTS, confirm_jobs, paper_regime_jobs, screen_jobs
from .section import TITLE, render, row_sources


def _new_pairs(ctx: RenderContext) -> list[str]:
    md = render(ctx.root, ctx.old, ctx.seeds)
    ctx.train_runs += [j for j in paper_regime_jobs(ctx.seeds) if is_finished(j, ctx.root)]
    return md


SECTIONS: dict[str, Section] = {"new-pairs": _new_pairs}

__all__ = [
    "BEST",
    "PARTS",
    "TITLE",
    "VARIANTS",
    "confirm_jobs",
    "paper_regime_jobs",
    "render",
    "row_sources",
    "screen_jobs",
]
