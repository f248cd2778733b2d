"""Estimator surrogates: tiny hand-computed cases, per-sample identities, closed forms, errors."""

import math

import pytest
import torch

from vopd_analysis import InputError, TokenBatch, describe, get, per_sequence, surrogate_loss
from vopd_analysis import divergences as dv

D = torch.float64


def make_batch(B=3, T=4, V=5, seed=0, with_teacher=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=D).requires_grad_(True)
    t = torch.randn(B, T, V, generator=g, dtype=D)
    y = torch.randint(0, V, (B, T), generator=g)
    tlp = torch.log_softmax(t, -1).gather(-1, y[..., None])[..., 0]
    return TokenBatch(y, torch.ones(B, T, dtype=D), z, tlp, teacher_logits=t if with_teacher else None)


def grad_of(name, batch, **params):
    z = batch.student_logits.detach().clone().requires_grad_(True)
    b = TokenBatch(**{**batch.__dict__, "student_logits": z})
    per_sequence(name, b, **params).sum().backward()
    return z.grad


def test_hand_computed_bandit():
    # q = [1/4, 3/4], p = [1/2, 1/2], sampled y = 1
    z = torch.tensor([[[0.0, math.log(3.0)]]], dtype=D)
    t = torch.zeros(1, 1, 2, dtype=D)
    b = TokenBatch(torch.tensor([[1]]), torch.ones(1, 1, dtype=D), z, torch.tensor([[math.log(0.5)]], dtype=D),
                   teacher_logits=t)
    l = math.log(1.5)
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    score = torch.tensor([-0.25, 0.25], dtype=D)
    assert torch.allclose(grad_of("opd", b)[0, 0], l * score)
    assert torch.allclose(grad_of("vopd", b)[0, 0], (l - kl) * score)
    assert math.isclose(per_sequence("full_kl", b).item(), kl, rel_tol=1e-12)
    # grad_z KL = q * (l_v - KL), l = [log 0.5, log 1.5]
    q = torch.tensor([0.25, 0.75], dtype=D)
    lv = torch.tensor([math.log(0.5), math.log(1.5)], dtype=D)
    assert torch.allclose(grad_of("full_kl", b)[0, 0], q * (lv - kl))
    assert torch.allclose(grad_of("k1", b)[0, 0], score)
    # k3: (1 - rho) S with rho = p(y)/q(y) = 2/3
    assert torch.allclose(grad_of("k3", b)[0, 0], (1 - 2 / 3) * score)


def test_k2_equals_opd_per_sample():
    b = make_batch()
    assert torch.allclose(grad_of("k2", b), grad_of("opd", b))


def test_rtg_gamma_zero_is_opd_and_gamma_one_is_causal_reinforce():
    b = make_batch()
    assert torch.allclose(grad_of("rtg", b, gamma=0.0), grad_of("opd", b))
    lp = dv.token_logprobs(b.student_logits, b.tokens).detach()
    l = lp - b.teacher_token_logprobs
    G = torch.stack([l[:, t:].sum(-1) for t in range(l.shape[1])], 1)
    z = b.student_logits.detach().clone().requires_grad_(True)
    (G * dv.token_logprobs(z, b.tokens)).sum().backward()
    assert torch.allclose(grad_of("rtg", b, gamma=1.0), z.grad)
    # an intermediate discount by hand
    g = 0.5
    Gd = torch.stack([sum(g ** (s - t) * l[:, s] for s in range(t, l.shape[1])) for t in range(l.shape[1])], 1)
    z = b.student_logits.detach().clone().requires_grad_(True)
    (Gd * dv.token_logprobs(z, b.tokens)).sum().backward()
    assert torch.allclose(grad_of("rtg", b, gamma=g), z.grad)


