"""The studies behind docs/RESULTS.md, one module each, in the doc's order. A study is one
interface: ``PARTS`` (what it runs: ``srlora study --part NAME``), ``SECTIONS`` (the places of
the doc it writes, each a function of a :class:`~srlora.experiments.rundata.RenderContext`)
and ``row_sources()`` (its run-table rows' runs, which tests/test_results_data.py checks);
:data:`DOC_ORDER` puts the sections in order and the report loops over it.

* :mod:`.short` -- the 150-step comparison on four tasks, its ablations and switch dynamics;
* :mod:`.cost` -- SRLoRA against plain PEFT LoRA: step, switch, whole run, QLoRA, GPU;
* :mod:`.paper_regime` -- 600 steps in the paper's regime (r = 8), paired by seed;
* :mod:`.rank_bound` -- 600 steps where fewer ranks hurt (r = 2 against 8 and 32);
* :mod:`.known_rank_map` -- where more directions pay: a target of known rank;
* :mod:`.absorption` -- SmolLM2-135M absorbing a corpus, where LoRA's rank binds;
* :mod:`.new_pairs` -- what enters at a switch: direction, scale, optimizer state;
* :mod:`.alternatives` -- against full fine-tuning, GaLore and PEFT's initialisations.

``srlora study --part S`` with a study's name runs all of its parts.
"""

from __future__ import annotations

from types import ModuleType

from . import absorption, alternatives, cost, known_rank_map, new_pairs, paper_regime, rank_bound, short

STUDIES: dict[str, ModuleType] = {
    "short": short,
    "cost": cost,
    "paper-regime": paper_regime,
    "rank-bound": rank_bound,
    "known-rank-map": known_rank_map,
    "absorption": absorption,
    "new-pairs": new_pairs,
    "alternatives": alternatives,
}
# The doc, in order: (study, section). The cost study writes two places (the step benchmark
# beside the 150-step study; whole runs, QLoRA and GPUs at the end), the short study two (its
# results; its commands after the cost's), the paper regime two (around the rank-bound regime's).
DOC_ORDER: tuple[tuple[str, str], ...] = (
    ("short", "results"),
    ("cost", "perf"),
    ("short", "commands"),
    ("paper-regime", "paper"),
    ("rank-bound", "rank"),
    ("paper-regime", "decision"),
    ("known-rank-map", "map"),
    ("absorption", "absorb"),
    ("new-pairs", "new-pairs"),
    ("alternatives", "alternatives"),
    ("cost", "llm-init"),
    ("cost", "qlora"),
    ("cost", "switch-cost"),
    ("cost", "gpu"),
)
