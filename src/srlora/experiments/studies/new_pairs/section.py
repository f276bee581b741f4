"""The new-pairs study's section of docs/RESULTS.md, from the committed data alone
(``docs/results/absorb.json``, :data:`KNOWN_RANK_DOC`, ``docs/results/runs.json``)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from ...jobs import is_finished
from ...stats import fmt, fmt_paired, mean_std, paired
from .jobs import (
    BEST,
    INTERVAL,
    KNOWN_RANK_ENTRIES,
    KNOWN_RANK_FILE,
    PAPER_ENTRIES,
    PAPER_ROWS,
    PAPER_TASKS,
    PAPER_TITLE,
    VARIANTS,
    paper_regime_jobs,
)

# ---------------------------------------------------------------------------- the doc's section
TITLE = "## What enters at a switch: new pairs where the rank binds"
LADDER = ("lora-r2", "lora-r8", "lora-r32")
BASELINES = ("pissa-r2", *LADDER)
KNOWN_RANK_DOC = "docs/results/new_pairs_known_rank.jsonl"


def _final(e: dict[str, Any], key: str) -> float:
    return e[key] if key == "train_loss_tail" else e["evals"][-1][key]


def ladder_prose(ladder: list[tuple[float, float]], chunks: float) -> float:
    """The prose loss of the LoRA ladder (``[(held-out chunks, prose)]`` of r = 2, 8, 32)
    interpolated at a held-out-chunk loss (linear between the rungs, extended past the ends):
    the learning-forgetting frontier of Biderman et al. (2024)."""
    pts = sorted(ladder)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if chunks <= x1 or (x1, y1) == pts[-1]:
            return y0 + (y1 - y0) * (chunks - x0) / (x1 - x0)
    return pts[0][1]


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for e in rows:
        out.setdefault(e["name"], {})[e["config"]["seed"]] = e
    return out


def _diagnosis_table(by_name: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Per diagnosed run (seed 1): means over its switches of what the diagnosis records."""
    keys = [
        ("alignment_entering", "entering"),
        ("alignment_leaving", "leaving"),
        ("alignment_best_rank1", "best rank-1"),
        ("sigma_entering", "sigma in"),
        ("sigma_leaving", "sigma out"),
        ("speed_first_steps", "speed, first 5 steps"),
        ("speed_last_steps", "speed, last 5 steps"),
        ("learnt_share_of_update", "learnt / update"),
    ]
    md = [
        "| run (seed 1) | switches | max abs(loss after − before) | alignment: "
        + " | ".join(label for _, label in keys)
        + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    found = False
    for name, runs in by_name.items():
        rows = runs.get(1, {}).get("diagnosis")
        if not rows:
            continue
        found = True
        jump = max(abs(r["loss_after"] - r["loss_before"]) for r in rows)
        cells = [name, str(sum(r["switched_layers"] > 0 for r in rows)), f"{jump:.1e}"]
        for key, _ in keys:
            vals = [r[key] for r in rows if r[key] == r[key]]  # NaN where not measured (first switch)
            cells.append(f"{statistics.fmean(vals):.3g}" if vals else "n/a")
        md.append("| " + " | ".join(cells) + " |")
    return md if found else []


def _per_switch(by_name: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Switch by switch (seed 1): the learning rate, and for each diagnosed run the entering
    pairs' alignment with the gradient and what a pair learnt over its life, relative to the
    layer's whole update."""
    runs = {n: r[1]["diagnosis"] for n, r in by_name.items() if r.get(1, {}).get("diagnosis")}
    if not runs:
        return []
    names = list(runs)
    head = "| step | lr | " + " | ".join(f"{n}: alignment in / learnt share" for n in names) + " |"
    md = [head, "|---|---|" + "---|" * len(names)]
    first = runs[names[0]]
    for i, row in enumerate(first):
        cells = [str(row["step"]), f"{row['lr']:.1e}"]
        for n in names:
            d = runs[n][i] if i < len(runs[n]) else {}
            align, share = d.get("alignment_entering", math.nan), d.get("learnt_share_of_update", math.nan)
            cells.append(f"{align:.4f} / {share:.2f}".replace("nan", "–"))
        md.append("| " + " | ".join(cells) + " |")
    return md


def _around_switches(by_name: dict[str, dict[int, dict[str, Any]]], width: int = 5) -> list[str]:
    """The training loss in the ``width`` steps before and after each switch, against PiSSA's on the
    same batches (seed 1): what a switch costs the next steps."""
    pissa = by_name.get("pissa-r2", {}).get(1)
    if pissa is None or "losses" not in pissa:
        return []
    md = [
        f"| run (seed 1) | loss − PiSSA's, {width} steps before each switch | {width} steps after | change |",
        "|---|---|---|---|",
    ]
    for name, runs in by_name.items():
        e = runs.get(1)
        if not name.startswith("srlora") or e is None or "losses" not in e:
            continue
        T = e["config"]["switch_interval"] or INTERVAL
        steps = range(T, len(e["losses"]), T)
        # losses[i] is the loss of step i + 1, before its update; the switch after step t
        before = [e["losses"][t - k] - pissa["losses"][t - k] for t in steps for k in range(1, width + 1)]
        after = [
            e["losses"][t + k] - pissa["losses"][t + k] for t in steps for k in range(width) if t + k < len(e["losses"])
        ]
        b, a = statistics.fmean(before), statistics.fmean(after)
        md.append(f"| {name} | {b:+.3f} | {a:+.3f} | {a - b:+.3f} |")
    return md


def _seed1_ladder(by_name: dict[str, dict[int, dict[str, Any]]]) -> list[tuple[float, float]] | None:
    """``[(held-out chunks, prose)]`` of LoRA r = 2, 8, 32 on seed 1 (the only seed of r = 32)."""
    seed1 = {n: r[1] for n, r in by_name.items() if 1 in r}
    if not all(n in seed1 for n in LADDER):
        return None
    return [(_final(seed1[n], "held_chunks"), _final(seed1[n], "prose")) for n in LADDER]


def _against_ladder(e: dict[str, Any], ladder: list[tuple[float, float]]) -> tuple[float, float]:
    """A run's share of the LoRA r = 2 -> 32 gap closed on held-out chunks, and its prose loss
    above the ladder at the same held-out-chunk loss."""
    chunks = _final(e, "held_chunks")
    lo, hi = ladder[0][0], ladder[-1][0]
    return (lo - chunks) / (lo - hi), _final(e, "prose") - ladder_prose(ladder, chunks)


def _screen_table(by_name: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Seed 1 of every run: the three evaluation sets, the frontier's excess forgetting, the
    share of the LoRA r = 2 -> 32 gap closed, the update's effective rank."""
    ladder = _seed1_ladder(by_name)
    if ladder is None:
        return []
    seed1 = {n: r[1] for n, r in by_name.items() if 1 in r}
    md = [
        "| run (seed 1) | held-out chunks | held-out docs | prose | prose − LoRA ladder at the same chunks "
        "| LoRA r=2→32 gap closed | update's effective rank |",
        "|---|---|---|---|---|---|---|",
    ]
    order = [n for n in BASELINES if n in seed1] + [n for n in VARIANTS if n in seed1]
    for name in order:
        e = seed1[name]
        gap, excess = _against_ladder(e, ladder)
        cells = [name, f"{_final(e, 'held_chunks'):.3f}", f"{_final(e, 'held_docs'):.3f}", f"{_final(e, 'prose'):.3f}"]
        cells += [f"{excess:+.3f}", f"{gap:.0%}", f"{e['effective_rank_mean']:.1f}"]
        md.append("| " + " | ".join(cells) + " |")
    return md


def _confirm_table(by_name: dict[str, dict[int, dict[str, Any]]], best: str) -> list[str]:
    """``best`` against PiSSA r = 2, LoRA r = 2 and LoRA r = 8, paired by seed."""
    if best not in by_name or len(by_name[best]) < 2:
        return []
    metrics = (("held_chunks", "held-out chunks"), ("held_docs", "held-out docs"), ("prose", "prose"))
    md = [
        f"| {best} − … (seeds) | " + " | ".join(label for _, label in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for other in ("pissa-r2", "lora-r2", "lora-r8"):
        if other not in by_name:
            continue
        seeds = sorted(set(by_name[best]) & set(by_name[other]))
        cells = []
        for key, _ in metrics:
            a = {s: _final(by_name[best][s], key) for s in seeds}
            b = {s: _final(by_name[other][s], key) for s in seeds}
            cells.append(fmt_paired(paired(a, b)))
        md.append(f"| {other} ({', '.join(map(str, seeds))}) | " + " | ".join(cells) + " |")
    return md


def _goal_table(by_name: dict[str, dict[int, dict[str, Any]]], best: str) -> list[str]:
    """The study's two absorption criteria per seed, for ``best`` and PiSSA r = 2: the share of
    the LoRA r = 2 -> 32 gap closed on held-out chunks, and the prose loss above the LoRA ladder
    at the same held-out-chunk loss (both against seed 1's ladder, the only seed of r = 32)."""
    ladder = _seed1_ladder(by_name)
    if best not in by_name or ladder is None:
        return []
    md = [
        "| run | seed | held-out chunks | LoRA r=2→32 gap closed (goal: ≥ 50%) | prose − LoRA ladder (goal: ≤ 0) |",
        "|---|---|---|---|---|",
    ]
    for name in (best, "pissa-r2"):
        gaps, excess = [], []
        for seed, e in sorted(by_name.get(name, {}).items()):
            gap, above = _against_ladder(e, ladder)
            gaps.append(gap)
            excess.append(above)
            md.append(f"| {name} | {seed} | {_final(e, 'held_chunks'):.3f} | {gap:.0%} | {above:+.3f} |")
        if len(gaps) > 1:
            md.append(
                f"| {name} | mean of {len(gaps)} | | {statistics.mean(gaps):.0%} | {statistics.mean(excess):+.3f} |"
            )
    return md


def _known_rank_table(root: Path) -> list[str]:
    """Error left on the target per entry (mean ± std over seeds), and how many pairs each
    fuses before a tenth of the target is left, against the greedy bound (each pair the
    largest remaining component: the rank at which the target's tail holds a tenth, less r)."""
    path = root / KNOWN_RANK_DOC
    if not path.is_file():
        return []
    from ...known_rank import KnownRankRun, best_rank_error, make_problem

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    labels = {json.dumps(v, sort_keys=True): k for k, v in KNOWN_RANK_ENTRIES.items()}
    cells: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        spec = row["spec"]
        entry = {k: spec[k] for k in ("direction_policy", "entry_scale") if spec.get(k) not in (None, "spectrum")}
        label = labels.get(json.dumps(entry, sort_keys=True), "?")
        cells.setdefault((spec["K"], spec["interval"], label), []).append(row)
    md = [
        "| K | T | entry | seeds | error left | pairs fused in all | pairs fused until a tenth is left "
        "| greedy bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = list(KNOWN_RANK_ENTRIES)
    for (K, T, label), runs in sorted(cells.items(), key=lambda kv: (*kv[0][:2], order.index(kv[0][2]))):
        spec = KnownRankRun(**runs[0]["spec"])
        _, dWs = make_problem(spec)
        greedy = next(j for j in range(spec.width + 1) if best_rank_error(dWs[0], j) <= 0.1) - spec.r
        reach = [_pairs_until(r, spec, 0.1) for r in runs]
        reached = [x for x in reach if x is not None]
        until = (
            f"{statistics.fmean(reached):.0f}"
            if len(reached) == len(reach)
            else f"not reached in {len(reach) - len(reached)} of {len(reach)}"
        )
        md.append(
            f"| {K} | {T} | {label} | {len(runs)} | {fmt(mean_std([r['error'] for r in runs]), 4)} | "
            f"{spec.r_prime * runs[0]['switches']} | {until} | {max(0, greedy)} |"
        )
    return md


def _pairs_until(row: dict[str, Any], spec: Any, level: float) -> int | None:
    """Pairs fused when the run's error curve first reaches ``level`` (None: never)."""
    for step, err in row["curve"]:
        if err <= level:
            return step // spec.interval * spec.r_prime
    return None


def _capture_cost(root: Path) -> list[str]:
    """What the gradient capture costs a step (``benchmarks/gradient_capture.py``, each JSON its
    command): the four models in rotation, the capture on every step, and over a run."""
    rows = []
    for path in sorted((root / "docs/results").glob("gradient_capture_*.json")):
        d = json.loads(path.read_text())
        ratio = d["ratio_to_lora"]
        rows.append(
            f"| {d['model']} | {d['batch']} | {d['r']} | {ratio['control']:.3f} | {ratio['paper']:.3f} | "
            f"{ratio['gradient subspace']:.3f} | {100 * d['capture_per_captured_step']:.1f}% | "
            f"{100 * d['capture_whole_run']:.1f}% (T = {d['interval']}) | `{d.get('command', '')}` |"
        )
    if not rows:
        return []
    return [
        "| model | batch | r | A/A control / LoRA | paper's entries / LoRA | gradient subspace / LoRA "
        "| capture, per captured step | over a run | command |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def plot_frontier(by_name: dict[str, dict[int, dict[str, Any]]], path: Path) -> Path | None:
    """Prose loss (forgetting) against held-out-chunk loss (learning) of every run, each seed a
    point, the LoRA ladder's seed-1 rungs joined: the learning-forgetting frontier."""
    from ...plots import pyplot, save_figure

    ladder = [by_name[n][1] for n in LADDER if 1 in by_name.get(n, {})]
    if len(ladder) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([_final(e, "held_chunks") for e in ladder], [_final(e, "prose") for e in ladder], "k--", lw=1)
    for name, runs in by_name.items():
        xs = [_final(e, "held_chunks") for e in runs.values()]
        ys = [_final(e, "prose") for e in runs.values()]
        ax.scatter(xs, ys, label=name, s=22, marker="s" if name in BASELINES else "o")
    ax.set_xlabel("held-out chunks (nats/token): learnt, lower is better")
    ax.set_ylabel("prose (nats/token): forgotten, lower is better")
    ax.invert_xaxis()
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def render(root: Path, old: dict[str, list[str]], seeds: list[int]) -> list[str]:
    """The section from the committed data (``docs/results/absorb.json``, the known-rank runs of
    :data:`KNOWN_RANK_DOC`); the current doc's text of it where neither is here."""
    from ...rundata import section_key
    from ..absorption import load_absorb

    src = root / KNOWN_RANK_FILE
    if src.is_file():
        shutil.copyfile(src, root / KNOWN_RANK_DOC)
    by_name = _by_name([e for e in load_absorb(root) if e["name"] in (*BASELINES, *VARIANTS)])
    if not any(n in by_name for n in VARIANTS) and not (root / KNOWN_RANK_DOC).is_file():
        return old.get(section_key(TITLE), [])
    md = [TITLE, "", NOTES_HERE, ""]
    parts = [
        (
            "Diagnosis at the switches (`--diagnose`, seed 1; medians over layers, means over switches)",
            _diagnosis_table(by_name),
        ),
        ("Switch by switch (seed 1)", _per_switch(by_name)),
        ("The training loss around the switches, against PiSSA r = 2 on the same batches", _around_switches(by_name)),
        ("Every option on seed 1, against PiSSA r = 2 and the LoRA ladder", _screen_table(by_name)),
        (
            f"The chosen option, `{BEST}`, on 3 seeds paired (95% t-interval; negative = lower loss)",
            _confirm_table(by_name, BEST),
        ),
        (
            f"The study's goal on absorption, seed by seed (`{BEST}` and PiSSA r = 2; seed 1's LoRA ladder)",
            _goal_table(by_name, BEST),
        ),
        (
            "On the known-rank map (one 128-wide layer, r = 2, gamma 1, 2,000 steps; "
            "`srlora study --part new-pairs-known-rank`)",
            _known_rank_table(root),
        ),
        (
            "What the gradient capture costs (median steps in rotation, this project's CPU, one thread)",
            _capture_cost(root),
        ),
    ]
    for title, table in parts:
        if table:
            md += [f"### {title}", "", *table, ""]
    if plot_frontier(by_name, root / "docs/results/new_pairs_frontier.png") is not None:
        md += [
            "The learning-forgetting frontier (Biderman et al. 2024): every run's prose loss against its",
            "held-out-chunk loss; the dashed line joins the LoRA ladder (r = 2, 8, 32, seed 1). Below the line is",
            "forgetting less than LoRA does for the same absorption.",
            "",
            "![learning-forgetting frontier](results/new_pairs_frontier.png)",
            "",
        ]
    md += _paper_regime_table(root, seeds)
    commands = [e["command"] for name in (*VARIANTS, *BASELINES) for e in by_name.get(name, {}).values()]
    md += [
        "Commands (absorption runs; each run's figures are in `docs/results/absorb.json`):",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    return md


NOTES_HERE = (
    "`srlora study --part new-pairs-screen`, then `--part new-pairs-confirm`: SmolLM2-135M absorbing TRL's "
    "source (the absorption study's task), SRLoRA r = 2 with both pairs recycled every 40 steps; each option "
    "changes what enters at a switch (docs/METHOD.md section 7)."
)


def _paper_regime_table(root: Path, seeds: list[int]) -> list[str]:
    """Per task: each row's runs (from docs/results/runs.json and the runs here), and the chosen
    entry against LoRA, PiSSA and the paper's entries, paired by seed."""
    index = root / "docs/results/runs.json"
    entries = json.loads(index.read_text()) if index.is_file() else []
    finals = {(e["cell"], e["method"], e["seed"]): e["final"] for e in entries}
    for job in paper_regime_jobs(seeds):
        if is_finished(job, root):
            finals[job.cell, job.method, job.seed] = json.loads((root / job.out / "results.json").read_text())["final"]
    md: list[str] = []
    for task, metric in PAPER_TASKS.items():
        rows = {
            label: {s: f[metric] for (c, m, s), f in finals.items() if (c, m) == (cell.format(task=task), method)}
            for label, (cell, method) in PAPER_ROWS.items()
        }
        if not any(rows[label] for label in PAPER_ENTRIES):
            continue
        md += [
            f"### {PAPER_TITLE}: {task}",
            "",
            "`srlora study --part new-pairs-long` (the other rows: the paper-regime study).",
        ]
        md += ["", f"| variant | seeds | {metric} |", "|---|---|---|"]
        md += [f"| {label} | {len(v)} | {fmt(mean_std(list(v.values())))} |" for label, v in rows.items() if v]
        md += ["", f"| comparison (paired by seed) | Δ {metric} [95% interval] |", "|---|---|"]
        for label in PAPER_ENTRIES:
            for other in ("LoRA", "PiSSA", "SRLoRA spectrum"):
                if rows[label] and rows[other]:
                    md.append(f"| {label} − {other} | {fmt_paired(paired(rows[label], rows[other]))} |")
        md.append("")
    return md


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """This study's run-table rows (the paper-regime tables): (section, subsection) -> rows."""
    return {
        (TITLE.removeprefix("## "), f"{PAPER_TITLE}: {task}"): {
            label: (cell.format(task=task), method) for label, (cell, method) in PAPER_ROWS.items()
        }
        for task in PAPER_TASKS
    }
