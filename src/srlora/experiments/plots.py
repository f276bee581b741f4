"""The paper's figures from a run's outputs: loss curves (Fig. 3), active intervals of
the SVD directions in one layer (Fig. 5), and their variance per layer (Fig. 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight"))
    finally:
        pyplot().close(fig)  # pyplot keeps every figure alive until closed; a study draws dozens
    return path


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (window shrinks at the start)."""
    x = np.asarray(values, dtype=float)
    if window <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: Path, title: str = "") -> Path:
    """Training loss per method: mean over seeds (line) and min-max band, smoothed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in curves.items():
        n = min(len(r) for r in runs)
        if n == 0:
            continue
        window = max(1, n // 25)
        arr = np.stack([smooth(r[:n], window) for r in runs])
        steps = np.arange(1, n + 1)
        ax.plot(steps, arr.mean(0), label=f"{method} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        if len(runs) > 1:
            ax.fill_between(steps, arr.min(0), arr.max(0), alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title(title or "Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def active_intervals(history: Mapping[str, Any], layer: str) -> dict[int, list[tuple[int, int]]]:
    """``{direction: [(enter, leave), ...]}`` for one layer from ``history.json``.

    Directions ``0..r-1`` enter at step 0; a switch at step ``t`` ends the evicted
    directions' intervals and starts the new ones'; whatever is still in a slot at the
    end is active until the last step.
    """
    r = int(history["r"])
    end = int(history["steps"])
    start: dict[int, int] = {j: 0 for j in range(r)}
    out: dict[int, list[tuple[int, int]]] = {}
    for ev in history["events"]:
        if ev["layer"] != layer:
            continue
        for j in ev["evicted"]:
            out.setdefault(j, []).append((start.pop(j), ev["step"]))
        for j in ev["directions"]:
            start[j] = ev["step"]
    for j, s in start.items():
        out.setdefault(j, []).append((s, end))
    return dict(sorted(out.items()))


def interval_lengths(history: Mapping[str, Any], layer: str) -> np.ndarray:
    return np.array([sum(b - a for a, b in spans) for spans in active_intervals(history, layer).values()], float)


def layers_of(history: Mapping[str, Any]) -> list[str]:
    return list(history["slot_directions"])


def plot_active_intervals(history: Mapping[str, Any], layer: str, path: Path) -> Path:
    """Fig. 5: one horizontal bar per SVD direction of ``layer`` while it was trainable."""
    plt = pyplot()
    spans = active_intervals(history, layer)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.18 * len(spans) + 1)))
    for j, intervals in spans.items():
        ax.broken_barh([(a, max(b - a, 0.5)) for a, b in intervals], (j - 0.4, 0.8), color="tab:orange")
    ax.set_xlim(0, int(history["steps"]))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("singular direction of W0 (0 = largest)")
    ax.invert_yaxis()
    ax.set_title(f"Active intervals: {layer}")
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_interval_variance(history: Mapping[str, Any], path: Path) -> Path:
    """Fig. 4: variance of the directions' active-interval lengths, per layer."""
    plt = pyplot()
    layers = layers_of(history)
    var = [float(interval_lengths(history, name).var()) for name in layers]
    labels = [_short(name) for name in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers) + 2), 4))
    ax.bar(range(len(layers)), var, color="tab:blue")
    ax.set_xticks(range(len(layers)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("variance of active interval (steps²)")
    ax.set_title("Variance of active intervals per layer")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def _short(name: str) -> str:
    for prefix in ("base_model.model.", "model.", "encoder.layer."):
        name = name.replace(prefix, "")
    return name.replace("attention.self.", "attn.").replace("attention.output.dense", "attn.out")
