"""Intervals for numbers that come from a random process (probe batches, training seeds).

For n independent values x_1..x_n (one per prompt batch or per seed) with mean m and sample
standard deviation s, the Student-t interval at confidence c is

    m -+ t_{(1+c)/2, n-1} s / sqrt(n),

exact for normal values and a good approximation for means of many rollouts. A paired
comparison of two estimators run on the same seeds (or batches) uses the differences
d_i = a_i - b_i: the same interval for mean(d) and the two-sided p-value of the paired
t-test, 2 P(T_{n-1} > |mean(d)| / (sd(d) / sqrt(n))). With n < 2 the interval is
undefined (NaN bounds), never a spurious zero width.

Ratios (a variance over opd's on the same rollouts) are multiplicative: their interval is the
t-interval of log x, exponentiated, around the geometric mean exp(mean log x). It stays
positive, and a ratio r and its inverse 1/r get mirror-image intervals.

The power of a paired comparison is reported as the smallest difference it would detect: for
paired differences with sample sd s over n seeds, (t_{1-alpha/2, n-1} + t_{power, n-1}) s / sqrt(n)
is the true mean difference that a two-sided t-test at level alpha rejects with probability
``power`` (the usual approximation that ignores the non-central t).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
from scipy import stats


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean of independent ``values``."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def ratio_interval(ratios: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """(geometric mean, low, high) of positive ``ratios``: ``mean_interval`` of their logs, exponentiated."""
    x = np.asarray(ratios, dtype=np.float64)
    if np.any(x <= 0):
        raise ValueError(f"ratios must be positive, got {x[x <= 0][:3].tolist()}")
    return tuple(float(np.exp(v)) for v in mean_interval(np.log(x), confidence))


def t_test_p_value(values: Sequence[float], null: float = 0.0) -> float:
    """Two-sided p-value of the one-sample t-test of H0: E x = ``null`` (NaN with fewer than 2 values;
    0 or 1 when the values do not vary)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)] - null
    if x.size < 2:
        return math.nan
    sd = x.std(ddof=1)
    if sd == 0:
        return 1.0 if np.all(x == 0) else 0.0
    return float(2 * stats.t.sf(abs(x.mean()) / (sd / math.sqrt(x.size)), x.size - 1))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """mean(a - b) with its t-interval and the paired t-test p-value; ``a`` and ``b`` aligned by seed."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.shape} and {b.shape}")
    d = a - b
    mean, low, high = mean_interval(d, confidence)
    return {"mean": mean, "low": low, "high": high, "p_value": t_test_p_value(d),
            "n": int(np.isfinite(d).sum())}


def detectable_difference(d: Sequence[float], power: float = 0.8, alpha: float = 0.05) -> float:
    """(t_{1-alpha/2, n-1} + t_{power, n-1}) sd(d) / sqrt(n): the paired difference a two-sided t-test at level
    ``alpha`` would detect with probability ``power``, for paired differences spread like ``d`` (NaN if n < 2)."""
    x = np.asarray(d, dtype=np.float64)
    if x.size < 2:
        return math.nan
    return float((stats.t.ppf(1 - alpha / 2, x.size - 1) + stats.t.ppf(power, x.size - 1)) * x.std(ddof=1)
                 / math.sqrt(x.size))
