"""The ``srlora`` command line: fetch assets, train one method, compare the three.

srlora compare                    # main job: MiniLM on MR, LoRA vs PiSSA vs SRLoRA, quick preset
srlora train --task mr --method srlora --max-steps 300
srlora compare --task stsb --data-dir GLUE --preset paper-stsb --model microsoft/deberta-v3-base --seeds 1,2,3
srlora fetch minilm vader
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import typing
from pathlib import Path
from typing import Any

from . import assets
from .experiment import METHODS, PRESETS, RunConfig, apply_preset, atomic_write_text, run, train_losses

# SPEC section 5: the paper's GLUE dev numbers (DeBERTa-v3-base), for results.md.
PAPER_GLUE = {
    "sst2": {"lora": "95.9", "pissa": "95.7", "srlora": "96.1"},
    "mrpc": {"lora": "90.8/87.5", "pissa": "90.5/87.2", "srlora": "90.3/86.6"},
    "cola": {"lora": "65.4", "pissa": "64.7", "srlora": "65.1"},
    "qnli": {"lora": "94.0", "pissa": "94.4", "srlora": "93.4"},
    "rte": {"lora": "80.4", "pissa": "82.0", "srlora": "82.1"},
    "stsb": {"lora": "90.5/89.8", "pissa": "89.6/89.0", "srlora": "90.4/90.2"},
}

_RUN_FIELDS = [f for f in dataclasses.fields(RunConfig) if f.name not in ("method",)]


def _arg_type(f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(RunConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if typing.get_origin(base) is list:
        return lambda s: [x.strip() for x in s.split(",") if x.strip()]
    return base


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"Start from a preset: {', '.join(sorted(PRESETS))} (options given win).")
    for f in _RUN_FIELDS:
        if _arg_type(f) is bool:
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", default=None, help=f.metadata["help"])
            continue
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_arg_type(f),
            default=None,
            help=f.metadata["help"] + (" Comma-separated." if f.name == "target_modules" else ""),
        )


def _run_values(ns: argparse.Namespace, default_preset: str | None) -> dict[str, Any]:
    overrides = {f.name: getattr(ns, f.name) for f in _RUN_FIELDS if getattr(ns, f.name) is not None}
    preset = ns.preset or default_preset
    if preset is None:
        return overrides
    task_name = overrides.get("task") or PRESETS.get(preset, {}).get("task")
    train_size = None
    if preset.startswith("paper-") and "max_steps" not in overrides:
        from .data import load_task

        train_size = len(load_task(task_name or "mr", overrides.get("data_dir")).train)
    return apply_preset(preset, overrides, train_size)


def cmd_fetch(ns: argparse.Namespace) -> int:
    if ns.list:
        for a in assets.ASSETS.values():
            state = "cached" if assets.local_path(a.name) else "not fetched"
            print(f"{a.name:8s} {state:12s} {a.description}  [{a.client}: {a.package}]")
        return 0
    for name in ns.assets or list(assets.ASSETS):
        print(f"{name}: {assets.fetch(name, force=ns.force)}")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    values = _run_values(ns, None)
    cfg = RunConfig(method=ns.method, **values)
    out = Path(ns.out or f"runs/{cfg.task}-{cfg.method}-seed{cfg.seed}")
    try:
        results = run(cfg, out)
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


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
            entry[k] = _mean_std([r["final"][k] for r in rows])
        entry["early_train_loss"] = _mean_std([r["early_train_loss"] for r in rows])
        entry["wall_s"] = _mean_std([r["wall_s"] for r in rows])
        entry["trainable_params"] = rows[0]["trainable_params"]
        summary[method] = entry
    return summary


def format_table(task: str, summary: dict[str, Any], headline: str) -> str:
    methods = list(summary)
    if not methods:
        return "(no finished run)"
    metrics = [k for k in summary[methods[0]] if isinstance(summary[methods[0]][k], tuple) and k != "wall_s"]
    head = ["method", *metrics, "trainable", "wall s"]
    if task in PAPER_GLUE:
        head.append("paper")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        e = summary[m]
        cells = [m] + [f"{e[k][0]:.4f} ± {e[k][1]:.4f}" for k in metrics]
        cells += [f"{e['trainable_params']:,}", f"{e['wall_s'][0]:.0f}"]
        if task in PAPER_GLUE:
            cells.append(PAPER_GLUE[task].get(m, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finished_run(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """``results.json`` of a run that finished with the same configuration, else ``None``."""
    try:
        saved_cfg = json.loads((run_dir / "config.json").read_text())
        results = json.loads((run_dir / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    wanted = dataclasses.asdict(cfg)
    same = all(saved_cfg.get(k) == v for k, v in wanted.items() if k != "model") and (
        cfg.model is None or saved_cfg.get("model") == cfg.model
    )
    return results if same and not results.get("interrupted") else None


def cmd_compare(ns: argparse.Namespace) -> int:
    from . import plots
    from .data import load_task

    values = _run_values(ns, "quick")
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    seeds = [int(s) for s in ns.seeds.split(",") if s.strip()]
    base = RunConfig(**values)
    if "srlora" in methods:
        # Fail before any run when SRLoRA's settings cannot work (not after LoRA and PiSSA ran).
        from .schedule import SwitchSchedule

        srl = base.srlora_config()
        SwitchSchedule.count_switches(base.r, srl.recycled_per_switch(base.r), base.r_target)
    out = Path(ns.out or f"runs/compare-{base.task}")
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(base.task, base.data_dir)
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
    headline = task.metrics[0]
    table = format_table(task.name, summary, headline)
    result = {
        "task": task.name,
        "description": task.description,
        "config": dataclasses.asdict(base),
        "methods": methods,
        "seeds": seeds,
        "summary": summary,
        "runs": all_results,
        "interrupted": interrupted,
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))

    # Plots: loss curves of every method, and SRLoRA's active intervals.
    curves: dict[str, list[list[float]]] = {}
    for r in all_results:
        curves.setdefault(r["method"], []).append(train_losses(out / r["method"] / f"seed{r['seed']}"))
    figures = []
    if curves:
        figures.append(plots.plot_loss_curves(curves, out / "loss_curves.png", f"{task.name}: training loss"))
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

    md = [
        f"# {task.name}: {', '.join(methods)}",
        "",
        task.description,
        "",
        f"Seeds {seeds}; metrics on dev at the last step, mean ± std over seeds; "
        f"`early_train_loss`: mean training loss over the first 25% of steps.",
        "",
        table,
        "",
    ]
    if task.name in PAPER_GLUE:
        md += ["`paper`: the SRLoRA paper's GLUE dev numbers (DeBERTa-v3-base), for reference.", ""]
    md += [f"![{p.stem}]({p.name})" for p in figures]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    print(table)
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in figures))
    return 130 if interrupted else 0


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
    p.add_argument("--method", default="srlora", choices=METHODS, help="lora, pissa or srlora.")
    p.add_argument("--out", help="Output folder (default: runs/TASK-METHOD-seedS).")
    _add_run_options(p)
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
    _add_run_options(p)
    p.set_defaults(func=cmd_compare)
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except (assets.AssetError, FileNotFoundError, ValueError) as exc:
        print(f"srlora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
