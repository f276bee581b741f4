"""The alternatives study's section of docs/RESULTS.md, from the committed data alone
(``docs/results/absorb.json``, ``docs/results/state_memory.json``) and its plot."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from ...stats import fmt_paired, paired
from ..new_pairs.jobs import BEST
from .jobs import (
    ADAPTER_LR,
    CONFIRMED,
    CONFIRMED_OPTIONS,
    OPTIONS,
    RANK,
    RANKED,
    SAME_TRAINING,
    SWEEPS,
    TUNING,
    best_lr,
    config,
    option_jobs,
    screen_jobs,
    sweep_state,
)

TITLE = "Against the alternatives: full fine-tuning, GaLore and PEFT's initialisations"
EVALS = (("held_chunks", "held-out chunks"), ("held_docs", "held-out docs"), ("prose", "prose"), ("news", "news"))
LABELS = {
    "full": "full fine-tuning",
    "galore": "GaLore",
    "lora": "LoRA",
    "pissa": "PiSSA",
    "srlora": "SRLoRA (gradient subspace, scale 0.25)",
    "corda": "CorDA (knowledge-preserved)",
    "mica": "MiCA",
    "lora_ga": "LoRA-GA",
}


def _option(entry: dict[str, Any]) -> str | None:
    """The tag of the SRLoRA option (:data:`OPTIONS`) that ``entry`` ran with, by its name."""
    return next((tag for tag in OPTIONS if f"-{tag}-" in entry["name"]), None)


def _label(method: str) -> str:
    """A method of :data:`CONFIRMED` in words (``srlora-<tag>``: SRLoRA with that option)."""
    tag = method.removeprefix("srlora-")
    return LABELS[method] if method in LABELS else f"SRLoRA, {OPTIONS[tag].what}"


def _cells(entry: dict[str, Any]) -> list[str]:
    """A run's final evaluations, one cell per set of :data:`EVALS` (``n/a`` where it has none)."""
    final = entry["evals"][-1]
    return [f"{final[key]:.3f}" if key in final else "n/a" for key, _ in EVALS]


