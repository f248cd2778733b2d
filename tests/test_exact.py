"""Exact engine: targets against autograd references, estimator moments against a per-sequence loop."""

import pytest
import torch

from synthetic.tree import bandit, check_enumerable, make_tree
from vopd_analysis import InputError
from vopd_analysis import estimators as est
from vopd_analysis.tabular import analysis, enumeration, targets

D = torch.float64


def slow_targets(tree):
    """J, grad J, g_tok and the forward-KL token gradient by plain autograd over all sequences."""
    theta = torch.tensor(tree.student_logits, requires_grad=True)
    log_p = torch.log_softmax(torch.tensor(tree.teacher_logits), -1)
    tokens = tree.sequences()
    states = tree.state_ids(tokens)
    log_q = torch.log_softmax(theta, -1)
    lq = log_q[states].gather(-1, tokens[..., None])[..., 0]
    lp = log_p[states].gather(-1, tokens[..., None])[..., 0]
    J = (lq.sum(-1).exp() * (lq - lp).sum(-1)).sum()
    (grad_J,) = torch.autograd.grad(J, theta, retain_graph=True)
    reach = targets.tree_quantities(tree).reach
    q = log_q.exp()
    tok = (reach * (q * (log_q - log_p)).sum(-1)).sum()
    (g_tok,) = torch.autograd.grad(tok, theta, retain_graph=True)
    fwd = (reach * (log_p.exp() * (log_p - log_q)).sum(-1)).sum()
    (g_fwd,) = torch.autograd.grad(fwd, theta)
    return J.item(), grad_J, g_tok, g_fwd


TREE = make_tree(3, 3, coupling=1.0, divergence=1.0, seed=1)
# every single-sequence registered estimator (new ones are picked up), plus non-default parameters
SPECS = analysis.default_specs(k=2) | {"opd_rho": {"name": "opd", "rho": 0.5}, "vopd_rho": {"name": "vopd", "rho": 0.5},
                                       "iw_opd_g1": {"name": "iw_opd", "gamma": 1.0},
                                       "vopd_scaled_half": {"name": "vopd_scaled", "alpha": 0.5},
                                       "topk_tail_k1": {"name": "topk_tail_kl", "k": 1}}


def test_closed_form_targets_match_autograd():
    J, grad_J, g_tok, g_fwd = slow_targets(TREE)
    tq = targets.tree_quantities(TREE)
    assert abs(tq.sequence_kl - J) < 1e-12
    assert torch.allclose(tq.grad_sequence, grad_J, atol=1e-13)
    assert torch.allclose(tq.grad_token, g_tok, atol=1e-13)
    assert torch.allclose(tq.grad_forward_token, g_fwd, atol=1e-13)
    assert torch.linalg.norm(tq.grad_future) > 0.05 * torch.linalg.norm(tq.grad_sequence)


def test_bandit_closed_form():
    b = bandit(5, seed=3)
    tq = targets.tree_quantities(b)
    q = torch.softmax(torch.tensor(b.student_logits[0]), -1)
    l = torch.log_softmax(torch.tensor(b.student_logits[0]), -1) - torch.log_softmax(torch.tensor(b.teacher_logits[0]), -1)
    kl = (q * l).sum()
    assert abs(tq.sequence_kl - float(kl)) < 1e-14
    assert torch.allclose(tq.grad_sequence[0], q * (l - kl))
    assert torch.allclose(tq.grad_token, tq.grad_sequence)


@pytest.mark.parametrize("label", list(SPECS))
def test_vectorised_engine_matches_slow_reference(label):
    spec = dict(SPECS[label])
    name = spec.pop("name")
    moments = enumeration.exact_moments(TREE, {label: {"name": name, **spec}}, chunk_size=7)[label]
    reference = enumeration.reference_moments(TREE, name, **spec)
    assert torch.allclose(moments.mean, reference.mean, atol=1e-13)
    assert abs(moments.total_variance - reference.total_variance) < 1e-11 * max(1.0, reference.total_variance)
    assert abs(moments.position_variance.sum() - moments.total_variance) < 1e-12


