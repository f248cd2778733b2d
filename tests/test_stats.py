"""vopd_analysis.stats: the binomial interval and the batch-size crossover, against closed forms."""

import math

import pytest

from vopd_analysis import stats


def test_clopper_pearson_at_the_ends_is_the_closed_form():
    # k = 0: the upper bound solves (1 - p)^n = alpha / 2; k = n: the lower bound solves p^n = alpha / 2
    for n in (1, 7, 400):
        low, high = stats.clopper_pearson(0, n)
        assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)
        low, high = stats.clopper_pearson(n, n)
        assert high == 1.0 and low == pytest.approx(0.025 ** (1 / n), rel=1e-9)
    low, high = stats.clopper_pearson(20, 400)
    assert low < 0.05 < high and high - low < 0.05
    assert all(math.isnan(x) for x in stats.clopper_pearson(0, 0))


def test_mse_crossover_regimes_and_the_batch_size_where_the_mses_meet():
    def mse(bias_sq, var, B):
        return bias_sq + var / B

    B, regime = stats.mse_crossover(0.1, 1.0, 0.0, 3.0, same_mean=False)   # biased, less variance
    assert regime == "below" and B == pytest.approx(20.0)
    assert mse(0.1, 1.0, B) == pytest.approx(mse(0.0, 3.0, B))
    assert mse(0.1, 1.0, B / 2) < mse(0.0, 3.0, B / 2) and mse(0.1, 1.0, 2 * B) > mse(0.0, 3.0, 2 * B)
    B, regime = stats.mse_crossover(0.0, 3.0, 0.1, 1.0, same_mean=False)   # the same pair, seen from y
    assert regime == "above" and B == pytest.approx(20.0)
    assert stats.mse_crossover(0.0, 1.0, 0.1, 3.0, same_mean=False) == (math.inf, "always")
    assert stats.mse_crossover(0.1, 3.0, 0.0, 1.0, same_mean=False) == (0.0, "never")
    assert stats.mse_crossover(0.1, 1.0, 0.1, 1.0 + 1e-12, same_mean=True)[1] == "tie"   # round-off only
    assert stats.mse_crossover(0.1 + 1e-17, 1.0, 0.1, 1.0, same_mean=True)[1] == "tie"
