"""Where each row of docs/RESULTS.md's run tables takes its runs: the row label -> the
(cell, method) of the ``srlora train`` runs behind it, the keys of docs/results/runs.json's
entries. The report builds its tables from these maps and a test checks the committed data
against them."""

from __future__ import annotations

from .study import ABLATIONS, TASKS

VARIANTS = [("lora", "LoRA"), ("pissa", "PiSSA"), ("srlora", "SRLoRA")]


ABLATIONS_TITLE = "## Ablations on mr (SRLoRA, against its default)"


def main_variants(task: str) -> dict[str, tuple[str, str]]:
    """A main-table row label -> the (cell, method) of its runs."""
    return {**{label: (task, method) for method, label in VARIANTS}, "SRLoRA adaptive": (f"{task}-adaptive", "srlora")}


def ablation_variants() -> dict[str, tuple[str, str]]:
    """An ablation-table row label -> the (cell, method) of its runs."""
    rows = {
        "LoRA (reference)": ("mr", "lora"),
        "SRLoRA default (seed reset, gamma 0.5, r_target 32, recycled)": ("mr", "srlora"),
    }
    return rows | {desc: (cell, "srlora") for cell, (desc, _) in ABLATIONS.items()}


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """Where every row of docs/RESULTS.md's run tables (those with a ``seeds`` column, built
    from ``srlora train`` runs) takes its runs: (section title, subsection title or None) ->
    {row label: (cell, method)}, the keys of ``docs/results/runs.json``'s entries."""
    from .report_long import PAPER_TITLE, PAPER_VARIANTS, RANK_TITLE, RANK_VARIANTS
    from .study import RANK_CANDIDATES

    out: dict[tuple[str, str | None], dict[str, tuple[str, str]]] = {}
    for task in TASKS:
        out["Main table", task] = main_variants(task)
    out[ABLATIONS_TITLE.removeprefix("## "), None] = ablation_variants()
    for task in ("mr", "mr-reg"):
        out[PAPER_TITLE.removeprefix("## "), task] = {
            label: (cell.format(task=task), method) for label, (cell, method) in PAPER_VARIANTS.items()
        }
    for task, (prefix, _) in RANK_CANDIDATES.items():
        out[RANK_TITLE.format(task=task).removeprefix("## "), None] = {
            label: (cell.format(task=prefix), method) for label, (cell, method) in RANK_VARIANTS.items()
        }
    return out
