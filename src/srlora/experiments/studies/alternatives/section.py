"""The alternatives study's section of docs/RESULTS.md, from the committed data alone
(``docs/results/absorb.json``, ``docs/results/state_memory.json``) and its plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...stats import fmt_paired, paired
from ..new_pairs.jobs import BEST
from .frontier import FORGETTING, budget_table, curve_at, mib, plot_frontier, verdict_table, with_options_and_curve
from .jobs import (
    ADAPTER_LR,
    CONFIRMED,
    CONFIRMED_OPTIONS,
    LABELS,
    OPTIONS,
    RANK,
    RANKED,
    SWEEPS,
    TUNING,
    best_lr,
    config,
    label,
    option_jobs,
    option_of,
    screen_jobs,
    seed1_runs,
    sweep_state,
)

TITLE = "Against the alternatives: full fine-tuning, GaLore and PEFT's initialisations"
EVALS = (("held_chunks", "held-out chunks"), ("held_docs", "held-out docs"), *FORGETTING)


def _cells(entry: dict[str, Any]) -> list[str]:
    """A run's final evaluations, one cell per set of :data:`EVALS` (``n/a`` where it has none)."""
    final = entry["evals"][-1]
    return [f"{final[key]:.3f}" if key in final else "n/a" for key, _ in EVALS]


