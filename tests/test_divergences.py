"""The chunked sampled-log-prob path against hand-computed cases and plain autograd."""

import math

import pytest
import torch

from vopd_analysis import divergences as dv


def reference(z, y, t=None):
    """Plain autograd: log_softmax(z)[y] and, with t, KL(softmax(z) || softmax(t))."""
    lp = torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return lp, None if t is None else dv.reverse_kl(z.detach(), t)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 2 rows at V = 7, so a batch of 11 tokens ends in a partial chunk."""
    monkeypatch.setattr(dv, "_CHUNK_ELEMENTS", 14)


def test_hand_computed_two_token_case():
    # softmax([0, log 3]) = [1/4, 3/4]; y = 1: lp = log 3/4, d lp / dz = e_y - q = [-1/4, 1/4];
    # teacher uniform: KL = 1/4 log(1/2) + 3/4 log(3/2)
    z = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    lp, kl = dv.token_logprobs_and_reverse_kl(z, torch.tensor([1]), torch.zeros(1, 2, dtype=torch.float64))
    lp.sum().backward()
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-15)
    assert kl.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-15)
    torch.testing.assert_close(z.grad, torch.tensor([[-0.25, 0.25]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_values_and_gradient_match_autograd(small_chunks, dtype):
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(11, 7, generator=g, dtype=torch.float64)).to(dtype)
    t = z + torch.randn(11, 7, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 7, (11,), generator=g)
    w = torch.randn(11, generator=g, dtype=torch.float64).to(dtype)     # a non-uniform upstream gradient
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    lp, kl = dv.token_logprobs_and_reverse_kl(za, y, t)
    lp_ref, kl_ref = reference(zb, y, t)
    (w * lp).sum().backward()
    (w * lp_ref).sum().backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp, lp_ref, **tol)
    torch.testing.assert_close(kl, kl_ref, **tol)
    torch.testing.assert_close(za.grad, zb.grad, **tol)
    assert not kl.requires_grad


def test_batch_shape_and_logsumexp(small_chunks):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (3, 4), generator=g)
    lp, lse = dv.token_logprobs_and_lse(z, y)
    assert lp.shape == lse.shape == (3, 4)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    torch.testing.assert_close(lp, reference(z, y)[0])


def test_kl_is_invariant_to_logit_shifts():
    # softmax ignores a constant per row: shifting z by +1000 and t by -50 leaves lp and KL unchanged
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 9, generator=g)
    t = torch.randn(5, 9, generator=g)
    y = torch.randint(0, 9, (5,), generator=g)
    lp, kl = dv.token_logprobs_and_reverse_kl(z, y, t)
    lp_s, kl_s = dv.token_logprobs_and_reverse_kl(z + 1000.0, y, t - 50.0)
    torch.testing.assert_close(lp_s, lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(kl_s, kl, rtol=0, atol=1e-3)
    assert bool((kl > 0).all())


def test_bfloat16_logits_get_a_bfloat16_gradient_close_to_float32(small_chunks):
    g = torch.Generator().manual_seed(3)
    z32 = 2 * torch.randn(11, 7, generator=g)
    y = torch.randint(0, 7, (11,), generator=g)
    zb = z32.to(torch.bfloat16).requires_grad_()
    lp, _ = dv.token_logprobs_and_lse(zb, y)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert zb.grad.dtype == torch.bfloat16
    zr = zb.detach().float().requires_grad_()
    reference(zr, y)[0].sum().backward()
    torch.testing.assert_close(zb.grad.float(), zr.grad, rtol=0, atol=1e-2)


def test_torch_func_transforms_use_the_composite_and_agree():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (4, 6), generator=g)
    per_row = torch.func.vmap(torch.func.grad(lambda zi, yi: dv.token_logprobs(zi, yi).sum()))(z, y)
    loop = []
    for zi, yi in zip(z, y):
        zi = zi.clone().requires_grad_()
        dv.token_logprobs(zi, yi).sum().backward()
        loop.append(zi.grad)
    torch.testing.assert_close(per_row, torch.stack(loop))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_gradient_matches_autograd_and_closed_form(small_chunks, dtype):
    g = torch.Generator().manual_seed(6)
    z = (2 * torch.randn(11, 7, generator=g, dtype=torch.float64)).to(dtype)
    t = torch.randn(11, 7, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(11, generator=g, dtype=torch.float64).to(dtype)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    kl = dv.reverse_kl_to_fixed_teacher(za, t)
    kl_ref = dv.reverse_kl(zb, t)
    (w * kl).sum().backward()
    (w * kl_ref).sum().backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, kl_ref.detach(), **tol)
    torch.testing.assert_close(za.grad, zb.grad, **tol)
    # closed form: d KL / d z_v = q_v (log q_v - log p_v - KL)
    log_q, log_p = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    closed = w[:, None] * log_q.exp() * (log_q - log_p - kl_ref.detach()[:, None])
    torch.testing.assert_close(za.grad, closed, **tol)


def test_sampled_logprob_and_kl_gradients_add_up(small_chunks):
    """One pass giving both lp and a differentiable KL: the gradient of a w1 lp + w2 KL."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(11, 7, generator=g, dtype=torch.float64)
    t = torch.randn(11, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (11,), generator=g)
    w1, w2 = torch.randn(11, generator=g, dtype=torch.float64), torch.randn(11, generator=g, dtype=torch.float64)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    lp, _, kl = dv._chunked_token_logprobs(za, y, t)
    (w1 * lp + w2 * kl).sum().backward()
    lp_ref = torch.log_softmax(zb, -1).gather(-1, y[:, None]).squeeze(-1)
    (w1 * lp_ref + w2 * dv.reverse_kl(zb, t)).sum().backward()
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-12, atol=1e-12)


