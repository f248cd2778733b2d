"""Baseline quality: the closed-form quadratic agrees with the exact engine, and b* is optimal."""

import numpy as np
import torch

from synthetic.tree import make_tree
from vopd_analysis.tabular import baseline_quality as baselines
from vopd_analysis.tabular import enumeration, targets

TREE = make_tree(3, 3, coupling=1.0, seed=1)


def test_closed_form_variance_matches_exact_engine():
    tq = targets.tree_quantities(TREE)
    m = enumeration.exact_moments(TREE, {n: {"name": n} for n in ("opd", "vopd", "opd_bstar")}
                            | {"topk": {"name": "vopd_topk", "k": 2}})
    S = TREE.num_states
    assert np.isclose(baselines.baseline_variance(TREE, np.zeros(S)), m["opd"].total_variance, rtol=1e-12)
    assert np.isclose(baselines.baseline_variance(TREE, tq.kl), m["vopd"].total_variance, rtol=1e-12)
    assert np.isclose(baselines.baseline_variance(TREE, baselines.optimal_baseline(tq)),
                      m["opd_bstar"].total_variance, rtol=1e-12)
    assert np.isclose(baselines.baseline_variance(TREE, baselines.topk_baseline(TREE, 2)),
                      m["topk"].total_variance, rtol=1e-12)


def test_optimal_baseline_is_optimal_and_gap_is_quadratic():
    tq = targets.tree_quantities(TREE)
    b_star = baselines.optimal_baseline(tq)
    v_star = baselines.baseline_variance(TREE, b_star)
    q = tq.log_q.exp()
    mass = (q * (1 - 2 * q + (q * q).sum(-1, keepdim=True))).sum(-1)  # E_y |e_y - q|^2
    rng = np.random.default_rng(0)
    for _ in range(5):
        b = b_star + torch.tensor(rng.normal(size=TREE.num_states))
        gap = float((tq.reach * mass * (b - b_star) ** 2).sum())
        assert np.isclose(baselines.baseline_variance(TREE, b) - v_star, gap, rtol=1e-10)


def test_quality_report_flags_a_baseline_that_adds_variance():
    report = baselines.baseline_quality(TREE)
    assert report["var_optimal"] <= min(report["var_no_baseline"], report["var_baseline"])
    # in this tree vOPD's KL baseline sits farther from b* than zero does
    assert report["reduction_ratio"] > 1 and report["explained_variance"] < 0
    close = make_tree(4, 2, divergence=0.3, seed=0)
    assert baselines.baseline_quality(close)["reduction_ratio"] < 1
