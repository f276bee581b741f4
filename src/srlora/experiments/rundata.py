"""Reading a study's outputs: finished runs of a cell, switch dynamics from their
``history.json``, and the sections of the current docs/RESULTS.md."""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def load_runs(root: Path, cell: str, method: str) -> list[dict[str, Any]]:
    """The finished runs of one cell and method (``_dir`` is each run's folder)."""
    rows = []
    for path in sorted((root / "runs/study" / cell / method).glob("seed*/results.json")):
        r = json.loads(path.read_text())
        if not r.get("interrupted") and r["final"] is not None:
            r["_dir"] = path.parent
            rows.append(r)
    return rows


def switch_dynamics(history: dict[str, Any]) -> dict[str, float]:
    """Per-layer means from ``history.json``: switches, directions used, how many of the
    initial top-r directions are still trainable at the end, and the share of evictions
    (from a layer's second switch on) that hit a direction the previous switch brought in."""
    r = int(history["r"])
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for ev in history["events"]:
        by_layer.setdefault(ev["layer"], []).append(ev)
    layers = list(history["slot_directions"])
    evicted = re_evicted = 0
    for events in by_layer.values():
        for prev, ev in itertools.pairwise(events):
            evicted += len(ev["evicted"])
            re_evicted += len(set(ev["evicted"]) & set(prev["directions"]))
    return {
        "switches": statistics.fmean(len(by_layer.get(name, [])) for name in layers),
        "used": statistics.fmean(history["directions_used"][name] for name in layers),
        "init_kept": statistics.fmean(sum(j < r for j in history["slot_directions"][name]) for name in layers),
        "re_evicted": re_evicted / evicted if evicted else math.nan,
    }


def dynamics_row(label: str, runs: list[dict[str, Any]]) -> str | None:
    """One row of the switch-dynamics table: means over the runs' histories."""
    paths = [r["_dir"] / "history.json" for r in runs]
    hist = [json.loads(path.read_text()) for path in paths if path.is_file()]
    if not hist:
        return None
    dyn = [switch_dynamics(h) for h in hist]
    cells = [label, str(len(hist))]
    cells += [f"{statistics.fmean(d[k] for d in dyn):.{digits}f}" for k, digits in (("switches", 1), ("used", 1))]
    cells += [f"{statistics.fmean(d['init_kept'] for d in dyn):.1f} of {hist[0]['r']}"]
    cells += [f"{statistics.fmean(d['re_evicted'] for d in dyn):.0%}"]
    return "| " + " | ".join(cells) + " |"


def previous_sections(root: Path) -> dict[str, list[str]]:
    """The ``## `` sections of the current docs/RESULTS.md, by the first words of their title
    (:func:`section_key`; sections sharing them are kept together) and by their whole title
    (one section each: "600 steps, rank-bound regime: mr-reg" apart from its fashion-mnist twin)."""
    path = root / "docs/RESULTS.md"
    sections: dict[str, list[str]] = {}
    current: list[list[str]] = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.startswith("## "):
            current = [sections.setdefault(section_key(line), [])]
            title = line.removeprefix("## ").strip()
            if title != section_key(line):
                current.append(sections.setdefault(title, []))
        for lines in current:
            lines.append(line)
    return sections


def section_key(title: str) -> str:
    """A section's title up to its first '(' or ':' ("Performance (SRLoRA against ...)" and
    "Performance" are the same section)."""
    return re.split(r"[(:]", title.removeprefix("## "), maxsplit=1)[0].strip()


@dataclass
class RenderContext:
    """What every study's sections read when docs/RESULTS.md is written (a study's
    ``SECTIONS`` are functions of it).

    Attributes:
        root: the repository root (``runs/`` and ``docs/`` live there).
        seeds: the seeds the document shows.
        old: the current doc's sections (:func:`previous_sections`): a section whose runs are
            not on this machine keeps its text.
        train_runs: the finished ``srlora train`` runs the sections used, in the doc's order
            (their figures go to ``docs/results/runs.json``).
    """

    root: Path
    seeds: list[int]
    old: dict[str, list[str]]
    train_runs: list[Any] = field(default_factory=list)

    def keep(self, fresh: list[str], has_runs: bool) -> list[str]:
        """``fresh``, or the current doc's text of that section where its runs are not here."""
        key = section_key(fresh[0]) if fresh and fresh[0].startswith("## ") else None
        if has_runs or key not in self.old:
            return fresh
        return [*self.old[key], ""] if self.old[key][-1] else self.old[key]

    def kept(self, title: str, fresh: list[str], whole_only: bool = False, cut: str | None = None) -> list[str]:
        """``fresh``, or where it is empty the current doc's section of that whole title (with
        ``whole_only`` False, else of its first words), up to the line ``cut``."""
        whole = title.removeprefix("## ")
        kept = self.old.get(whole, [] if whole_only else self.old.get(section_key(title), []))
        if cut is not None and cut in kept:
            kept = kept[: kept.index(cut)]
        return fresh or kept


Section = Callable[[RenderContext], list[str]]