def _runs_table(title: str, columns: tuple[str, ...]) -> list[str]:
    """A table's title and head: ``columns``, then every set of :data:`EVALS` and the memory."""
    head = [*columns, *(label for _, label in EVALS), "memory (MiB)"]
    return ["", f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def section(root: Path) -> list[str]:
    """The screen: every method's sweep on seed 1 at r = 2 (and LoRA's ladder), each run with its
    memory; the best point of each method and rank (held-out chunks) in bold."""
    from ..absorption import load_absorb

    everything = load_absorb(root)  # every committed run, read once for every table
    names = {job.name for job in screen_jobs(1, everything)}  # the sweeps' added points too
    runs = [e for e in everything if e["name"] in names and e["config"]["seed"] == 1]
    md = [f"## {TITLE}", ""]
    if not runs:
        return [*md, "Not run yet: `srlora study --part alternatives-screen`.", ""]
    md += [
        TUNING,
        "",
        "Forgetting is measured on two general texts, the movie-review sentences (*prose*) and New "
        "York Times editorial snippets (*news*); CorDA's covariance comes from a third, Amazon review "
        "snippets, in no evaluation set. *Memory*: what the method keeps beside the frozen model, "
        "counted from the tensors at its peak over the run (what trains and its gradients, the "
        "optimizer's state, SRLoRA's own state; galore-torch's projectors keep the storage of the "
        "whole SVD factor they slice).",
    ]
    curve = with_options_and_curve(everything, runs)
    md += _standings(everything, curve[1])
    untrained = runs[0]["evals"][0]  # step 0: the untrained model, the same in every run
    md += budget_table(_paths(everything), {key: untrained[key] for key, _ in FORGETTING if key in untrained})
    md += [
        "",
        "### The screen: seed 1, r = 2, each method's learning rate",
        "",
        "| method | lr | " + " | ".join(label for _, label in EVALS) + " | memory (MiB) |",
        "|---|---|" + "---|" * (len(EVALS) + 1),
    ]
    by_method: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for e in runs:  # a swept option of SRLoRA's is a method of its own
        by_method.setdefault((e["config"]["method"], e["config"]["r"], option_of(e) or ""), []).append(e)
    for key in sorted(by_method, key=lambda key: (list(LABELS).index(key[0]), *key[1:])):
        points = sorted(by_method[key], key=lambda e: e["config"]["lr"])
        best = min(points, key=lambda e: e["evals"][-1]["held_chunks"])
        for e in points:
            cells = _cells(e)
            if e is best and len(points) > 1:
                cells[0] = f"**{cells[0]}**"
            md.append(f"| {e['name']} | {e['config']['lr']:g} | " + " | ".join(cells) + f" | {mib(e)} |")
    md += _options_table(everything, runs)
    md += verdict_table(*curve)
    md += _option_confirm_table(everything)
    md += _confirm_tables(everything)
    md += _rank_table(everything, runs)
    md += _memory_table(root)
    if plot_frontier(*curve, root / "docs/results/alternatives_frontier.png") is not None:
        md += [
            "",
            "![learning against forgetting, every method](results/alternatives_frontier.png)",
            "",
            "Learning (held-out chunks) against forgetting (left: prose; right: news), seed 1, r = 2: "
            "each method's runs (every learning rate, joined in order of rate), SRLoRA's options, and "
            "LoRA's curve through its runs (r = 2, 8, 32 at 5e-4, and r = 2 at every learning rate of "
            "the sweep); lower is "
            "better on both axes, and a point below LoRA's curve forgets less at that absorption.",
        ]
    md += [
        "",
        f"The untrained model: held-out chunks {untrained['held_chunks']:.3f}, held-out documents "
        f"{untrained['held_docs']:.3f}, prose {untrained['prose']:.3f}, news {untrained['news']:.3f} nats per token. "
        f"Each run's command is in `docs/results/absorb.json`; the sweep's commands: "
        f"`srlora study --part alternatives-screen` runs the missing ones, two at a time. Wall times "
        f"are left out here: the screen's runs shared the cores with the test suite (the cost of "
        f"SRLoRA against LoRA is measured in its own section).",
        "",
    ]
    return md


def _standings(everything: list[dict[str, Any]], lora: list[dict[str, Any]]) -> list[str]:
    """Each method of :data:`CONFIRMED` at its best seed-1 point so far (held-out chunks), best
    first, with where its sweep stands and its forgetting against LoRA's curve through ``lora``."""
    rows = []
    for method in CONFIRMED:
        state = sweep_state(everything, method)
        if state.best is None:
            continue
        entry = seed1_runs(everything, method, 2, [state.best])[state.best]
        if state.missing:
            where = "to run: " + ", ".join(f"{lr:g}" for lr in state.missing)
        elif state.at_edge:
            grown = len(state.points) - len(SWEEPS.get(method, SWEEPS["adapter"]))
            where = f"at its edge after {grown} growth{'s' * (grown != 1)}"
        else:
            where = "complete"
        final = entry["evals"][-1]
        gaps = []
        for key in ("prose", "news"):
            at = curve_at(lora, final["held_chunks"], key) if key in final else None
            gaps.append("the curve" if method == "lora" else "n/a" if at is None else f"{final[key] - at:+.3f}")
        cells = [f"{final[key]:.3f}" for key in ("held_chunks", "held_docs")]
        rows.append((final["held_chunks"], [label(method), f"{state.best:g}", where, *cells, *gaps, mib(entry)]))
    if not rows:
        return []
    md = [
        "",
        "### Where each method stands: its best point so far, seed 1, r = 2",
        "",
        "Best first (held-out chunks). *Sweep*: complete (its best lies inside its range), at its edge "
        "(its best is still an end after the growths the rule allows: no rate beyond it was tried), or "
        "the points still to run (its best may move). *Above LoRA's curve*: as in the table of every run "
        "below (+ forgets more at that absorption; n/a: outside the span of LoRA's runs).",
        "",
        "| method | best lr | sweep | held-out chunks | held-out docs | above LoRA's curve: prose | news "
        "| memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return md + ["| " + " | ".join(cells) + " |" for _, cells in sorted(rows, key=lambda row: row[0])]


def _paths(everything: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each method of :data:`CONFIRMED`'s seed-1 runs at r = 2 in order of learning rate, by label."""
    paths = {}
    for method in CONFIRMED:
        done = seed1_runs(everything, method, 2, list(sweep_state(everything, method).points))
        if done:
            paths[label(method)] = [done[lr] for lr in sorted(done)]
    return paths


def _options_table(everything: list[dict[str, Any]], screen: list[dict[str, Any]]) -> list[str]:
    """SRLoRA's options beside the chosen entry at the same learning rate (seed 1)."""
    names = {job.name: tag for job, tag in zip(option_jobs(), OPTIONS, strict=True)}
    options = [e for e in everything if e["name"] in names and e["config"]["seed"] == 1]
    plain = [
        e for e in screen if e["config"]["method"] == "srlora" and e["config"]["lr"] == ADAPTER_LR and not option_of(e)
    ]
    if not options:
        return []
    md = _runs_table(f"SRLoRA's options: seed 1, r = 2, lr {ADAPTER_LR:g}", ("run", "option"))
    for e in plain + options:
        cells = _cells(e)
        what = OPTIONS[names[e["name"]]].what if e["name"] in names else "none (the chosen entry)"
        md.append(f"| {e['name']} | {what} | " + " | ".join(cells) + f" | {mib(e)} |")
    return md


def _confirm_tables(everything: list[dict[str, Any]]) -> list[str]:
    """Each SRLoRA setting of :data:`CONFIRMED` (the chosen entry, each confirmed option) at its
    best r = 2 point against every other method's, paired by seed (the seeds both ran): one
    table a setting."""
    best = {m: lr for m in CONFIRMED if (lr := best_lr(everything, m)) is not None}
    by_seed = {
        m: {e["config"]["seed"]: e for e in everything if e["name"] == config(m, 2, lr, 1)[0]} for m, lr in best.items()
    }
    keys = (("held_chunks", "held-out chunks"), ("prose", "prose"), ("news", "news"))
    md: list[str] = []
    for setting in (m for m in by_seed if m == "srlora" or m.startswith("srlora-")):
        mine = by_seed[setting]
        short = "SRLoRA" if setting == "srlora" else f"SRLoRA {setting.removeprefix('srlora-')}"
        rows = []
        for method, runs in by_seed.items():
            seeds = sorted(set(runs) & set(mine))
            if method == setting or len(seeds) < 2:  # one seed is the screen's comparison, above
                continue
            cells = []
            for key, _ in keys:
                a = {s: mine[s]["evals"][-1][key] for s in seeds if key in mine[s]["evals"][-1]}
                b = {s: runs[s]["evals"][-1][key] for s in seeds if key in runs[s]["evals"][-1]}
                cells.append(fmt_paired(paired(a, b)))
            memory = f"{mib(runs[seeds[0]])}, {mib(mine[seeds[0]])}"
            what = f"{label(method)} ({best[method]:g}; {', '.join(map(str, seeds))})"
            rows.append(f"| {what} | " + " | ".join(cells) + f" | {memory} |")
        if rows:
            md += [
                "",
                f"### Each method at its best point, 3 seeds paired: {short} − method "
                "(95% t-interval; negative: lower loss)",
                "",
                f"{short}: {label(setting)}, at {best[setting]:g}. A method joins once two of its seeds pair.",
                "",
                "| method (best lr; seeds) | "
                + " | ".join(name for _, name in keys)
                + f" | memory (MiB): it, {short} |",
                "|---|" + "---|" * (len(keys) + 1),
                *rows,
            ]
    return md


def _option_confirm_table(everything: list[dict[str, Any]]) -> list[str]:
    """Each of :data:`CONFIRMED_OPTIONS` on every seed it ran, paired by seed with the chosen
    entry (the new-pairs study's runs of the same configuration), and its prose loss against
    LoRA's curve of the same seed (LoRA r = 2 and 8 at 5e-4; r = 32 on seed 1)."""
    tags = {job.name: tag for job, tag in zip(option_jobs(), OPTIONS, strict=True) if tag in CONFIRMED_OPTIONS}
    chosen = {e["config"]["seed"]: e for e in everything if e["name"] == BEST}
    curves: dict[int, list[dict[str, Any]]] = {}
    for e in everything:
        if e["name"] in ("lora-r2", "lora-r8", "lora-r32"):
            curves.setdefault(e["config"]["seed"], []).append(e)
    md = []
    for name, tag in tags.items():
        runs = {e["config"]["seed"]: e for e in everything if e["name"] == name}
        seeds = sorted(set(runs) & set(chosen))
        if len(seeds) < 2:
            continue
        if not md:
            md = [
                "",
                "### SRLoRA's confirmed options: paired by seed (95% t-interval; negative: lower loss)",
                "",
                "*Against the chosen entry*: option − the chosen entry (the same run without the option). "
                "*Above LoRA's curve*: the option's prose loss minus LoRA's curve's at its absorption, the "
                "curve through LoRA r = 2 and 8 (and 32 on seed 1) of the same seed.",
                "",
                "| option (seeds) | held-out chunks: against the chosen entry | prose: against the chosen entry "
                "| prose: above LoRA's curve | memory (MiB) |",
                "|---|---|---|---|---|",
            ]
        final = {s: runs[s]["evals"][-1] for s in seeds}
        cells = [
            fmt_paired(paired({s: final[s][k] for s in seeds}, {s: chosen[s]["evals"][-1][k] for s in seeds}))
            for k in ("held_chunks", "prose")
        ]
        curve = {
            s: c for s in seeds if (c := curve_at(curves.get(s, []), final[s]["held_chunks"], "prose")) is not None
        }
        cells.append(fmt_paired(paired({s: final[s]["prose"] for s in curve}, curve)))
        what = OPTIONS[tag].what
        md.append(f"| {what} ({', '.join(map(str, seeds))}) | " + " | ".join(cells) + f" | {mib(runs[seeds[0]])} |")
    return md


def _rank_table(everything: list[dict[str, Any]], screen: list[dict[str, Any]]) -> list[str]:
    """Seed 1 at r = :data:`RANK` (and LoRA r = 64), beside full fine-tuning's best."""
    ranked = [
        e
        for e in everything
        if e["config"]["r"] >= RANK and e["config"]["method"] in RANKED and e["config"]["seed"] == 1
    ]
    if not any(e["config"]["method"] != "lora" for e in ranked):
        return []  # LoRA's ladder alone is in the screen's table
    full = [e for e in screen if e["config"]["method"] == "full"]
    rows = sorted(ranked, key=lambda e: (e["config"]["r"], RANKED.index(e["config"]["method"]), e["config"]["lr"]))
    if full:
        rows.append(min(full, key=lambda e: e["evals"][-1]["held_chunks"]))
    md = _runs_table(f"The rank users pick: seed 1, r = {RANK}", ("run", "lr"))
    for e in rows:
        md.append(f"| {e['name']} | {e['config']['lr']:g} | " + " | ".join(_cells(e)) + f" | {mib(e)} |")
    return md


MEMORY = "docs/results/state_memory.json"


def _memory_table(root: Path) -> list[str]:
    """``benchmarks/state_memory.py``'s figures: each configuration's trainable state and the
    LoRA rank of the same memory."""
    path = root / MEMORY
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows, meta = data["rows"], data["meta"]
    per_rank = rows["lora-r2"]["trainable_state_bytes"] / 2  # LoRA's state is linear in r
    md = [
        "",
        "### Trainable state against LoRA's ranks",
        "",
        f"`python benchmarks/state_memory.py --json {MEMORY}` on {meta['machine']}: each configuration "
        "built on SmolLM2-135M, after one AdamW step, every capture window open (SRLoRA's peak: its "
        "records are allocated up front). *gsub*: the chosen entry (the gradient's subspace, scale 0.25, "
        "r_target = 10 r); *paper*: W0's next directions, the same budget.",
        "",
        "| configuration | trains (MiB) | gradients | optimizer | SRLoRA's own | total | LoRA rank of that memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, parts in rows.items():
        keys = ("params", "grads", "optimizer", "method", "trainable_state_bytes")
        cells = [f"{parts[k] / 2**20:,.1f}" for k in keys]
        md.append(f"| {name} | " + " | ".join(cells) + f" | {parts['trainable_state_bytes'] / per_rank:.1f} |")
    return md