def test_full_kl_is_rao_blackwellised_opd():
    """At every position, E_{y_t ~ q}[opd gradient of that position] = grad KL_t (prefix fixed)."""
    b = make_batch(B=2, T=3, V=4)
    V = 4
    expected = torch.zeros_like(b.student_logits)
    q = torch.softmax(b.student_logits.detach(), -1)
    for v in range(V):
        tokens = torch.full_like(b.tokens, v)
        tlp = torch.log_softmax(b.teacher_logits, -1)[..., v]
        alt = TokenBatch(tokens, b.mask, b.student_logits, tlp, teacher_logits=b.teacher_logits)
        expected += q[..., v:v + 1] * grad_of("opd", alt)
    assert torch.allclose(grad_of("full_kl", b), expected)
    for name in ("vopd", "opd_bstar", "vopd_topk"):  # any state baseline keeps the per-state mean
        mean = torch.zeros_like(expected)
        for v in range(V):
            tokens = torch.full_like(b.tokens, v)
            tlp = torch.log_softmax(b.teacher_logits, -1)[..., v]
            alt = TokenBatch(tokens, b.mask, b.student_logits, tlp, teacher_logits=b.teacher_logits)
            mean += q[..., v:v + 1] * grad_of(name, alt, **({"k": 2} if name == "vopd_topk" else {}))
        assert torch.allclose(mean, expected), name


def test_topk_with_full_support_matches_full_versions():
    b = make_batch(V=5)
    assert torch.allclose(grad_of("vopd_topk", b, k=5), grad_of("vopd", b))
    assert torch.allclose(grad_of("topk_kl", b, k=5), grad_of("full_kl", b))


def test_topk_baseline_uses_student_topk_renormalised():
    b = make_batch(B=1, T=1, V=6)
    z, t = b.student_logits.detach()[0, 0], b.teacher_logits[0, 0]
    ids = torch.topk(z, 3).indices
    qs = torch.softmax(z[ids], -1)
    ps = torch.softmax(t[ids], -1)
    baseline = (qs * (qs.log() - ps.log())).sum()
    l = dv.token_logprobs(z, b.tokens[0, 0]) - b.teacher_token_logprobs[0, 0]
    score = torch.nn.functional.one_hot(b.tokens[0, 0], 6).to(D) - torch.softmax(z, -1)
    assert torch.allclose(grad_of("vopd_topk", b, k=3)[0, 0], (l - baseline) * score)


def test_topk_kl_uses_teacher_topk_and_precomputed_fields_agree():
    b = make_batch(V=7)
    ids = torch.topk(b.teacher_logits, 3, dim=-1).indices
    sparse = TokenBatch(b.tokens, b.mask, b.student_logits, b.teacher_token_logprobs,
                        teacher_topk_ids=ids, teacher_topk_logprobs=dv.logprobs_at(b.teacher_logits, ids))
    assert torch.allclose(grad_of("topk_kl", sparse, k=3), grad_of("topk_kl", b, k=3))
    sids = torch.topk(b.student_logits.detach(), 3, dim=-1).indices
    sparse = TokenBatch(b.tokens, b.mask, b.student_logits, b.teacher_token_logprobs, student_topk_ids=sids,
                        teacher_logprobs_on_student_topk=dv.logprobs_at(b.teacher_logits, sids))
    assert torch.allclose(grad_of("vopd_topk", sparse, k=3), grad_of("vopd_topk", b, k=3))


def test_gkd_jsd_end_points_and_symmetry():
    b = make_batch()
    assert torch.allclose(grad_of("gkd_jsd", b, beta=1.0), grad_of("full_kl", b))
    fwd = dv.forward_kl(b.student_logits, b.teacher_logits).sum()
    assert torch.allclose(per_sequence("gkd_jsd", b, beta=0.0).sum(), fwd)
    a = dv.generalized_jsd(b.student_logits.detach(), b.teacher_logits, 0.5)
    assert torch.allclose(a, dv.generalized_jsd(b.teacher_logits, b.student_logits.detach(), 0.5))
    assert not torch.allclose(dv.generalized_jsd(b.student_logits.detach(), b.teacher_logits, 0.1),
                              dv.generalized_jsd(b.teacher_logits, b.student_logits.detach(), 0.1))
    same = dv.generalized_jsd(b.teacher_logits, b.teacher_logits, 0.3)
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-12)


