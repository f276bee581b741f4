"""docs/RESULTS.md, the 600-step study (issue 13): its sections, one function each."""

from __future__ import annotations

from pathlib import Path


def render_long(root: Path, seeds: list[int]) -> list[str]:
    """The sections of the 600-step study (none before its first finished run)."""
    return []