def test_teacher_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="teacher logits"):
        dv.token_logprobs_and_reverse_kl(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="teacher logits"):
        dv.reverse_kl_to_fixed_teacher(torch.zeros(2, 3), torch.zeros(2, 4))


def test_given_teacher_logsumexp_gives_the_same_kl(small_chunks):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(11, 7, generator=g, dtype=torch.float64)
    t = torch.randn(11, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (11,), generator=g)
    _, kl = dv.token_logprobs_and_reverse_kl(z, y, t)
    _, kl_given = dv.token_logprobs_and_reverse_kl(z, y, t, torch.logsumexp(t, -1))
    torch.testing.assert_close(kl_given, kl, rtol=1e-12, atol=1e-12)
    # a wrong normaliser shifts the baseline by a per-state constant: here +1 at every token
    _, kl_shifted = dv.token_logprobs_and_reverse_kl(z, y, t, torch.logsumexp(t, -1) + 1.0)
    torch.testing.assert_close(kl_shifted, kl + 1.0)


def test_several_ids_per_position_match_autograd(small_chunks):
    """logprobs_at with gradient (topk_kl's path): lp [N, k] and d/dz = sum_j g_j (e_{y_j} - q)."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(11, 7, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(11)])      # [N, k=3], distinct
    w = torch.randn(11, 3, generator=g, dtype=torch.float64)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    lp = dv.logprobs_at(za, ids)
    lp_ref = torch.log_softmax(zb, -1).gather(-1, ids)
    (w * lp).sum().backward()
    (w * lp_ref).sum().backward()
    torch.testing.assert_close(lp, lp_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- masked vocabularies (0 log 0 = 0)

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}


def same_bits(a, b) -> bool:
    """Equal bit for bit (so -0 != +0 and NaN == NaN of the same payload)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(_INT_VIEW[a.dtype]),
                                                                     b.contiguous().view(_INT_VIEW[b.dtype]))


def _old_optimal_scalar_baseline(log_q, log_p):
    w = dv.logit_score_weights(log_q.exp())
    return (w * (log_q - log_p)).sum(-1) / w.sum(-1).clamp_min(torch.finfo(w.dtype).tiny)


def _old_generalized_jsd(z, t, beta):
    log_q, log_p = torch.log_softmax(z.to(dv.compute_dtype(z)), -1), torch.log_softmax(t.to(dv.compute_dtype(z)), -1)
    dtype = log_q.dtype
    log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(beta, dtype=dtype)),
                                         log_q + torch.log(torch.tensor(1.0 - beta, dtype=dtype))]), dim=0)
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


