"""Intervals for reported results: Wilson for counts, the percentile bootstrap for statistics
of samples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats as scipy_stats


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (Wilson 1927); (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    z = scipy_stats.norm.ppf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def bootstrap(
    statistic: Callable[..., float],
    *samples: np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*samples)`, resampling the rows of all
    `samples` together (paired data stay paired)."""
    rng = np.random.default_rng(seed)
    n = len(samples[0])
    values = []
    for _ in range(n_resamples):
        rows = rng.integers(0, n, n)
        values.append(statistic(*(np.asarray(s)[rows] for s in samples)))
    alpha = (1 - confidence) / 2
    lo, hi = np.nanpercentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)
