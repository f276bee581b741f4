"""The ``srlora`` command line: fetch assets, train one method, compare the three.

srlora compare                    # main job: MiniLM on MR, LoRA vs PiSSA vs SRLoRA, quick preset
srlora train --task mr --method srlora --max-steps 300
srlora compare --task stsb --data-dir GLUE --preset paper-stsb --model microsoft/deberta-v3-base --seeds 1,2,3
srlora fetch minilm vader
srlora study --part render        # docs/RESULTS.md from the study's runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, atomic_write_text
from . import assets
from .adapters import quiet_imports
from .config import METHODS, RunConfig
from .options import add_run_options, add_train_options, run_values
from .paper import GLUE_SCORES
from .runs import finished_run, holds_run, preflight, run, train_losses
from .stats import fmt, mean_std
from .tasks import load_task


def cmd_fetch(ns: argparse.Namespace) -> int:
    if ns.list:
        for a in assets.ASSETS.values():
            state = "cached" if assets.local_path(a.name) else "not fetched"
            print(f"{a.name:8s} {state:12s} {a.description}  [{a.client}: {a.package}]")
        return 0
    for name in ns.assets or list(assets.ASSETS):
        print(f"{name}: {assets.fetch(name, force=ns.force)}")
    return 0


def check_out_dir(out: Path) -> None:
    """``--out`` must be a folder that can be written (created if missing)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create it ({exc.strerror}); give a folder you can write to.") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: not writable; give a folder you can write to.")


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = RunConfig.from_flat({"method": ns.method, **run_values(ns, None)})
    out = Path(ns.out or f"runs/{cfg.task}-{cfg.method}-seed{cfg.seed}")
    if ns.resume and (done := finished_run(out, cfg)) is not None:
        print(f"{out}: finished earlier with the same configuration, kept", file=sys.stderr)
        results = done
    else:
        if holds_run(out) and not (ns.overwrite or ns.resume):
            raise ValueError(
                f"--out {out} already holds a run; pass --overwrite to replace it, or --resume to keep it when it "
                f"finished with the same configuration."
            )
        task = load_task(cfg.task, cfg.data_dir)
        preflight(cfg, task)  # bad data or options stop here, before --out is touched
        check_out_dir(out)
        try:
            results = run(cfg, out, task=task)
        except KeyboardInterrupt:
            print(f"interrupted; what finished is in {out}", file=sys.stderr)
            return 130
    summary = {k: results[k] for k in ("task", "method", "seed", "steps", "final", "early_train_loss", "wall_s")}
    print(json.dumps(summary, indent=2))
    print(
        f"written: {out}/ (config.json, metrics.jsonl, results.json"
        + (", history.json)" if ns.method == "srlora" else ")")
    )
    return 0


