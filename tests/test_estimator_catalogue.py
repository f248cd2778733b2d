"""The estimators beyond vOPD (b*, b*_k, vopd_scaled, iw_opd, top-k losses, clamped k3, token
selection): tiny hand-computed cases, limits that reduce them to known estimators, and the
sparse (top-k) fields against the full teacher logits."""

import math

import pytest
import torch

from vopd_analysis import InputError, TokenBatch, get, per_sequence
from vopd_analysis import divergences as dv
from vopd_analysis import estimators as est

D = torch.float64


def bandit(q, p, y):
    """One state, one token: student probabilities q, teacher p, sampled token y."""
    z = torch.tensor(q, dtype=D).log().reshape(1, 1, -1)
    t = torch.tensor(p, dtype=D).log().reshape(1, 1, -1)
    tlp = t.log_softmax(-1)[..., y]
    return TokenBatch(torch.tensor([[y]]), torch.ones(1, 1, dtype=D), z, tlp, teacher_logits=t)


def make_batch(B=3, T=4, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=D)
    t = torch.randn(B, T, V, generator=g, dtype=D)
    y = torch.randint(0, V, (B, T), generator=g)
    tlp = torch.log_softmax(t, -1).gather(-1, y[..., None])[..., 0]
    return TokenBatch(y, torch.ones(B, T, dtype=D), z, tlp, teacher_logits=t)


def grad_of(name, batch, **params):
    z = batch.student_logits.detach().clone().requires_grad_(True)
    per_sequence(name, TokenBatch(**{**batch.__dict__, "student_logits": z}), **params).sum().backward()
    return z.grad


def score(batch):
    return torch.nn.functional.one_hot(batch.tokens, batch.vocab_size).to(D) - torch.softmax(batch.student_logits, -1)


def log_ratio(batch):
    return dv.token_logprobs(batch.student_logits, batch.tokens) - batch.teacher_token_logprobs


Q, P = [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]


def hand_bstar(q, p):
    """b* = sum_y q_y |e_y - q|^2 l_y / sum_y q_y |e_y - q|^2, written out."""
    sq = sum(x * x for x in q)
    w = [qy * ((1 - qy) ** 2 + sq - qy * qy) for qy in q]          # |e_y - q|^2 = (1 - q_y)^2 + sum_{v != y} q_v^2
    return sum(wy * math.log(qy / py) for wy, qy, py in zip(w, q, p)) / sum(w)


def test_opd_bstar_hand_computed_and_fused_pass_matches_log_softmax():
    b = bandit(Q, P, y=1)
    expected = (math.log(0.3 / 0.5) - hand_bstar(Q, P)) * score(b)[0, 0]
    assert torch.allclose(grad_of("opd_bstar", b)[0, 0], expected, atol=1e-14)
    big = make_batch(B=2, T=3, V=50)
    for dtype in (torch.float64, torch.float32):
        z = big.student_logits.to(dtype)
        _, fused = dv.token_logprobs_and_optimal_baseline(z, big.tokens, big.teacher_logits.to(dtype))
        plain = dv.optimal_scalar_baseline(z.double().log_softmax(-1), big.teacher_logits.log_softmax(-1))
        assert torch.allclose(fused.double(), plain, atol=1e-13 if dtype == torch.float64 else 1e-5)


def test_opd_bstar_topk_with_full_support_is_opd_bstar_and_sparse_fields_agree():
    b = make_batch(V=6)
    assert torch.allclose(grad_of("opd_bstar_topk", b, k=6), grad_of("opd_bstar", b), atol=1e-13)
    ids = torch.topk(b.student_logits, 3, dim=-1).indices
    sparse = TokenBatch(b.tokens, b.mask, b.student_logits, b.teacher_token_logprobs, student_topk_ids=ids,
                        teacher_logprobs_on_student_topk=dv.logprobs_at(b.teacher_logits, ids))
    assert torch.allclose(grad_of("opd_bstar_topk", sparse, k=3), grad_of("opd_bstar_topk", b, k=3))
    # k = 2 on the bandit: b* of q and p renormalised on the student's top-2 = tokens {0, 1}
    b = bandit(Q, P, y=0)
    q2, p2 = [0.5 / 0.8, 0.3 / 0.8], [0.2 / 0.7, 0.5 / 0.7]
    expected = (math.log(0.5 / 0.2) - hand_bstar(q2, p2)) * score(b)[0, 0]
    assert torch.allclose(grad_of("opd_bstar_topk", b, k=2)[0, 0], expected, atol=1e-14)


