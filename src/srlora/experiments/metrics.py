"""GLUE's metrics, from scikit-learn and SciPy (not hand-rolled)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def compute_metrics(names: Sequence[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Each metric in ``names`` over ``predictions`` (class ids, or floats for regression)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions))
        elif name == "matthews":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = float(pearsonr(predictions, labels)[0])
        elif name == "spearman":
            out[name] = float(spearmanr(predictions, labels)[0])
        else:
            raise ValueError(f"unknown metric {name!r}")
    return out
