"""The dynamic-programming engine agrees with enumeration, on prefix trees and on Markov chains."""

import numpy as np
import pytest
import torch

from synthetic.markov import make_markov
from synthetic.tree import make_tree
from vopd_analysis import InputError
from vopd_analysis import estimators as est
from vopd_analysis.tabular import analysis, dp, enumeration, targets

# every registered estimator with a DP (its credit is defined), plus non-default parameters
SPECS = {label: spec for label, spec in (analysis.default_specs(k=2) | {
    "rtg_half": {"name": "rtg", "gamma": 0.5}, "vopd_scaled_half": {"name": "vopd_scaled", "alpha": 0.5}}).items()
    if analysis.dp_applies(spec)}


@pytest.mark.parametrize("tree", [make_tree(3, 3, coupling=1.0, seed=1),
                                  make_tree(4, 2, teacher_shape="zipf", coupling=0.5, seed=2)],
                         ids=["gaussian", "zipf"])
def test_dp_equals_enumeration_on_trees(tree):
    enumerated = enumeration.exact_moments(tree, SPECS)
    programmed = dp.dp_moments(tree, SPECS, chunk_rows=40)
    for label in SPECS:
        assert torch.allclose(enumerated[label].mean, programmed[label].mean, atol=1e-14), label
        assert np.allclose(enumerated[label].position_variance, programmed[label].position_variance,
                           rtol=1e-11, atol=1e-14), label


def test_dp_on_markov_chain_equals_its_expanded_tree():
    chain = make_markov(3, 4, coupling=1.0, seed=2)
    tree = chain.to_tree()
    fold = torch.as_tensor(chain.tree_to_markov())
    enumerated = enumeration.exact_moments(tree, SPECS)
    programmed = dp.dp_moments(chain, SPECS)
    tq_chain, tq_tree = targets.tree_quantities(chain), targets.tree_quantities(tree)
    assert abs(tq_chain.sequence_kl - tq_tree.sequence_kl) < 1e-13
    assert torch.allclose(torch.zeros_like(tq_chain.grad_sequence).index_add_(0, fold, tq_tree.grad_sequence),
                          tq_chain.grad_sequence, atol=1e-14)
    for label in SPECS:
        folded = torch.zeros_like(programmed[label].mean).index_add_(0, fold, enumerated[label].mean)
        assert torch.allclose(folded, programmed[label].mean, atol=1e-14), label
        # E|g|^2 is the same in both parameterisations (a sequence's positions are distinct states);
        # the variances differ only by the squared norms of the means
        second_tree = enumerated[label].total_variance + float((enumerated[label].mean ** 2).sum())
        second_chain = programmed[label].total_variance + float((folded ** 2).sum())
        assert abs(second_tree - second_chain) < 1e-11 * max(1.0, second_tree), label


def test_long_horizon_markov_targets():
    chain = make_markov(4, 120, coupling=1.0, seed=0)
    moments = dp.dp_moments(chain, {"opd": {"name": "opd"}, "rtg": {"name": "rtg"}, "full_kl": {"name": "full_kl"}})
    tq = targets.tree_quantities(chain)
    assert targets.bias_report(moments["opd"].mean, tq.grad_token)["l2"] < 1e-12
    assert targets.bias_report(moments["rtg"].mean, tq.grad_sequence)["l2"] < 1e-12
    assert moments["rtg"].total_variance > moments["opd"].total_variance > moments["full_kl"].total_variance
    assert moments["opd"].position_variance.shape == (120,)


def test_dp_covers_every_registered_estimator_that_has_a_credit():
    names = {spec["name"] for spec in SPECS.values()}
    assert names == {e.name for e in est.REGISTRY.values() if e.credit_for() is not None}
    assert {"opd", "vopd", "opd_bstar", "opd_bstar_topk", "vopd_scaled", "rtg_vopd", "rb_seq", "k3_clamped"} <= names


@pytest.mark.parametrize("spec", [{"name": "iw_opd"}, {"name": "opd", "rho": 0.5}])
def test_sequence_dependent_weights_and_masks_are_refused(spec):
    with pytest.raises(InputError, match="no DP; use tabular.enumeration"):
        dp.dp_moments(make_tree(2, 2), {"x": spec})


def test_group_estimators_are_refused():
    with pytest.raises(InputError, match="exact_group_moments"):
        dp.dp_moments(make_tree(2, 2), {"g": {"name": "seq_rloo", "group_size": 2}})