def _runs_table(title: str, columns: tuple[str, ...]) -> list[str]:
    """A table's title and head: ``columns``, then every set of :data:`EVALS` and the memory."""
    head = [*columns, *(label for _, label in EVALS), "memory (MiB)"]
    return ["", f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _mib(entry: dict[str, Any]) -> str:
    memory = entry.get("memory")
    return f"{memory['trainable_state_bytes'] / 2**20:,.1f}" if memory else "n/a"


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
    curve = _with_options_and_curve(everything, runs)
    md += _standings(everything, curve[1])
    md += [
        "",
        "### The screen: seed 1, r = 2, each method's learning rate",
        "",
        "| method | lr | " + " | ".join(label for _, label in EVALS) + " | memory (MiB) |",
        "|---|---|" + "---|" * (len(EVALS) + 1),
    ]
    by_method: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for e in runs:  # a swept option of SRLoRA's is a method of its own
        by_method.setdefault((e["config"]["method"], e["config"]["r"], _option(e) or ""), []).append(e)
    for key in sorted(by_method, key=lambda key: (list(LABELS).index(key[0]), *key[1:])):
        points = sorted(by_method[key], key=lambda e: e["config"]["lr"])
        best = min(points, key=lambda e: e["evals"][-1]["held_chunks"])
        for e in points:
            cells = _cells(e)
            if e is best and len(points) > 1:
                cells[0] = f"**{cells[0]}**"
            md.append(f"| {e['name']} | {e['config']['lr']:g} | " + " | ".join(cells) + f" | {_mib(e)} |")
    md += _options_table(everything, runs)
    md += _verdict_table(*curve)
    md += _option_confirm_table(everything)
    md += _confirm_table(everything)
    md += _rank_table(everything, runs)
    md += _memory_table(root)
    if plot_frontier(*curve, root / "docs/results/alternatives_frontier.png") is not None:
        md += [
            "",
            "![learning against forgetting, every method](results/alternatives_frontier.png)",
            "",
            "Learning (held-out chunks) against forgetting (left: prose; right: news), seed 1, r = 2: "
            "each method's runs (every learning rate), SRLoRA's options, and LoRA's curve through its "
            "runs (r = 2, 8, 32 at 5e-4, and r = 2 at every learning rate of the sweep); lower is "
            "better on both axes, and a point below LoRA's curve forgets less at that absorption.",
        ]
    base = runs[0]["evals"][0]
    md += [
        "",
        f"The untrained model: held-out chunks {base['held_chunks']:.3f}, held-out documents "
        f"{base['held_docs']:.3f}, prose {base['prose']:.3f}, news {base['news']:.3f} nats per token. "
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
        name = config(method, 2, state.best, 1)[0]
        entry = next(e for e in everything if e["name"] == name and e["config"]["seed"] == 1)
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
        rows.append((final["held_chunks"], [_label(method), f"{state.best:g}", where, *cells, *gaps, _mib(entry)]))
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


def _options_table(everything: list[dict[str, Any]], screen: list[dict[str, Any]]) -> list[str]:
    """SRLoRA's options beside the chosen entry at the same learning rate (seed 1)."""
    names = {job.name: tag for job, tag in zip(option_jobs(), OPTIONS, strict=True)}
    options = [e for e in everything if e["name"] in names and e["config"]["seed"] == 1]
    plain = [
        e for e in screen if e["config"]["method"] == "srlora" and e["config"]["lr"] == ADAPTER_LR and not _option(e)
    ]
    if not options:
        return []
    md = _runs_table(f"SRLoRA's options: seed 1, r = 2, lr {ADAPTER_LR:g}", ("run", "option"))
    for e in plain + options:
        cells = _cells(e)
        what = OPTIONS[names[e["name"]]].what if e["name"] in names else "none (the chosen entry)"
        md.append(f"| {e['name']} | {what} | " + " | ".join(cells) + f" | {_mib(e)} |")
    return md


def _confirm_table(everything: list[dict[str, Any]]) -> list[str]:
    """SRLoRA's best r = 2 point against each method's, paired by seed (seeds both ran)."""
    best = {m: lr for m in CONFIRMED if (lr := best_lr(everything, m)) is not None}
    by_seed = {
        m: {e["config"]["seed"]: e for e in everything if e["name"] == config(m, 2, lr, 1)[0]} for m, lr in best.items()
    }
    mine = by_seed.get("srlora", {})
    if len(mine) < 2:
        return []
    keys = (("held_chunks", "held-out chunks"), ("prose", "prose"), ("news", "news"))
    md = [
        "",
        "### Each method at its best point, 3 seeds paired: SRLoRA − method (95% t-interval; negative: lower loss)",
        "",
        "| method (best lr; seeds) | " + " | ".join(label for _, label in keys) + " | memory (MiB): it, SRLoRA |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    for method, runs in by_seed.items():
        seeds = sorted(set(runs) & set(mine))
        if method == "srlora" or not seeds:
            continue
        cells = []
        for key, _ in keys:
            a = {s: mine[s]["evals"][-1][key] for s in seeds if key in mine[s]["evals"][-1]}
            b = {s: runs[s]["evals"][-1][key] for s in seeds if key in runs[s]["evals"][-1]}
            cells.append(fmt_paired(paired(a, b)))
        memory = f"{_mib(runs[seeds[0]])}, {_mib(mine[seeds[0]])}"
        label = f"{_label(method)} ({best[method]:g}; {', '.join(map(str, seeds))})"
        md.append(f"| {label} | " + " | ".join(cells) + f" | {memory} |")
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
        md.append(f"| {what} ({', '.join(map(str, seeds))}) | " + " | ".join(cells) + f" | {_mib(runs[seeds[0]])} |")
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
        md.append(f"| {e['name']} | {e['config']['lr']:g} | " + " | ".join(_cells(e)) + f" | {_mib(e)} |")
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


def _with_options_and_curve(
    everything: list[dict[str, Any]], screen: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The screen's seed-1 runs with SRLoRA's options, and LoRA's runs that trace its curve (the
    absorption study's ladder, r = 2, 8, 32, and the screen's LoRA runs)."""
    options = {job.name for job in option_jobs()}
    screened = {e["name"] for e in screen}  # a swept option's run at the old rate is in both
    runs = screen + [e for e in everything if e["name"] in options - screened and e["config"]["seed"] == 1]
    lora = [e for e in everything if e["name"] in ("lora-r2", "lora-r8", "lora-r32") and e["config"]["seed"] == 1]
    lora += [e for e in screen if e["config"]["method"] == "lora"]
    return runs, lora


def curve_at(lora: list[dict[str, Any]], chunks: float, key: str) -> float | None:
    """LoRA's curve's loss on text ``key`` at ``chunks`` nats on held-out chunks: linear between
    LoRA's two runs around it (``None`` outside their span, or where they lack the text)."""
    points = sorted((e["evals"][-1]["held_chunks"], e["evals"][-1][key]) for e in lora if key in e["evals"][-1])
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= chunks <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (chunks - x0) / (x1 - x0)
    return None


def _verdict_table(runs: list[dict[str, Any]], lora: list[dict[str, Any]]) -> list[str]:
    """Every run but LoRA's among ``runs`` (:func:`_with_options_and_curve`) against LoRA's curve
    through ``lora`` and against every run with no more memory."""
    mine = [e for e in runs if e["config"]["method"] != "lora"]
    if not mine or len(lora) < 2:
        return []
    md = [
        "",
        "### Each run against LoRA's curve and against what fits in its memory: seed 1",
        "",
        "*Above the curve*: the run's loss on that text minus LoRA's curve's at the same absorption "
        "(linear between LoRA's runs around it; + forgets more; n/a: outside the span of LoRA's runs). "
        "*Better for less*: runs with no more memory that absorb at least as much and forget no more "
        "on both texts.",
        "",
        "| run | memory (MiB) | held-out chunks | above the curve: prose | news | better for less |",
        "|---|---|---|---|---|---|",
    ]
    for e in sorted(mine, key=lambda e: (list(LABELS).index(e["config"]["method"]), e["name"])):
        final, memory = e["evals"][-1], e["memory"]["trainable_state_bytes"]
        gaps = []
        for key in ("prose", "news"):
            curve = curve_at(lora, final["held_chunks"], key) if key in final else None
            gaps.append("n/a" if curve is None else f"{final[key] - curve:+.3f}")
        better = [
            o["name"]
            for o in runs + lora
            if o is not e
            and o.get("memory") is not None
            and o["memory"]["trainable_state_bytes"] <= memory
            and all(k in o["evals"][-1] and o["evals"][-1][k] <= final[k] for k in ("held_chunks", "prose", "news"))
        ]
        md.append(
            f"| {e['name']} | {_mib(e)} | {final['held_chunks']:.3f} | {gaps[0]} | {gaps[1]} | "
            + (", ".join(sorted(set(better))) or "none")
            + " |"
        )
    return md


def plot_frontier(runs: list[dict[str, Any]], lora: list[dict[str, Any]], path: Path) -> Path | None:
    """Each forgetting text's loss against held-out-chunk loss for every seed-1 run of the
    screen and of SRLoRA's options (``runs``), with LoRA's curve: its runs (``lora``) joined in
    order of learning."""
    from ...plots import pyplot, save_figure

    if len(runs) < 2:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.6))
    for ax, (key, label) in zip(axes, EVALS[2:], strict=True):
        curve = sorted((e for e in lora if key in e["evals"][-1]), key=lambda e: e["evals"][-1]["held_chunks"])
        if len(curve) >= 2:
            xs, ys = [e["evals"][-1]["held_chunks"] for e in curve], [e["evals"][-1][key] for e in curve]
            ax.plot(xs, ys, "k--", lw=1, label="LoRA's curve")
        for method in LABELS:
            points = [e for e in runs if e["config"]["method"] == method and not _option(e)]
            points = [e for e in points if key in e["evals"][-1]]
            if points:
                xs = [e["evals"][-1]["held_chunks"] for e in points]
                ax.scatter(xs, [e["evals"][-1][key] for e in points], s=22, label=LABELS[method])
        stars = plt.get_cmap("Dark2").colors  # not the methods' colours: a star is no method's run
        for tag, colour in zip(OPTIONS, stars, strict=False):  # every learning rate of a swept one
            points = [e for e in runs if _option(e) == tag and key in e["evals"][-1]]
            if points and tag not in SAME_TRAINING:
                xs = [e["evals"][-1]["held_chunks"] for e in points]
                ys = [e["evals"][-1][key] for e in points]
                ax.scatter(xs, ys, marker="*", s=70, color=colour, label=OPTIONS[tag].what)
        start = runs[0]["evals"][0]  # step 0: the untrained model, the same in every run
        if key in start:
            ax.scatter([start["held_chunks"]], [start[key]], marker="x", c="k", s=40, label="untrained")
        ax.set_xlabel("held-out chunks (nats/token): learnt, lower is better")
        ax.set_ylabel(f"{label} (nats/token): forgotten, lower is better")
        ax.invert_xaxis()
    # one legend below both panels (the same runs in the same colours on each), clear of the points
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.022 * ((len(labels) + 2) // 3), 1, 1))
    return save_figure(fig, path)
