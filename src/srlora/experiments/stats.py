"""Summary statistics of runs over seeds, and the rules that compare two methods."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count; NaNs for none."""
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def fmt(ms: tuple[float, float, int], digits: int = 3) -> str:
    """``mean ± std``, or the mean alone where one value gives no spread."""
    m, s, n = ms
    if n == 0:
        return "n/a"
    return f"{m:.{digits}f}" if n < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


def verdict(a: tuple[float, float, int], b: tuple[float, float, int], higher_is_better: bool) -> str:
    """``win``/``loss`` of ``a`` against ``b`` when the means differ by more than twice the
    standard error of the difference (sqrt(s_a^2/n_a + s_b^2/n_b)), else ``tie``."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < 2 or nb < 2:
        return "n/a (fewer than 2 seeds)"
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    d = ma - mb if higher_is_better else mb - ma
    word = "tie" if abs(d) <= 2 * se else ("win" if d > 0 else "loss")
    return f"{word} ({'+' if d >= 0 else ''}{d:.3f}, 2·se {2 * se:.3f})"


def paired(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """Paired difference ``a - b`` over the seeds both have: mean, and the two-sided
    ``confidence`` interval of Student's t with n - 1 degrees of freedom (NaN for n < 2)."""
    from scipy.stats import t

    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def fmt_paired(d: tuple[float, float, float, int], digits: int = 3) -> str:
    """``+0.012 [-0.004, +0.028]``; the interval is left out for a single pair."""
    mean, lo, hi, n = d
    if n == 0:
        return "n/a"
    if n < 2:
        return f"{mean:+.{digits}f} (1 seed)"
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def beyond(d: tuple[float, float, float, int]) -> int:
    """+1 when the interval lies above zero, -1 below, 0 when it contains zero (or is unknown)."""
    _, lo, hi, n = d
    if n < 2 or math.isnan(lo):
        return 0
    return 1 if lo > 0 else -1 if hi < 0 else 0