def test_mask_removes_tokens_and_reductions():
    b = make_batch()
    mask = b.mask.clone()
    mask[:, -1] = 0
    masked = TokenBatch(**{**b.__dict__, "mask": mask})
    short = TokenBatch(b.tokens[:, :-1], b.mask[:, :-1], b.student_logits[:, :-1], b.teacher_token_logprobs[:, :-1],
                       teacher_logits=b.teacher_logits[:, :-1])
    for name in ("opd", "vopd", "full_kl", "rtg", "seq_reinforce", "k3", "gkd_jsd", "rb_seq"):
        assert torch.allclose(per_sequence(name, masked), per_sequence(name, short)), name
    values = per_sequence("opd", masked)
    assert torch.allclose(surrogate_loss("opd", masked), values.mean())
    assert torch.allclose(surrogate_loss("opd", masked, reduction="sum"), values.sum())
    assert torch.allclose(surrogate_loss("opd", masked, reduction="token_mean"), values.sum() / mask.sum())


def test_group_estimators_centre_within_groups():
    b = make_batch(B=4, T=2)
    lp = dv.token_logprobs(b.student_logits, b.tokens).detach()
    L = (lp - b.teacher_token_logprobs).sum(-1).reshape(2, 2)
    adv = torch.stack([L[:, 0] - L[:, 1], L[:, 1] - L[:, 0]], 1).reshape(-1, 1)  # K = 2: leave-one-out
    z = b.student_logits.detach().clone().requires_grad_(True)
    (adv * dv.token_logprobs(z, b.tokens)).sum().backward()
    assert torch.allclose(grad_of("seq_rloo", b, group_size=2), z.grad)
    assert torch.allclose(grad_of("seq_grpo", b, group_size=2), z.grad / 2)  # mean-centred = (K-1)/K RLOO


@pytest.mark.parametrize("call, message", [
    (lambda b: per_sequence("nope", b), "known estimators: opd"),
    (lambda b: per_sequence("vopd_topk", b, k=0), "1 <= k <= V"),
    (lambda b: per_sequence("topk_kl", b, k=99), "1 <= k <= V"),
    (lambda b: per_sequence("opd", b, gamma=1.0), "unknown ['gamma']"),
    (lambda b: per_sequence("rtg", b, gamma=1.5), "0 <= gamma <= 1"),
    (lambda b: per_sequence("gkd_jsd", b, beta=2.0), "0 <= beta <= 1"),
    (lambda b: per_sequence("seq_rloo", b, group_size=2), "group_size"),
    (lambda b: per_sequence("rtg_oracle", b), "kl_to_go"),
    (lambda b: surrogate_loss("opd", b, reduction="avg"), "unknown reduction"),
])
def test_bad_input_errors(call, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(make_batch(B=3))


def test_missing_teacher_signal_is_named():
    b = make_batch(with_teacher=False)
    assert torch.isfinite(per_sequence("opd", b)).all()
    for name in ("vopd", "full_kl", "gkd_jsd", "vopd_topk", "topk_kl"):
        with pytest.raises(InputError, match=name):
            per_sequence(name, b)


def test_validate_names_problems():
    b = make_batch()
    with pytest.raises(InputError, match="NaN or inf"):
        TokenBatch(**{**b.__dict__, "teacher_logits": b.teacher_logits.clone().fill_(float("nan"))}).validate()
    with pytest.raises(InputError, match="empty"):
        TokenBatch(**{**b.__dict__, "mask": torch.zeros_like(b.mask)}).validate()
    with pytest.raises(InputError, match="same vocabulary"):
        TokenBatch(**{**b.__dict__, "teacher_logits": b.teacher_logits[..., :-1]}).validate()
    with pytest.raises(InputError, match="teacher_logsumexp must be"):
        TokenBatch(**{**b.__dict__, "teacher_logsumexp": torch.zeros(1)}).validate()
    with pytest.raises(InputError, match="without the teacher_logits"):
        TokenBatch(**{**b.__dict__, "teacher_logits": None,
                      "teacher_logsumexp": torch.zeros_like(b.teacher_token_logprobs)}).validate()
    assert b.validate() is b


def test_registry_metadata():
    rows = {r["name"]: r for r in describe()}
    for name in ("opd", "vopd", "vopd_topk", "full_kl", "topk_kl", "seq_reinforce", "rtg", "rtg_vopd",
                 "k1", "k2", "k3", "gkd_jsd"):
        assert name in rows
    assert rows["vopd"]["unbiased_for"] == "token" and rows["vopd"]["teacher_signal"] == "full"
    assert rows["topk_kl"]["unbiased_for"] == "none"
    assert get("rtg").target_for(gamma=0.5) == "none" and get("rtg").target_for() == "sequence"