def _outputs(z0, t0, y):
    """Every divergence touched by the 0 log 0 convention, values and student gradients."""
    out = {}
    z = z0.clone().requires_grad_(True)
    lp, kl = dv.token_logprobs_and_reverse_kl(z, y, t0)
    full = dv.reverse_kl_to_fixed_teacher(z, t0)
    (lp.sum() + 0.7 * full.sum()).backward()
    out.update(lp=lp.detach(), kl=kl, full=full.detach(), grad_chunked=z.grad)
    z = z0.clone().requires_grad_(True)
    lp_b, bstar = dv.token_logprobs_and_optimal_baseline(z, y, t0, dv.logsumexp_detached(t0))
    out.update(bstar=bstar)
    for name, fn in (("reverse", dv.reverse_kl), ("forward", dv.forward_kl),
                     ("jsd", lambda a, b: dv.generalized_jsd(a, b, 0.3))):
        z = z0.clone().requires_grad_(True)
        value = fn(z, t0)
        value.sum().backward()
        out.update({name: value.detach(), f"grad_{name}": z.grad})
    log_q, log_p = torch.log_softmax(z0.double(), -1), torch.log_softmax(t0.double(), -1)
    out["renormalised"] = dv.renormalised_reverse_kl(log_q[..., :3], log_p[..., :3])
    out["tail"] = dv.tail_bucket_reverse_kl(log_q[..., :3], log_p[..., :3])
    out["entropy"] = dv.entropy(z0)
    out["bstar_plain"] = dv.optimal_scalar_baseline(log_q, log_p)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_masked_vocabulary_convention_changes_no_finite_result_by_a_bit(small_chunks, monkeypatch, dtype):
    g = torch.Generator().manual_seed(5)
    z = (3 * torch.randn(11, 7, generator=g, dtype=torch.float64)).to(dtype)
    t = (3 * torch.randn(11, 7, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, 7, (11,), generator=g)
    new = _outputs(z, t, y)
    new["bstar_old_formula"] = _old_optimal_scalar_baseline(torch.log_softmax(z.double(), -1),
                                                            torch.log_softmax(t.double(), -1))
    new["jsd_old_formula"] = _old_generalized_jsd(z, t, 0.3)
    monkeypatch.setattr(dv, "zero_nan_", lambda x: x)
    monkeypatch.setattr(dv, "_plogratio", lambda a, b: a.exp() * (a - b))
    old = _outputs(z, t, y)
    for key, value in old.items():
        assert same_bits(new[key], value), key
    assert same_bits(new["bstar_plain"], new["bstar_old_formula"])
    assert same_bits(new["jsd"], new["jsd_old_formula"])


def test_hard_masked_vocabulary_has_the_kl_of_the_remaining_tokens(small_chunks):
    g = torch.Generator().manual_seed(6)
    z, t = torch.randn(11, 7, generator=g, dtype=torch.float64), torch.randn(11, 7, generator=g, dtype=torch.float64)
    keep, masked = torch.tensor([0, 1, 3, 4, 6]), torch.tensor([2, 5])
    zm, tm = z.index_fill(-1, masked, float("-inf")), t.index_fill(-1, masked, float("-inf"))
    y_small = torch.randint(0, 5, (11,), generator=g)
    for fn in (lambda a, b, y: dv.token_logprobs_and_reverse_kl(a, y, b)[1],
               lambda a, b, y: dv.reverse_kl_to_fixed_teacher(a, b), lambda a, b, y: dv.reverse_kl(a, b),
               lambda a, b, y: dv.token_logprobs_and_optimal_baseline(a, y, b)[1],
               lambda a, b, y: dv.generalized_jsd(a, b, 0.5), lambda a, b, y: dv.forward_kl(a, b),
               lambda a, b, y: dv.entropy(a)):
        a, b = zm.clone().requires_grad_(True), z[:, keep].clone().requires_grad_(True)
        va, vb = fn(a, tm, keep[y_small]), fn(b, t[:, keep], y_small)
        torch.testing.assert_close(va, vb, rtol=1e-13, atol=1e-13)
        if va.requires_grad:
            va.sum().backward()
            vb.sum().backward()
            assert torch.all(a.grad[:, masked] == 0)
            torch.testing.assert_close(a.grad[:, keep], b.grad, rtol=1e-12, atol=1e-13)


def test_student_mask_alone_is_q_zero_and_teacher_mask_under_student_mass_is_infinite():
    g = torch.Generator().manual_seed(7)
    z, t = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    zm = z.clone()
    zm[:, 0] = float("-inf")
    for kl in (dv.reverse_kl(zm, t), dv.reverse_kl_to_fixed_teacher(zm, t)):
        assert torch.isfinite(kl).all() and (kl >= 0).all()
    z_grad = zm.clone().requires_grad_(True)
    dv.reverse_kl_to_fixed_teacher(z_grad, t).sum().backward()
    assert torch.isfinite(z_grad.grad).all() and torch.all(z_grad.grad[:, 0] == 0)
    tm = t.clone()
    tm[:, 0] = float("-inf")
    assert torch.all(dv.reverse_kl(z, tm) == math.inf)
    assert torch.all(dv.reverse_kl_to_fixed_teacher(z, tm) == math.inf)


def test_score_variance_matches_enumeration_and_b_star_minimises_it():
    """Var_b = sum_y q_y |(l_y - b)(e_y - q) - mean|^2 by enumerating y; b* gives the least of any b."""
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    lq, lp = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    q, l = lq.exp(), lq - lp
    kl = (q * l).sum(-1)
    for b in (torch.zeros(4, dtype=torch.float64), kl, dv.optimal_scalar_baseline(lq, lp), torch.full((4,), 0.7, dtype=torch.float64)):
        eye = torch.eye(6, dtype=torch.float64)
        terms = (l - b[:, None])[:, :, None] * (eye[None] - q[:, None, :])          # [S, y, V]: G_b(y)
        mean = (q[:, :, None] * terms).sum(1)
        brute = (q * ((terms - mean[:, None, :]) ** 2).sum(-1)).sum(-1)
        torch.testing.assert_close(dv.score_variance(lq, lp, b), brute, rtol=1e-12, atol=1e-14)
    best = dv.score_variance(lq, lp, dv.optimal_scalar_baseline(lq, lp))
    for b in (torch.zeros(4, dtype=torch.float64), kl, kl + 0.3):
        assert (dv.score_variance(lq, lp, b) >= best - 1e-12).all()
