"""Command-line options of a run, built from the fields of :class:`RunConfig` and of
:class:`srlora.SRLoRAConfig` (their type hints give each option's type or choices, their
``help`` metadata its help text), and the flat values they parse into."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ..config import SRLoRAConfig
from .config import METHODS, PASSTHROUGH, PRESETS, RUNNER_OWNED, RunConfig, apply_preset

_RUN_FIELDS = [f for f in dataclasses.fields(RunConfig) if f.name not in ("method", "srlora")]
_SRLORA_FIELDS = [f for f in dataclasses.fields(SRLoRAConfig) if f.name in PASSTHROUGH]


def _option(p: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    """One ``--name`` option from a dataclass field: its type hint and help text."""
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and typing.get_origin(hint) is not typing.Literal else hint
    if base is bool:  # a field that defaults to True is turned off with --no-NAME
        action = argparse.BooleanOptionalAction if f.default is True else "store_true"
        p.add_argument(flag, action=action, default=None, help=help_text)
    elif typing.get_origin(base) is typing.Literal:
        p.add_argument(flag, choices=typing.get_args(base), default=None, help=help_text)
    elif typing.get_origin(base) is list:
        p.add_argument(flag, type=_comma_list, default=None, help=help_text + " Comma-separated.")
    else:
        p.add_argument(flag, type=base, default=None, help=help_text)


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def srlora_passthrough(own: tuple[str, ...] | list[str] = ()) -> list[dataclasses.Field]:
    """The ``SRLoRAConfig`` fields a runner passes through as options of the same name: all of
    them but :data:`RUNNER_OWNED` and the runner's ``own`` fields (a new field of the config is
    an option of every runner with no edit here)."""
    return [f for f in dataclasses.fields(SRLoRAConfig) if f.name not in RUNNER_OWNED and f.name not in own]


def add_srlora_options(p: argparse.ArgumentParser, own: tuple[str, ...] | list[str] = ()) -> list[str]:
    """An option for each :func:`srlora_passthrough` field (its type hint, its help text;
    default ``None``: not given); returns their names."""
    group = p.add_argument_group("SRLoRA (the fields of srlora.SRLoRAConfig)")
    hints = typing.get_type_hints(SRLoRAConfig)
    fields = srlora_passthrough(own)
    for f in fields:
        _option(group, f, hints[f.name])  # type: ignore[arg-type]
    return [f.name for f in fields]


def srlora_given(ns: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The SRLoRA options given on the command line, at values other than the config's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(SRLoRAConfig)}
    return {n: v for n in names if (v := getattr(ns, n, None)) is not None and v != defaults[n]}


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"Start from a preset: {', '.join(sorted(PRESETS))} (options given win).")
    hints = typing.get_type_hints(RunConfig)
    for f in _RUN_FIELDS:
        _option(p, f, hints[f.name])
    group = p.add_argument_group("SRLoRA (the fields of srlora.SRLoRAConfig)")
    hints = typing.get_type_hints(SRLoRAConfig)
    for f in _SRLORA_FIELDS:
        _option(group, f, hints[f.name])  # type: ignore[arg-type]


def run_values(ns: argparse.Namespace, default_preset: str | None) -> dict[str, Any]:
    """The flat run values of parsed options: the preset's, then the options given."""
    names = [f.name for f in _RUN_FIELDS] + list(PASSTHROUGH)
    overrides = {name: getattr(ns, name) for name in names if getattr(ns, name, None) is not None}
    preset = ns.preset or default_preset
    if preset is None:
        return overrides
    task_name = overrides.get("task") or PRESETS.get(preset, {}).get("task")
    train_size = None
    if preset.startswith("paper-") and "max_steps" not in overrides:
        from .tasks import load_task

        train_size = len(load_task(task_name or "mr", overrides.get("data_dir")).train)
    return apply_preset(preset, overrides, train_size)


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The options of ``srlora train`` besides the run's own."""
    p.add_argument("--method", default="srlora", choices=METHODS, help="lora, pissa or srlora.")
    p.add_argument("--out", help="Output folder (default: runs/TASK-METHOD-seedS).")
    p.add_argument("--overwrite", action="store_true", help="Replace a run already in --out.")
    p.add_argument(
        "--resume", action="store_true", help="Keep the run in --out if it finished with the same configuration."
    )


def train_config(argv: list[str]) -> RunConfig:
    """The configuration ``srlora train ARGV`` runs (the study compares runs with it)."""
    p = argparse.ArgumentParser(prog="srlora train", add_help=False)
    add_train_options(p)
    add_run_options(p)
    ns = p.parse_args(argv)
    return RunConfig.from_flat({"method": ns.method, **run_values(ns, None)})


def fields_table() -> str:
    """Every :class:`SRLoRAConfig` field as a Markdown table (name, default, help): the table in
    docs/API.md (a test keeps the two in step)."""
    rows = ["| field | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(SRLoRAConfig):
        default = "required" if f.default is dataclasses.MISSING else f"`{f.default!r}`"
        help_ = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | {default} | {help_} |")
    return "\n".join(rows)
