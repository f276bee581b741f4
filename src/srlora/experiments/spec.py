"""What identifies a run, for every runner: the one resume scheme.

A run is kept (not run again) when a finished run has the same identity. The identity is the
run's fields, each one the runner's first version recorded always, and any other only where it
differs from its default: a field added later (an SRLoRAConfig option, a new evaluation knob)
leaves every earlier run valid at its default, and makes a new run where it is set."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection
from typing import Any


def identity(values: dict[str, Any], defaults: dict[str, Any], first: Collection[str]) -> dict[str, Any]:
    """``values`` without the fields outside ``first`` that are at their ``defaults``."""
    return {k: v for k, v in values.items() if k in first or k not in defaults or v != defaults[k]}


def digest(spec: Any, first: Collection[str]) -> str:
    """A dataclass run spec's identity, hashed (16 hex digits); ``first``: the fields its
    runner's first version recorded."""
    values = dataclasses.asdict(spec)
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(spec)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    kept = identity(values, defaults, first)
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
