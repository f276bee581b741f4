"""docs/RESULTS.md regenerates from committed data alone: every row of its run tables has its
runs in docs/results/runs.json (``srlora train`` runs) or docs/results/absorb.json (absorption
runs), as many as the row's ``seeds`` column says."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from srlora.experiments.report import row_sources

ROOT = Path(__file__).resolve().parents[1]


def seed_rows(markdown: str) -> list[tuple[str, str | None, str, int]]:
    """(section, subsection, row label, seeds) of every table whose second column is ``seeds``."""
    rows, h2, h3, seeds_table = [], "", None, False
    for line in markdown.splitlines():
        if line.startswith("## "):
            h2, h3 = line[3:].strip(), None
        elif line.startswith("### "):
            h3 = line[4:].strip()
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) > 1 and cells[1] == "seeds":
                seeds_table = cells[0] in ("method", "variant")
            elif seeds_table and not set(cells[0]) <= {"-"}:
                rows.append((h2, h3, cells[0], int(cells[1])))
        else:
            seeds_table = False
    return rows


def test_every_run_table_row_has_its_runs_in_the_committed_data():
    doc = (ROOT / "docs/RESULTS.md").read_text()
    runs = Counter((e["cell"], e["method"]) for e in json.loads((ROOT / "docs/results/runs.json").read_text()))
    absorb = Counter(e["name"] for e in json.loads((ROOT / "docs/results/absorb.json").read_text()))
    sources = row_sources()
    checked, missing = 0, []
    for h2, h3, label, seeds in seed_rows(doc):
        if h2.startswith(("The real task where LoRA's rank is short", "Against the alternatives")):
            have = absorb[label]
        elif (h2, h3) in sources:
            have = runs[sources[h2, h3][label]]
        else:  # the GPU study: its own data under docs/results/gpu/
            assert h2.startswith("On a GPU"), f"a run table without known sources: {h2} / {h3}"
            continue
        checked += 1
        if have != seeds:
            missing.append(f"{h2} / {h3} / {label}: {seeds} seeds in the doc, {have} runs in the data")
    assert checked >= 40, checked  # main, ablations, 600-step and absorption tables were all seen
    assert not missing, "\n".join(missing)


def test_seed_rows_reads_a_table():
    md = "## A: x\n\n### t\n\n| variant | seeds | acc |\n|---|---|---|\n| LoRA | 3 | 0.5 |\n\ntext | 2 |\n"
    assert seed_rows(md) == [("A: x", "t", "LoRA", 3)]
