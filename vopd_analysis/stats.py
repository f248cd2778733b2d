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

A rate k/n (a test's rejections over n runs) gets the exact Clopper-Pearson interval
(``clopper_pearson``). Of two estimators x and y of one target, the mean of B draws of x has the
lower mean squared error for the batch sizes ``mse_crossover`` names, from their squared biases
and trace variances (MSE of a batch-B mean: |bias|^2 + tr Cov / B).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
from scipy import stats


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """Student-t confidence interval of the mean of independent values.

    mean -+ t_{(1+c)/2, n-1} s / sqrt(n), with s the sample standard deviation (ddof 1)
    of the n finite values (NaN and inf are dropped first).

    Args:
      values: independent values x_1..x_n (one per seed or prompt batch), [n].
      confidence: the confidence level c, in (0, 1).

    Returns:
      (mean, low, high) as floats; low and high are NaN with fewer than 2 finite values,
      all three NaN with none.
    """
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
    """Confidence interval of a multiplicative quantity (a variance ratio) around its geometric mean.

    ``mean_interval`` of log x, exponentiated: the centre is exp(mean log x), the bounds stay
    positive, and 1/x gets the mirror-image interval.

    Args:
      ratios: positive values x_1..x_n, [n]; a value <= 0 raises ``ValueError``.
      confidence: the confidence level c, in (0, 1).

    Returns:
      (geometric mean, low, high) as floats (NaN bounds with fewer than 2 finite values).
    """
    x = np.asarray(ratios, dtype=np.float64)
    if np.any(x <= 0):
        raise ValueError(f"ratios must be positive, got {x[x <= 0][:3].tolist()}")
    return tuple(float(np.exp(v)) for v in mean_interval(np.log(x), confidence))


def t_test_p_value(values: Sequence[float], null: float = 0.0) -> float:
    """Two-sided p-value of the one-sample t-test of H0: E x = ``null``.

    p = 2 P(T_{n-1} > |mean(x) - null| / (s / sqrt(n))), s the sample standard deviation
    of the n finite values (NaN and inf are dropped first).

    Args:
      values: independent values x_1..x_n, [n].
      null: the mean under H0.

    Returns:
      The p-value as a float: NaN with fewer than 2 finite values; when they do not vary
      (s = 0), 1.0 if all equal ``null`` and 0.0 otherwise.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)] - null
    if x.size < 2:
        return math.nan
    sd = x.std(ddof=1)
    if sd == 0:
        return 1.0 if np.all(x == 0) else 0.0
    return float(2 * stats.t.sf(abs(x.mean()) / (sd / math.sqrt(x.size)), x.size - 1))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired comparison of two estimators run on the same seeds (or batches).

    On the differences d_i = a_i - b_i: ``mean_interval(d)`` and the paired t-test of
    H0: E d = 0, p = 2 P(T_{n-1} > |mean(d)| / (sd(d) / sqrt(n))).

    Args:
      a: values of the first estimator, [n], aligned by seed with ``b``.
      b: values of the second estimator, [n]; another shape raises ``ValueError``.
      confidence: the confidence level of the interval, in (0, 1).

    Returns:
      {"mean", "low", "high", "p_value", "n"}: mean(d) with its interval, the p-value, and n,
      the number of finite differences used (non-finite ones are dropped).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.shape} and {b.shape}")
    d = a - b
    mean, low, high = mean_interval(d, confidence)
    return {"mean": mean, "low": low, "high": high, "p_value": t_test_p_value(d),
            "n": int(np.isfinite(d).sum())}


def detectable_difference(d: Sequence[float], power: float = 0.8, alpha: float = 0.05) -> float:
    """Minimum detectable difference of a paired t-test.

    (t_{1-alpha/2, n-1} + t_{power, n-1}) sd(d) / sqrt(n): the true mean difference that a
    two-sided t-test at level ``alpha`` rejects with probability ``power``, for paired
    differences spread like ``d`` (the usual approximation that ignores the non-central t).

    Args:
      d: observed paired differences, [n] (not filtered: a NaN makes the result NaN).
      power: the probability of rejecting, in (0, 1).
      alpha: the test's level, in (0, 1).

    Returns:
      The difference as a float, in the units of ``d`` (NaN if n < 2).
    """
    x = np.asarray(d, dtype=np.float64)
    if x.size < 2:
        return math.nan
    return float((stats.t.ppf(1 - alpha / 2, x.size - 1) + stats.t.ppf(power, x.size - 1)) * x.std(ddof=1)
                 / math.sqrt(x.size))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Tuple[float, float]:
    """Exact (Clopper-Pearson) confidence interval of a binomial rate k / n.

    Args:
      k: successes (rejections), 0 <= k <= n.
      n: trials (runs).
      confidence: the confidence level, in (0, 1).

    Returns:
      (low, high) as floats; (NaN, NaN) when n = 0.
    """
    if n == 0:
        return math.nan, math.nan
    ci = stats.binomtest(k, n).proportion_ci(confidence, method="exact")
    return float(ci.low), float(ci.high)


# |d_v| at most this share of var_y counts as no variance difference (round-off of two trace variances)
VARIANCE_TIE = 1e-9


def mse_crossover(bias_sq_x: float, var_x: float, bias_sq_y: float, var_y: float,
                  same_mean: bool) -> Tuple[float, str]:
    """The batch sizes B at which the mean of B draws of x has a lower MSE than that of y (same target).

    With d_b = |bias_x|^2 - |bias_y|^2 and d_v = var_y - var_x, MSE_x(B) < MSE_y(B) iff d_b < d_v / B:
    x wins for B < B* = d_v / d_b when d_b > 0 < d_v ("below"), at every B when d_b <= 0 <= d_v, not
    both 0 ("always"), at no B when d_b >= 0 >= d_v ("never"), for B > B* when d_b < 0 > d_v ("above"),
    and "tie" when both vanish. d_v is taken as 0 when |d_v| <= ``VARIANCE_TIE`` var_y.

    Args:
      bias_sq_x, var_x: |E g_x - target|^2 and tr Cov(g_x).
      bias_sq_y, var_y: the same for y.
      same_mean: E g_x = E g_y up to round-off: then d_b = 0 exactly, not the difference of two
        rounded squared norms.

    Returns:
      (B*, regime): B* is NaN for "tie", inf for "always" and 0.0 for "never".
    """
    d_b, d_v = (0.0 if same_mean else bias_sq_x - bias_sq_y), var_y - var_x
    if abs(d_v) <= VARIANCE_TIE * var_y:
        d_v = 0.0
    if d_b == 0.0 and d_v == 0.0:
        return math.nan, "tie"
    if d_b > 0 and d_v > 0:
        return d_v / d_b, "below"
    if d_b < 0 and d_v < 0:
        return d_v / d_b, "above"
    if d_b <= 0 <= d_v:
        return math.inf, "always"
    return 0.0, "never"