def test_every_estimator_hits_its_target_and_biased_ones_miss():
    tq = targets.tree_quantities(TREE)
    moments = enumeration.exact_moments(TREE, SPECS)
    for label, m in moments.items():
        target = est.get(SPECS[label]["name"]).target_for(**{k: v for k, v in SPECS[label].items() if k != "name"})
        vector = targets.target_gradient(tq, target)
        if vector is not None:
            assert targets.bias_report(m.mean, vector)["l2"] < 1e-13, label
    # known biases, measured relative to the target's norm
    rel = lambda label, vec: targets.bias_report(moments[label].mean, vec)["relative"]
    assert rel("opd", tq.grad_sequence) > 0.05             # token-level vs sequence target under coupling
    assert rel("topk_kl", tq.grad_token) > 0.05 and rel("topk_kl", tq.grad_sequence) > 0.05
    assert rel("k3", tq.grad_token) > 0.05                   # forward KL, not reverse
    assert rel("k1", tq.grad_token) > 0.99                   # mean zero
    assert rel("gkd_jsd", tq.grad_token) > 0.05
    assert rel("rb_seq", tq.grad_token) > 0.05
    for label in ("iw_opd", "iw_opd_g1", "opd_rho", "vopd_rho", "k3_clamped", "topk_tail_k1", "student_topk_kl"):
        assert rel(label, tq.grad_token) > 1e-3 and rel(label, tq.grad_sequence) > 1e-3, label   # unbiased for neither
    # the baselines change the variance, never the mean: b*, b*_k and alpha KL all give g_tok
    for label in ("opd_bstar", "opd_bstar_topk", "vopd_scaled_half"):
        assert rel(label, tq.grad_token) < 1e-12, label
    # k = V - 1 plus the tail bucket is the whole vocabulary: topk_tail_kl is then full_kl
    assert TREE.vocab == 3 and rel("topk_tail_kl", tq.grad_token) < 1e-12
    # b* minimises the logit-space variance among state baselines
    assert moments["opd_bstar"].total_variance <= min(moments[n].total_variance for n in ("opd", "vopd", "vopd_scaled_half"))


def test_no_coupling_makes_token_level_unbiased_for_sequence():
    tree = make_tree(3, 3, coupling=0.0, seed=2)
    tq = targets.tree_quantities(tree)
    assert torch.linalg.norm(tq.grad_future) < 1e-14
    m = enumeration.exact_moments(tree, {"opd": {"name": "opd"}})["opd"]
    assert targets.bias_report(m.mean, tq.grad_sequence)["l2"] < 1e-13


def test_discount_between_zero_and_one_is_biased_for_both():
    tq = targets.tree_quantities(TREE)
    m = enumeration.exact_moments(TREE, {"r": {"name": "rtg", "gamma": 0.5}})["r"]
    assert targets.bias_report(m.mean, tq.grad_sequence)["relative"] > 0.01
    assert targets.bias_report(m.mean, tq.grad_token)["relative"] > 0.01


def test_group_estimators_by_tuple_enumeration():
    tree = make_tree(2, 2, coupling=1.0, seed=3)
    tq = targets.tree_quantities(tree)
    rloo = enumeration.exact_group_moments(tree, "seq_rloo", group_size=3)
    grpo = enumeration.exact_group_moments(tree, "seq_grpo", group_size=3)
    grpo_std = enumeration.exact_group_moments(tree, "seq_grpo", group_size=3, scale_std=True)
    assert targets.bias_report(rloo.mean, tq.grad_sequence)["l2"] < 1e-14
    assert targets.bias_report(grpo.mean, tq.grad_sequence * 2 / 3)["l2"] < 1e-14
    assert targets.bias_report(grpo_std.mean, tq.grad_sequence)["cosine"] < 0.999


def test_analyse_json_shape_and_errors():
    result = analysis.analyse(make_tree(2, 2, seed=0), k=1)
    assert set(result) >= {"sequence_kl", "estimators"}
    assert len(result["estimators"]["vopd"]["mean_gradient"]) == 3 * 2
    with pytest.raises(InputError, match="Monte Carlo"):
        check_enumerable(40, 5)
    with pytest.raises(InputError, match="1 <= k <= V"):
        analysis.analyse(make_tree(2, 2, seed=0), k=3)