def summarize(all_results: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Mean and standard deviation over seeds, per method."""
    summary: dict[str, Any] = {}
    for method in methods:
        rows = [r for r in all_results if r["method"] == method and r["final"] is not None]
        if not rows:
            continue
        metric_names = [k for k in rows[0]["final"] if k != "step"]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
        for k in metric_names:
            entry[k] = mean_std([r["final"][k] for r in rows])[:2]
        entry["early_train_loss"] = mean_std([r["early_train_loss"] for r in rows])[:2]
        entry["wall_s"] = mean_std([r["wall_s"] for r in rows])[:2]
        entry["trainable_params"] = rows[0]["trainable_params"]
        summary[method] = entry
    return summary


def format_table(task: str, summary: dict[str, Any]) -> str:
    """The compare table: mean over seeds, ``± std`` where there are two seeds or more."""
    methods = list(summary)
    if not methods:
        return "(no finished run)"
    metrics = [k for k in summary[methods[0]] if isinstance(summary[methods[0]][k], tuple) and k != "wall_s"]
    head = ["method", *metrics, "trainable", "wall s"]
    if task in GLUE_SCORES:
        head.append("paper")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        e = summary[m]
        n = len(e["seeds"])
        cells = [m] + [fmt((*e[k], n), digits=4) for k in metrics]
        cells += [f"{e['trainable_params']:,}", f"{e['wall_s'][0]:.0f}"]
        if task in GLUE_SCORES:
            cells.append(GLUE_SCORES[task].get(m, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_compare(ns: argparse.Namespace) -> int:
    values = run_values(ns, "quick")
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    seeds = [int(s) for s in ns.seeds.split(",") if s.strip()]
    # Fail before any run when SRLoRA's settings cannot work (not after LoRA and PiSSA ran).
    base = RunConfig.from_flat({**values, "method": "srlora" if "srlora" in methods else methods[0]})
    out = Path(ns.out or f"runs/compare-{base.task}")
    task = load_task(base.task, base.data_dir)
    preflight(base, task)
    check_out_dir(out)
    print(f"{task.name}: {task.description}", file=sys.stderr)
    all_results: list[dict[str, Any]] = []
    interrupted = False
    try:
        for seed in seeds:
            for method in methods:
                cfg = dataclasses.replace(base, method=method, seed=seed)
                run_dir = out / method / f"seed{seed}"
                done = finished_run(run_dir, cfg) if ns.resume else None
                if done is not None:
                    print(f"{task.name}/{method}/seed{seed}: finished earlier, kept ({run_dir})", file=sys.stderr)
                    all_results.append(done)
                    continue
                all_results.append(run(cfg, run_dir, task=task))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: summarising the runs that finished", file=sys.stderr)

    summary = summarize(all_results, methods)
    table = format_table(task.name, summary)
    result = {
        "task": task.name,
        "description": task.description,
        "config": base.to_dict(),
        "methods": methods,
        "seeds": seeds,
        "summary": summary,
        "runs": all_results,
        "interrupted": interrupted,
    }
    atomic_write_json(out / "results.json", result)
    figures = _compare_figures(ns, out, task.name, all_results, seeds)
    md = [
        f"# {task.name}: {', '.join(methods)}",
        "",
        task.description,
        "",
        f"Seeds {seeds}; metrics on dev at the last step (mean ± std over seeds where there are several); "
        f"`early_train_loss`: mean training loss over the first 25% of steps.",
        "",
        table,
        "",
    ]
    if task.name in GLUE_SCORES:
        md += ["`paper`: the SRLoRA paper's GLUE dev numbers (DeBERTa-v3-base), for reference.", ""]
    md += [f"![{p.stem}]({p.name})" for p in figures]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    print(table)
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in figures))
    return 130 if interrupted else 0


def _compare_figures(
    ns: argparse.Namespace, out: Path, task: str, all_results: list[dict[str, Any]], seeds: list[int]
) -> list[Path]:
    """Loss curves of every method, and SRLoRA's active intervals and their variance."""
    from . import plots

    curves: dict[str, list[list[float]]] = {}
    for r in all_results:
        curves.setdefault(r["method"], []).append(train_losses(out / r["method"] / f"seed{r['seed']}"))
    figures = []
    if curves:
        figures.append(plots.plot_loss_curves(curves, out / "loss_curves.png", f"{task}: training loss"))
    hist_path = out / "srlora" / f"seed{seeds[0]}" / "history.json"
    if hist_path.is_file():
        history = json.loads(hist_path.read_text())
        layers = plots.layers_of(history)
        layer = ns.layer or layers[len(layers) // 2]
        matches = [name for name in layers if name == layer or name.endswith(layer)]
        if not matches:
            raise SystemExit(f"--layer {layer!r} matches no adapted layer; e.g. {layers[0]!r}")
        figures.append(plots.plot_active_intervals(history, matches[0], out / "active_intervals.png"))
        figures.append(plots.plot_interval_variance(history, out / "interval_variance.png"))
    return figures


def cmd_study(ns: argparse.Namespace) -> int:
    from .report import render
    from .study import run_parts

    seeds, root = run_parts(ns)
    print(f"written: {render(seeds, root)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="srlora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="Download and unpack the offline models and data (sha256-checked).")
    p.add_argument("assets", nargs="*", help=f"Assets to fetch (default: all): {', '.join(assets.ASSETS)}.")
    p.add_argument("--list", action="store_true", help="List the assets and whether they are cached.")
    p.add_argument("--force", action="store_true", help="Download again even if cached.")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("train", help="One training run of one method.")
    add_train_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="LoRA vs PiSSA vs SRLoRA on one task: table and plots (preset: quick).")
    p.add_argument("--methods", default=",".join(METHODS), help="Comma-separated methods to compare.")
    p.add_argument("--seeds", default="1", help="Comma-separated seeds (data order and head initialisation).")
    p.add_argument("--out", help="Output folder (default: runs/compare-TASK).")
    p.add_argument("--layer", help="Layer (name or suffix) for the active-interval plot (default: a middle one).")
    p.add_argument(
        "--resume",
        action="store_true",
        help="Keep runs in --out that finished with the same configuration; run only the missing ones.",
    )
    add_run_options(p)
    p.set_defaults(func=cmd_compare)

    from . import study

    p = sub.add_parser(
        "study",
        help="The results study: run what is missing, then write docs/RESULTS.md (resumable).",
        description=study.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    study.add_arguments(p)
    p.set_defaults(func=cmd_study)

    from . import absorb

    p = sub.add_parser(
        "absorb",
        help="One corpus-absorption run (SmolLM2-135M continued pretraining on Python source).",
        description=absorb.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    absorb.add_arguments(p)
    p.set_defaults(func=absorb.main)
    return ap


def main(argv: list[str] | None = None) -> int:
    """The command without the extras check (see :func:`srlora.experiments.main`): every
    error is one line on stderr, never a traceback (``SRLORA_TRACEBACK=1`` shows it)."""
    ns = build_parser().parse_args(argv)
    quiet_imports()
    try:
        return int(ns.func(ns) or 0)
    except KeyboardInterrupt:
        print("srlora: interrupted", file=sys.stderr)
        return 130
    except (assets.AssetError, ValueError, OSError) as exc:
        if os.environ.get("SRLORA_TRACEBACK"):
            raise
        print(f"srlora: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("SRLORA_TRACEBACK"):
            raise
        print(
            f"srlora: error: unexpected {type(exc).__name__}: {_one_line(exc)} (set SRLORA_TRACEBACK=1 to see where)",
            file=sys.stderr,
        )
        return 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text[:1000]


if __name__ == "__main__":
    sys.exit(main())