def test_vopd_scaled_interpolates_opd_and_vopd():
    b = make_batch()
    assert torch.allclose(grad_of("vopd_scaled", b, alpha=0.0), grad_of("opd", b))
    assert torch.equal(grad_of("vopd_scaled", b), grad_of("vopd", b))
    kl = dv.reverse_kl(b.student_logits, b.teacher_logits)
    expected = (log_ratio(b) - 0.5 * kl).unsqueeze(-1) * score(b)
    assert torch.allclose(grad_of("vopd_scaled", b, alpha=0.5), expected, atol=1e-13)


def test_iw_opd_weights_by_hand():
    l = torch.tensor([[1.0, -2.0, 1.0, 0.0]], dtype=D)          # last position masked (l = 0)
    # |a| = 1, 2, 1; total 4; spent before t: 0, 1, 3, 4
    assert torch.allclose(est.position_weights(l, 0.5), torch.tensor([[1.5, 1.375, 1.125, 1.0]], dtype=D))
    assert torch.equal(est.position_weights(torch.zeros(1, 3, dtype=D), 0.5), torch.full((1, 3), 1.5, dtype=D))
    b = make_batch()
    w = est.position_weights(log_ratio(b), 0.5)
    assert torch.allclose(grad_of("iw_opd", b), (w * log_ratio(b)).unsqueeze(-1) * score(b), atol=1e-13)
    assert torch.allclose(grad_of("iw_opd", b, gamma=0.0), grad_of("opd", b))
    assert get("iw_opd").target_for() == "none" and get("iw_opd").target_for(gamma=0.0) == "token"
    with pytest.raises(InputError, match="finite gamma >= 0"):
        per_sequence("iw_opd", b, gamma=-1.0)


def test_topk_tail_kl_by_hand_and_full_support():
    b = bandit(Q, P, y=2)
    # k = 1: the student's top-1 is token 0; tail buckets 0.5 (student) and 0.8 (teacher)
    expected = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert math.isclose(per_sequence("topk_tail_kl", b, k=1).item(), expected, rel_tol=1e-12)
    big = make_batch(V=6)
    assert torch.allclose(per_sequence("topk_tail_kl", big, k=6), per_sequence("full_kl", big), atol=1e-12)
    assert torch.allclose(grad_of("topk_tail_kl", big, k=6), grad_of("full_kl", big), atol=1e-12)
    # the gradient, by autograd on the k + 1 buckets written out
    z = big.student_logits.clone().requires_grad_(True)
    ids = torch.topk(z.detach(), 3, -1).indices
    lq, lp = z.log_softmax(-1).gather(-1, ids), big.teacher_logits.log_softmax(-1).gather(-1, ids)
    tq, tp = 1 - lq.exp().sum(-1), 1 - lp.exp().sum(-1)
    ((lq.exp() * (lq - lp)).sum(-1) + tq * (tq.log() - tp.log())).sum().backward()
    assert torch.allclose(grad_of("topk_tail_kl", big, k=3), z.grad, atol=1e-13)


def test_student_topk_kl_by_hand_and_full_support():
    b = bandit(Q, P, y=2)
    q2, p2 = [0.5 / 0.8, 0.3 / 0.8], [0.2 / 0.7, 0.5 / 0.7]
    expected = sum(a * math.log(a / c) for a, c in zip(q2, p2))
    assert math.isclose(per_sequence("student_topk_kl", b, k=2).item(), expected, rel_tol=1e-12)
    big = make_batch(V=6)
    assert torch.allclose(grad_of("student_topk_kl", big, k=6), grad_of("full_kl", big), atol=1e-13)
    with pytest.raises(InputError, match="k must satisfy 1 <= k <= V = 6, got k=100"):
        per_sequence("student_topk_kl", big)


