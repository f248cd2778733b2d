"""Monte Carlo draws agree with the exact engine; the unbiasedness test's false-positive rate and power."""

import numpy as np
import pytest

from synthetic.tree import bandit, make_tree
from vopd_analysis import InputError, exact, montecarlo as mc

TREE = make_tree(3, 3, coupling=1.0, seed=1)
TQ = exact.tree_quantities(TREE)


def test_sample_mean_and_variance_agree_with_exact():
    draws = mc.sample_gradients(TREE, "vopd", 20000, seed=0)
    m = exact.exact_moments(TREE, {"v": {"name": "vopd"}})["v"]
    # E |mean - mu|^2 = tr Cov / n
    assert np.linalg.norm(draws.mean(0) - m.mean.numpy().ravel()) < 3 * np.sqrt(m.total_variance / len(draws))
    low, high = mc.trace_covariance_ci(draws[:3000], n_resamples=199)
    assert low < m.total_variance < high or abs(mc.trace_covariance(draws) / m.total_variance - 1) < 0.05


@pytest.mark.parametrize("env", [bandit(4, seed=0), TREE], ids=["bandit", "tree"])
def test_false_positive_rate_at_stated_level(env):
    """Unbiased vopd against its exact target: rejections at alpha = 0.1 over 200 independent runs."""
    alpha, runs = 0.1, 200
    target = exact.tree_quantities(env).grad_token.numpy().ravel()
    rejections = sum(mc.unbiasedness_test(mc.sample_gradients(env, "vopd", 200, seed=s), target,
                                          alpha=alpha, seed=s).reject for s in range(runs))
    # Bonferroni keeps the rate at or below alpha; allow 3 binomial standard errors above it
    assert rejections / runs <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)


@pytest.mark.parametrize("name, target, params", [
    ("topk_kl", "grad_token", {"k": 2}),          # biased objective
    ("opd", "grad_sequence", {}),                 # token-level vs the sequence target
    ("vopd", "grad_sequence", {}),
    ("k3", "grad_token", {}),                     # forward KL
    ("seq_grpo", "grad_sequence", {"group_size": 3}),  # (K-1)/K rescaling
])
def test_power_detects_known_biases(name, target, params):
    draws = mc.sample_gradients(TREE, name, 3000, seed=1, **params)
    assert mc.unbiasedness_test(draws, getattr(TQ, target).numpy().ravel(), alpha=0.01).reject


def test_unbiased_estimators_pass_at_large_n():
    for name, target, params in [("rtg", "grad_sequence", {}), ("seq_rloo", "grad_sequence", {"group_size": 3}),
                                 ("full_kl", "grad_token", {}), ("k3", "grad_forward_token", {})]:
        draws = mc.sample_gradients(TREE, name, 3000, seed=2, **params)
        assert not mc.unbiasedness_test(draws, getattr(TQ, target).numpy().ravel(), alpha=0.001).reject, name


def test_deterministic_estimator_and_errors():
    b = bandit(4, seed=0)
    tq = exact.tree_quantities(b)
    draws = mc.sample_gradients(b, "full_kl", 10, seed=0)  # no sampling noise at horizon 1
    assert not mc.unbiasedness_test(draws, tq.grad_token.numpy().ravel()).reject
    biased = mc.sample_gradients(b, "topk_kl", 10, seed=0, k=2)
    assert mc.unbiasedness_test(biased, tq.grad_token.numpy().ravel()).reject
    with pytest.raises(InputError, match="at least 3"):
        mc.unbiasedness_test(draws[:2], tq.grad_token.numpy().ravel())