def test_k3_clamped_equals_k3_until_a_clamp_binds():
    b = make_batch()
    mild = TokenBatch(**{**b.__dict__, "student_logits": 0.3 * b.student_logits})
    x = -log_ratio(mild)                                                              # log rho
    assert x.abs().max() < 20 and (x.exp() - x - 1).max() < 10                        # no clamp binds
    assert torch.allclose(grad_of("k3_clamped", mild), grad_of("k3", mild), atol=1e-13)
    assert not torch.allclose(grad_of("k3_clamped", b), grad_of("k3", b))        # here e^x - x - 1 > 10 somewhere
    # log rho = log p(y) - log q(y) = 25 > 20: the log-ratio clamp binds and the value clamp too
    z = torch.tensor([[[0.0, 25.0]]], dtype=D)
    t = torch.tensor([[[25.0, 0.0]]], dtype=D)
    far = TokenBatch(torch.tensor([[0]]), torch.ones(1, 1, dtype=D), z, t.log_softmax(-1)[..., 0], teacher_logits=t)
    assert per_sequence("k3_clamped", far).item() == 10.0
    assert torch.equal(grad_of("k3_clamped", far), torch.zeros_like(z))
    assert grad_of("k3", far).abs().max() > 1.0


def test_high_entropy_mask_by_hand():
    # entropies at the four positions: uniform over 4 (log 4), over 2, over 3, a point mass (0)
    big = -1e3
    z = torch.tensor([[[0, 0, 0, 0], [0, 0, big, big], [0, 0, 0, big], [0, big, big, big]]], dtype=D)
    b = TokenBatch(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=D), z, torch.zeros(1, 4, dtype=D))
    assert est.high_entropy_mask(b, 0.5).tolist() == [[1, 0, 1, 0]]
    assert est.high_entropy_mask(b, 0.3).tolist() == [[1, 0, 1, 0]]    # ceil(0.3 * 4) = 2
    assert est.high_entropy_mask(b, 0.25).tolist() == [[1, 0, 0, 0]]
    assert est.high_entropy_mask(b, 1.0).tolist() == [[1, 1, 1, 1]]
    half = TokenBatch(b.tokens, torch.tensor([[0, 1, 1, 1]], dtype=D), z, b.teacher_token_logprobs)
    assert est.high_entropy_mask(half, 0.5).tolist() == [[0, 1, 1, 0]]  # ceil(1.5) = 2 of the 3 unmasked
    with pytest.raises(InputError, match="0 < rho <= 1"):
        est.high_entropy_mask(b, 0.0)


def test_token_selection_is_the_estimator_on_the_selected_tokens():
    b = make_batch(B=2, T=5)
    kept = TokenBatch(**{**b.__dict__, "mask": est.high_entropy_mask(b, 0.4)})
    assert kept.mask.sum() == 2 * 2
    for name in ("opd", "vopd", "full_kl", "k3"):
        assert torch.equal(grad_of(name, b, rho=0.4), grad_of(name, kept)), name
        assert torch.equal(grad_of(name, b, rho=1.0), grad_of(name, b)), name
        assert get(name).target_for(rho=0.4) == "none" and get(name).credit_for(rho=0.4) is None
    assert "rho" not in get("rtg").defaults and "rho" not in get("seq_rloo").defaults


def test_new_estimators_are_registered_with_their_sources():
    rows = {e.name: e for e in est.REGISTRY.values()}
    assert rows["iw_opd"].reference == "arXiv 2606.22600" and rows["iw_opd"].credit_for() is None
    assert rows["opd_bstar"].teacher_signal == "full" and not rows["opd_bstar"].analysis_only
    assert rows["opd_bstar_topk"].teacher_signal == "topk" and rows["opd_bstar_topk"].defaults["k"] == 16
    assert rows["student_topk_kl"].defaults["k"] == 100 and rows["vopd_scaled"].defaults["alpha"] == 1.0
    for name in ("opd_bstar", "opd_bstar_topk", "vopd_scaled"):
        assert rows[name].target_for() == "token" and rows[name].credit_for() == (0.0, 0.0, 0.0)
