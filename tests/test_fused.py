"""The fused (hidden states + lm_head, tiled) estimators against the materialised path:
logits = h W^T + b built in full, then ``estimators.per_sequence`` on a TokenBatch."""

import math

import pytest
import torch

from vopd_analysis import divergences as dv
from vopd_analysis import estimators as E
from vopd_analysis import fused as F
from vopd_analysis.batch import TokenBatch
from vopd_analysis.errors import InputError
from vopd_analysis.lm import fused_score as fs

NAMES = ("opd", "vopd", "opd_bstar", "full_kl")
TOPK_NAMES = ("vopd_topk", "opd_bstar_topk", "topk_kl", "student_topk_kl", "topk_tail_kl")
F64 = dict(rtol=0.0, atol=1e-10)


def make(seed=0, B=3, T=7, d_s=6, d_t=9, V=37, V_s=None, V_t=None, dtype=torch.float64, bias=True):
    """A random problem: student (h, W, b) leaves, teacher (h_T, W_T, b_T), tokens, a mask with holes.
    Heads of V_s / V_t rows (>= V: padded rows beyond the shared vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    V_s, V_t = V_s or V, V_t or V
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    p = dict(h_s=r(B, T, d_s), W_s=3 / d_s ** 0.5 * r(V_s, d_s), b_s=r(V_s) if bias else None,
             h_t=r(B, T, d_t), W_t=3 / d_t ** 0.5 * r(V_t, d_t), b_t=r(V_t) if bias else None)
    p = {k: None if v is None else v.to(dtype) for k, v in p.items()}
    for k in ("h_s", "W_s", "b_s"):
        if p[k] is not None:
            p[k].requires_grad_(True)
    p["y"] = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0
    mask[2, 3] = 0
    p["mask"], p["V"] = mask, V
    return p


def logits(h, W, b, V, scale=1.0, cap=None):
    x = h @ W[:V].T + (0 if b is None else b[:V])
    x = x * scale
    return x if cap is None else cap * torch.tanh(x / cap)


def materialised(name, p, scale=(1.0, 1.0), cap=(None, None), **params):
    """Values [B] of the registry estimator on the materialised batch, and grads w.r.t. (h_s, W_s, b_s)."""
    z = logits(p["h_s"], p["W_s"], p["b_s"], p["V"], scale[0], cap[0])
    with torch.no_grad():
        t = logits(p["h_t"], p["W_t"], p["b_t"], p["V"], scale[1], cap[1])
        lse = torch.logsumexp(t, -1)
        t_lp = t.gather(-1, p["y"].unsqueeze(-1)).squeeze(-1) - lse
    batch = TokenBatch(tokens=p["y"], mask=p["mask"], student_logits=z, teacher_token_logprobs=t_lp,
                       teacher_logits=t, teacher_logsumexp=lse)
    values = E.per_sequence(name, batch, **params)
    return values.detach(), _grads(values, p)


def fused(name, p, R=3, C=8, scale=(1.0, 1.0), cap=(None, None), **kw):
    values = fs.fused_per_sequence(name, p["h_s"], p["W_s"], p["y"], p["mask"], p["h_t"], p["W_t"],
                                  student_bias=p["b_s"], teacher_bias=p["b_t"], token_chunk=R, vocab_chunk=C,
                                  student_logit_scale=scale[0], teacher_logit_scale=scale[1],
                                  student_softcap=cap[0], teacher_softcap=cap[1],
                                  vocab_size=p["V"] if p["W_s"].shape[0] != p["V"] or p["W_t"].shape[0] != p["V"]
                                  else None, **kw)
    return values.detach(), _grads(values, p)


def _grads(values, p):
    leaves = [p[k] for k in ("h_s", "W_s", "b_s") if p[k] is not None]
    w = torch.arange(1, values.numel() + 1, dtype=values.dtype)          # a non-uniform upstream gradient
    return torch.autograd.grad((w * values).sum(), leaves)


def assert_match(a, b, **tol):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, **tol)
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **tol)


# ----------------------------------------------------------------------------- float64, exact to 1e-10

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("R,C", [(3, 8), (1, 5), (64, 64), (21, 37)])
def test_float64_matches_materialised(one_thread, name, R, C):
    # V = 37: tiles of 8 and 5 leave a partial last tile; 64 > V and 64 > N = 21; (21, 37) one tile
    p = make(seed=1)
    assert_match(fused(name, p, R, C), materialised(name, p), **F64)


@pytest.mark.parametrize("name", [n for n in fs.fused_names() if n not in NAMES + TOPK_NAMES])
def test_every_other_fused_estimator_matches_materialised(one_thread, name):
    """Every registry estimator with a fused form (those that read only the per-token record: iw_opd and the
    sequence-return ones too), beyond the ones tested tile by tile above and below."""
    p = make(seed=3)
    assert_match(fused(name, p, 3, 8), materialised(name, p), **F64)


def test_vopd_scaled_matches_materialised(one_thread):
    p = make(seed=2)
    assert_match(fused("vopd_scaled", p, alpha=0.5), materialised("vopd_scaled", p, alpha=0.5), **F64)


@pytest.mark.parametrize("parts", [
    ("to_go_bstar", E.TO_GO_RETURN, E.BSTAR_BASELINE, {}),
    ("rtg_topk_kl", E.REWARD_TO_GO, E.STUDENT_TOPK_KL_BASELINE, {"gamma": 0.5, "k": 6}),
    ("future_topk_bstar_kl", E.FUTURE_RETURN, E.STUDENT_TOPK_BSTAR_BASELINE, {"k": 4}),
    ("seq_kl_scaled", E.SEQUENCE_RETURN, E.KL_BASELINE, {"beta": 0.3}),
])
def test_new_composed_estimator_runs_fused_with_no_edit_to_fused(one_thread, monkeypatch, parts):
    """An estimator composed from an existing Return and Baseline, registered here only, has a fused
    form: both scorers fill the same per-token record and the registry's estimator reads it, so its
    per-sequence values and gradients match the materialised path's with no line of fused.py or
    lm/fused_score.py naming it."""
    import inspect
    name, ret, baseline, params = parts
    coefficient = "beta" if "beta" in params else 1.0
    entry = E.composed(name, ret, baseline, coefficient=coefficient,
                       defaults={"beta": 1.0} if coefficient == "beta" else None)
    monkeypatch.setitem(E.REGISTRY, name, E.token_selectable(entry))
    assert fs.has_fused_form(name) and name in fs.fused_names()
    assert name not in inspect.getsource(F) and name not in inspect.getsource(fs)
    p = make(seed=12)
    assert_match(fused(name, p, 4, 9, **params), materialised(name, p, **params), **F64)


@pytest.mark.parametrize("name", NAMES)
def test_without_bias_and_equal_widths(one_thread, name):
    p = make(seed=3, d_t=6, bias=False)
    assert_match(fused(name, p, 4, 6), materialised(name, p), **F64)


@pytest.mark.parametrize("name", ["vopd", "full_kl", "opd_bstar"])
def test_padded_heads_use_the_shared_vocabulary(one_thread, name):
    # heads of 40 and 44 rows, shared vocabulary V = 37 (the scorer's z[:V]); padded rows get no gradient
    p = make(seed=4, V=37, V_s=40, V_t=44)
    out = fused(name, p, 5, 8)
    assert_match(out, materialised(name, p), **F64)
    assert torch.count_nonzero(out[1][1][37:]) == 0 and torch.count_nonzero(out[1][2][37:]) == 0


@pytest.mark.parametrize("name", ["vopd", "full_kl", "opd_bstar"])
def test_logit_scale_and_softcapping(one_thread, name):
    p = make(seed=5)
    kw = dict(scale=(0.7, 1.3), cap=(4.0, 2.5))
    assert_match(fused(name, p, 3, 8, **kw), materialised(name, p, **kw), **F64)
    kw = dict(scale=(2.0, 1.0), cap=(None, 3.0))
    assert_match(fused(name, p, 3, 8, **kw), materialised(name, p, **kw), **F64)


def test_token_stats_match_the_divergences(one_thread):
    p = make(seed=6)
    s = F.fused_token_stats(p["h_s"], p["W_s"], p["y"], p["h_t"], p["W_t"], student_bias=p["b_s"],
                            teacher_bias=p["b_t"], want_bstar=True, token_chunk=4, vocab_chunk=6)
    z = logits(p["h_s"], p["W_s"], p["b_s"], p["V"]).detach()
    t = logits(p["h_t"], p["W_t"], p["b_t"], p["V"])
    log_q, log_p = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    pick = lambda x: x.gather(-1, p["y"].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(s.student_logprobs.detach(), pick(log_q), **F64)
    torch.testing.assert_close(s.student_logsumexp, torch.logsumexp(z, -1), **F64)
    torch.testing.assert_close(s.teacher_logprobs, pick(log_p), **F64)
    torch.testing.assert_close(s.teacher_logsumexp, torch.logsumexp(t, -1), **F64)
    torch.testing.assert_close(s.kl.detach(), dv.reverse_kl(z, t), **F64)
    torch.testing.assert_close(s.bstar, dv.optimal_scalar_baseline(log_q, log_p), **F64)
    assert s.student_logprobs.requires_grad and s.kl.requires_grad and s.student_logsumexp.requires_grad
    assert not (s.teacher_logprobs.requires_grad or s.bstar.requires_grad)
    assert s.topk_ids is None and s.student_topk_logits is None and s.teacher_topk_logprobs is None


def test_logsumexp_gradient_matches_autograd(one_thread):
    # d lse / d z_v = q_v, alone and next to the lp and KL gradients, with soft-capping and a mask
    p = make(seed=6)
    kw = dict(student_bias=p["b_s"], teacher_bias=p["b_t"], mask=p["mask"], token_chunk=4, vocab_chunk=6,
              student_logit_scale=0.8, student_softcap=3.0)
    t = logits(p["h_t"], p["W_t"], p["b_t"], p["V"]).detach()
    m = p["mask"].double()
    w = torch.linspace(0.5, 2.0, m.numel(), dtype=torch.float64).reshape(m.shape)
    for mix in ((1.0, 0.0, 0.0), (1.0, -0.7, 0.3)):
        s = F.fused_token_stats(p["h_s"], p["W_s"], p["y"], p["h_t"], p["W_t"], **kw)
        z = logits(p["h_s"], p["W_s"], p["b_s"], p["V"], 0.8, 3.0)
        got = _grads(((mix[0] * s.student_logsumexp + mix[1] * s.student_logprobs + mix[2] * s.kl) * w).sum(-1), p)
        lse = torch.logsumexp(z, -1)
        want_terms = mix[0] * lse + mix[1] * (z.gather(-1, p["y"][..., None])[..., 0] - lse) \
            + mix[2] * dv.reverse_kl(z, t)
        want = _grads((want_terms * w * m).sum(-1), p)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **F64)


def test_online_rescaling_survives_rising_maxima(one_thread):
    # the row maximum rises from tile to tile by ~30 nats (r = e^-30 rescales every stored sum)
    V, d = 24, 3
    h = torch.ones(2, 4, d, dtype=torch.float64, requires_grad=True)
    W = (torch.arange(V, dtype=torch.float64) * 2.0 / d).unsqueeze(1).repeat(1, d).requires_grad_(True)
    y = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(0))
    h_t = torch.ones(2, 4, d, dtype=torch.float64)
    W_t = torch.randn(V, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = F.fused_token_stats(h, W, y, h_t, W_t, want_bstar=True, token_chunk=3, vocab_chunk=3)
    z, t = (h @ W.T).detach(), h_t @ W_t.T
    log_q, log_p = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    torch.testing.assert_close(s.student_logsumexp, torch.logsumexp(z, -1), **F64)
    torch.testing.assert_close(s.kl.detach(), dv.reverse_kl(z, t), **F64)
    torch.testing.assert_close(s.bstar, dv.optimal_scalar_baseline(log_q, log_p), **F64)


def test_hard_masked_vocabulary_entries(one_thread):
    # a bias of -inf on the same tokens for both models: probability 0 there, finite KL and gradients
    p = make(seed=7)
    with torch.no_grad():
        for b in (p["b_s"], p["b_t"]):
            b[[0, 9, 20]] = float("-inf")
        p["y"] = torch.where(torch.isin(p["y"], torch.tensor([0, 9, 20])), torch.ones_like(p["y"]), p["y"])
    for name in NAMES:
        got, want = fused(name, p, 3, 8), materialised(name, p)
        assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[1])
        assert_match(got, want, **F64)


# ----------------------------------------------------------------------------- top-k supports

@pytest.mark.parametrize("name", TOPK_NAMES)
@pytest.mark.parametrize("R,C", [(3, 8), (1, 5), (64, 64), (21, 37)])
def test_topk_float64_matches_materialised(one_thread, name, R, C):
    # k = 6: tiles of 5 (< k: whole tiles join the candidates) and of 8 (> k: the tile's own top-k);
    # V = 37 and N = 21 divided by neither; values and gradients w.r.t. h, W and b; masked positions
    p = make(seed=40)
    assert_match(fused(name, p, R, C, k=6), materialised(name, p, k=6), **F64)


@pytest.mark.parametrize("name", TOPK_NAMES)
@pytest.mark.parametrize("k", [1, 37])
def test_topk_extreme_sizes(one_thread, name, k):
    # k = 1 and k = V (the support is the whole vocabulary: the tail bucket has mass ~0)
    p = make(seed=41)
    assert_match(fused(name, p, 4, 8, k=k), materialised(name, p, k=k), **F64)


@pytest.mark.parametrize("name", TOPK_NAMES)
def test_topk_registry_defaults(one_thread, name):
    # no k given: the registry's default (16, or 100 for student_topk_kl: V = 120 here)
    p = make(seed=42, V=120)
    assert_match(fused(name, p, 5, 32), materialised(name, p), **F64)


@pytest.mark.parametrize("name", TOPK_NAMES)
def test_topk_padded_heads_and_no_bias(one_thread, name):
    # heads of 40 and 44 rows over V = 37; padded rows get no gradient and are never in the support
    p = make(seed=43, V=37, V_s=40, V_t=44)
    out = fused(name, p, 5, 8, k=7)
    assert_match(out, materialised(name, p, k=7), **F64)
    assert torch.count_nonzero(out[1][1][37:]) == 0 and torch.count_nonzero(out[1][2][37:]) == 0
    p = make(seed=44, V=37, V_s=41, bias=False)
    assert_match(fused(name, p, 4, 9, k=7), materialised(name, p, k=7), **F64)


@pytest.mark.parametrize("name", TOPK_NAMES)
def test_topk_logit_scale_and_softcapping(one_thread, name):
    # a negative scale puts the support at the smallest h W^T + b: the top-k is taken of z, not x
    p = make(seed=45)
    for kw in (dict(scale=(0.7, 1.3), cap=(4.0, 2.5)), dict(scale=(2.0, 1.0), cap=(None, 3.0)),
               dict(scale=(-0.6, 1.0), cap=(None, None))):
        assert_match(fused(name, p, 3, 8, k=5, **kw), materialised(name, p, k=5, **kw), **F64)


@pytest.mark.parametrize("name", TOPK_NAMES)
def test_topk_masked_positions(one_thread, name):
    # token ids -100 at masked positions: never read; no gradient to masked hidden states; all-masked: zeros
    p = make(seed=46)
    ref = materialised(name, p, k=6)
    p["y"] = torch.where(p["mask"].bool(), p["y"], torch.full_like(p["y"], -100))
    got = fused(name, p, 3, 8, k=6)
    assert_match(got, ref, **F64)
    assert (got[1][0][~p["mask"].bool()] == 0).all()
    p["mask"] = torch.zeros_like(p["mask"])
    values, grads = fused(name, p, 3, 8, k=6)
    assert (values == 0).all() and all((g == 0).all() for g in grads)


def test_topk_hard_masked_vocabulary_entries(one_thread):
    # -inf bias on the same tokens for both models: they are never in the support (k <= finite tokens)
    p = make(seed=47)
    with torch.no_grad():
        for b in (p["b_s"], p["b_t"]):
            b[[0, 9, 20]] = float("-inf")
        p["y"] = torch.where(torch.isin(p["y"], torch.tensor([0, 9, 20])), torch.ones_like(p["y"]), p["y"])
    for name in TOPK_NAMES:
        got = fused(name, p, 3, 8, k=6)
        assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[1])
        assert_match(got, materialised(name, p, k=6), **F64)


@pytest.mark.parametrize("support", ["student", "teacher"])
@pytest.mark.parametrize("k,C", [(1, 4), (6, 4), (6, 11), (16, 16), (37, 5)])
def test_running_topk_equals_torch_topk(one_thread, support, k, C):
    # ids (and their order) of the running top-k over tiles equal torch.topk on the full logits;
    # z and log p on the support equal the materialised ones
    p = make(seed=48)
    kw = dict(student_logit_scale=1.1, teacher_softcap=3.0)
    s = F.fused_token_stats(p["h_s"], p["W_s"], p["y"], p["h_t"], p["W_t"], student_bias=p["b_s"],
                            teacher_bias=p["b_t"], topk=k, topk_support=support, token_chunk=4, vocab_chunk=C, **kw)
    z = logits(p["h_s"], p["W_s"], p["b_s"], p["V"], scale=1.1).detach()
    t = logits(p["h_t"], p["W_t"], p["b_t"], p["V"], cap=3.0)
    ids = torch.topk(z if support == "student" else t, k, dim=-1).indices
    assert s.topk_ids.shape == (3, 7, k) and torch.equal(s.topk_ids, ids)
    torch.testing.assert_close(s.student_topk_logits.detach(), z.gather(-1, ids), **F64)
    torch.testing.assert_close(s.teacher_topk_logprobs, dv.logprobs_at(t, ids), **F64)
    assert s.student_topk_logits.requires_grad and not s.teacher_topk_logprobs.requires_grad


def test_student_topk_without_teacher(one_thread):
    p = make(seed=49)
    s = F.fused_token_stats(p["h_s"], p["W_s"], p["y"], student_bias=p["b_s"], topk=5, token_chunk=3, vocab_chunk=7)
    z = logits(p["h_s"], p["W_s"], p["b_s"], p["V"]).detach()
    assert torch.equal(s.topk_ids, torch.topk(z, 5, dim=-1).indices) and s.teacher_topk_logprobs is None


@pytest.mark.parametrize("name", TOPK_NAMES)
def test_topk_float32_tolerance(one_thread, name):
    """float32 against float64, relative to max(1, max |ref|): at most 2e-5 for values and gradients
    (measured worst over seeds 50..69, k = 16, V = 257: 5.9e-6 for topk_tail_kl's gradients,
    <= 2.2e-6 for the others), and at most 3x the materialised float32 path's error + 1e-6 (5x for
    topk_tail_kl: its gradient is summed from two matmuls, the support's and lse's pass over V, that
    partly cancel on the support, where the materialised path adds them per logit; measured up to
    4.2x, worst err / (5 mat + 1e-6) = 0.74; the others' worst err / (3 mat + 1e-6) = 0.70)."""
    factor = 5 if name == "topk_tail_kl" else 3
    for seed in range(3):
        p64 = make(seed=50 + seed, B=3, T=8, d_s=16, d_t=19, V=257)
        v64, g64 = materialised(name, p64, k=16)
        p32 = {k: (v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
                   else v) for k, v in p64.items()}
        v32, g32 = fused(name, p32, 5, 16, k=16)
        m32, gm32 = materialised(name, p32, k=16)
        assert v32.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g32)
        for got, mat, ref in zip((v32,) + tuple(g32), (m32,) + tuple(gm32), (v64,) + tuple(g64)):
            err = _relative(got, ref)
            assert err <= 2e-5
            assert err <= factor * _relative(mat, ref) + 1e-6


def test_topk_errors_name_the_problem():
    p = make(seed=13)
    a = (p["h_s"], p["W_s"], p["y"], p["mask"], p["h_t"], p["W_t"])
    z = logits(p["h_s"], p["W_s"], p["b_s"], p["V"])
    batch = TokenBatch(tokens=p["y"], mask=p["mask"], student_logits=z, teacher_token_logprobs=torch.zeros(3, 7),
                       teacher_logits=z.detach())
    for name in TOPK_NAMES:
        with pytest.raises(InputError) as want:
            E.per_sequence(name, batch, k=38)
        with pytest.raises(InputError) as got:
            fs.fused_per_sequence(name, *a, k=38)
        assert str(got.value) == str(want.value) and "k must satisfy 1 <= k <= V = 37" in str(got.value)
    with pytest.raises(InputError, match="student_topk_kl: k must satisfy"):
        fs.fused_per_sequence("student_topk_kl", *a)                     # the default k = 100 > V
    with pytest.raises(InputError, match="k must be an integer"):
        fs.fused_per_sequence("vopd_topk", *a, k=2.0)
    with pytest.raises(InputError, match="unknown"):
        fs.fused_per_sequence("vopd", *a, k=4)
    with pytest.raises(InputError, match="topk_support"):
        F.fused_token_stats(p["h_s"], p["W_s"], p["y"], topk=3, topk_support="both")
    with pytest.raises(InputError, match="teacher's top-k support needs"):
        F.fused_token_stats(p["h_s"], p["W_s"], p["y"], topk=3, topk_support="teacher")


# ----------------------------------------------------------------------------- masks

def test_masked_positions_are_not_read(one_thread):
    # token ids at masked positions may be anything (-100 padding): never read, no contribution
    p = make(seed=8)
    ref = materialised("vopd", p)
    p["y"] = torch.where(p["mask"].bool(), p["y"], torch.full_like(p["y"], -100))
    got = fused("vopd", p)
    assert_match(got, ref, **F64)
    s = F.fused_token_stats(p["h_s"], p["W_s"], p["y"], p["h_t"], p["W_t"], mask=p["mask"])
    off = ~p["mask"].bool()
    assert (s.student_logprobs[off] == 0).all() and (s.kl[off] == 0).all()
    assert (got[1][0][off] == 0).all()                           # no gradient to masked hidden states


def test_all_masked_batch_gives_zeros(one_thread):
    p = make(seed=9)
    p["mask"] = torch.zeros_like(p["mask"])
    for name in NAMES:
        values, grads = fused(name, p)
        assert (values == 0).all() and all((g == 0).all() for g in grads)


def test_teacher_gets_no_gradient(one_thread):
    p = make(seed=10)
    p["h_t"].requires_grad_(True)
    p["W_t"].requires_grad_(True)
    v = fs.fused_per_sequence("full_kl", p["h_s"], p["W_s"], p["y"], p["mask"], p["h_t"], p["W_t"])
    v.sum().backward()
    assert p["h_t"].grad is None and p["W_t"].grad is None and p["W_s"].grad is not None


def test_opd_from_precomputed_teacher_logprobs(one_thread):
    # a student-only pass: lp_T given, no teacher head
    p = make(seed=11)
    t = logits(p["h_t"], p["W_t"], p["b_t"], p["V"])
    t_lp = torch.log_softmax(t, -1).gather(-1, p["y"].unsqueeze(-1)).squeeze(-1)
    v = fs.fused_per_sequence("opd", p["h_s"], p["W_s"], p["y"], p["mask"], teacher_token_logprobs=t_lp,
                             student_bias=p["b_s"], token_chunk=2, vocab_chunk=7)
    assert_match((v.detach(), _grads(v, p)), materialised("opd", p), **F64)
    s = F.fused_token_stats(p["h_s"], p["W_s"], p["y"])
    assert s.kl is None and s.teacher_logprobs is None and s.bstar is None


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean", "sum", "none"])
def test_surrogate_loss_reductions_match_the_registry(one_thread, reduction):
    p = make(seed=12)
    z = logits(p["h_s"], p["W_s"], p["b_s"], p["V"])
    t = logits(p["h_t"], p["W_t"], p["b_t"], p["V"]).detach()
    batch = TokenBatch(tokens=p["y"], mask=p["mask"], student_logits=z,
                       teacher_token_logprobs=torch.log_softmax(t, -1).gather(-1, p["y"][..., None])[..., 0],
                       teacher_logits=t)
    want = E.surrogate_loss("vopd", batch, reduction=reduction)
    got = fs.fused_surrogate_loss("vopd", p["h_s"], p["W_s"], p["y"], p["mask"], p["h_t"], p["W_t"],
                                 student_bias=p["b_s"], teacher_bias=p["b_t"], reduction=reduction)
    torch.testing.assert_close(got, want, **F64)
    got = fs.fused_surrogate_loss("vopd", p["h_s"], p["W_s"], p["y"], p["mask"], p["h_t"], p["W_t"],
                                 student_bias=p["b_s"], teacher_bias=p["b_t"], reduction="token_mean",
                                 num_items_in_batch=40)
    torch.testing.assert_close(got, E.surrogate_loss("vopd", batch, reduction="token_mean",
                                                     num_items_in_batch=40), **F64)


# ----------------------------------------------------------------------------- float32 and bf16

def _relative(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0))


@pytest.mark.parametrize("name", NAMES)
def test_float32_tolerance(one_thread, name):
    """float32 against float64, relative to max(1, max |ref|): at most 5e-5 for values and gradients
    (measured worst over 20 seeds: 1.5e-5 for opd_bstar's gradient through 1 - |q|^2, <= 6e-6 for
    the others), and never more than 3x the materialised float32 path's error + 1e-6."""
    for seed in range(3):
        p64 = make(seed=20 + seed, B=3, T=8, d_s=16, d_t=19, V=257)
        v64, g64 = materialised(name, p64)
        p32 = {k: (v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
                   else v) for k, v in p64.items()}
        v32, g32 = fused(name, p32, 5, 16)
        m32, gm32 = materialised(name, p32)
        assert v32.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g32)
        for got, mat, ref in zip((v32,) + tuple(g32), (m32,) + tuple(gm32), (v64,) + tuple(g64)):
            err = _relative(got, ref)
            assert err <= 5e-5
            assert err <= 3 * _relative(mat, ref) + 1e-6


def test_bfloat16_inputs_compute_in_float32(one_thread):
    p64 = make(seed=30, d_s=16, d_t=16, V=100)
    v64, g64 = materialised("full_kl", p64)
    pb = {k: (v.detach().bfloat16().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
              else v) for k, v in p64.items()}
    vb, gb = fused("full_kl", pb, 4, 32)
    assert vb.dtype == torch.float32
    assert [g.dtype for g in gb] == [torch.bfloat16] * 3
    # bf16 inputs (8 bits of mantissa): values and gradients of the bf16-rounded problem, to ~1e-2
    assert _relative(vb, v64) < 5e-2 and all(_relative(a, b) < 5e-2 for a, b in zip(gb, g64))


# ----------------------------------------------------------------------------- memory and errors

@pytest.mark.parametrize("name, params", [("full_kl", {}), ("vopd_topk", {"k": 64}), ("topk_kl", {"k": 64}),
                                          ("topk_tail_kl", {"k": 64})])
def test_never_holds_an_n_by_v_tensor(one_thread, name, params):
    from benchmarks import common

    N, V, d = 64, 8192, 4
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, N, d, generator=g, requires_grad=True)
    W = torch.randn(V, d, generator=g, requires_grad=True)
    h_t, W_t = torch.randn(1, N, d, generator=g), torch.randn(V, d, generator=g)
    y, m = torch.randint(0, V, (1, N), generator=g), torch.ones(1, N)

    def step():
        h.grad = W.grad = None
        fs.fused_per_sequence(name, h, W, y, m, h_t, W_t, token_chunk=32, vocab_chunk=512, **params).sum().backward()

    peak = common.peak_memory(step, torch.device("cpu"))
    # W.grad alone is V d floats (128 KiB), a tile 64 KiB; one [N, V] float32 tensor would be 2 MiB
    assert V * d * 4 <= peak < N * V * 4 / 2


def test_errors_name_the_problem():
    p = make(seed=13)
    a = (p["h_s"], p["W_s"], p["y"], p["mask"], p["h_t"], p["W_t"])
    with pytest.raises(InputError, match="fused path has estimators"):
        fs.fused_per_sequence("gkd_jsd", *a)
    with pytest.raises(InputError, match="rho"):
        fs.fused_per_sequence("opd", *a, rho=0.5)
    with pytest.raises(InputError, match="unknown"):
        fs.fused_per_sequence("opd", *a, alpha=2.0)
    with pytest.raises(InputError, match="needs the teacher"):
        fs.fused_per_sequence("vopd", p["h_s"], p["W_s"], p["y"], p["mask"])
    with pytest.raises(InputError, match="token ids must lie"):
        F.fused_token_stats(p["h_s"], p["W_s"], p["y"] + 100)
    with pytest.raises(InputError, match="rows"):
        F.fused_token_stats(p["h_s"], p["W_s"], p["y"], p["h_t"], p["W_t"][:30])
    with pytest.raises(InputError, match="exceeds"):
        F.fused_token_stats(p["h_s"], p["W_s"], p["y"], vocab_size=50)
    with pytest.raises(InputError, match="token_chunk"):
        F.fused_token_stats(p["h_s"], p["W_s"], p["y"], token_chunk=0)
    with pytest.raises(InputError, match="soft-capping"):
        F.fused_token_stats(p["h_s"], p["W_s"], p["y"], student_softcap=-1.0)
    with pytest.raises(InputError, match="student_weight"):
        F.fused_token_stats(p["h_s"], p["W_s"][:, :3], p["y"])
    with pytest.raises(InputError, match="both teacher"):
        F.fused_token_stats(p["h_s"], p["W_s"], p["y"], p["h_t"])
    with pytest.raises(InputError, match="reduction"):
        fs.fused_surrogate_loss("opd", *a, reduction="mean")


# ----------------------------------------------------------------------------- benchmark smoke

def test_benchmark_measure_and_table(one_thread):
    from benchmarks import fused_path as fp

    rows = fp.measure(tokens=16, vocab=300, hidden=8, device=torch.device("cpu"), repeats=1, warmup=1,
                      min_sample_s=0.0, token_chunk=8, vocab_chunk=64)
    assert [(r.estimator, r.method) for r in rows] == [("full_kl", "materialised"), ("full_kl", "fused"),
                                                      ("vopd", "materialised"), ("vopd", "fused")]
    for r in rows:
        assert r.time_s > 0 and math.isfinite(r.time_ratio) and r.mem_bytes > 0
        assert r.value_error < 1e-4                                   # float32 fused vs materialised
    table = fp.format_table(rows).splitlines()
    assert table[0].startswith("| N | estimator | materialised s") and len(table) == 4
    assert table[2].split("|")[1].strip() == "16"


def test_benchmark_main_appends_an_entry(one_thread, tmp_path, monkeypatch, capsys):
    from benchmarks import fused_path as fp

    monkeypatch.setattr(fp, "grid", lambda quick: [8])
    monkeypatch.setattr(fp.common, "peak_memory", lambda fn, device: (fn(), 1)[1])     # no profiler: fast
    results = tmp_path / "R.md"
    results.write_text("# existing\n\nold entry\n")
    assert fp.main(["--quick", "--repeats", "1", "--threads", "0", "--vocab", "64", "--hidden", "4",
                    "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# existing\n\nold entry\n") and "fused_path --quick" in text
    assert "| N | estimator |" in text and "TRL" in text
    assert fp.main(["--quick", "--repeats", "1", "--threads", "0", "--vocab", "64", "--hidden", "4",
                    "--results", str(results), "--no-record"]) == 0
    assert results.read_text() == text


def test_benchmark_no_trl_leaves_out_the_trl_column(one_thread, tmp_path, monkeypatch, capsys):
    from benchmarks import fused_path as fp

    monkeypatch.setattr(fp, "grid", lambda quick: [8])
    monkeypatch.setattr(fp.common, "peak_memory", lambda fn, device: (fn(), 1)[1])
    monkeypatch.setattr(fp, "load_trl", lambda *a: pytest.fail("--no-trl imported TRL"))
    results = tmp_path / "R.md"
    assert fp.main(["--quick", "--repeats", "1", "--threads", "0", "--vocab", "64", "--hidden", "4",
                    "--estimators", "full_kl", "--no-trl", "--results", str(results)]) == 0
    text = results.read_text()
    assert "TRL column left out (--no-trl)" in text
    assert text.rstrip().splitlines()[-1].endswith("| - | - | - |")


def test_benchmark_times_topk_and_bstar_next_to_opd_and_full_kl(one_thread):
    from benchmarks import fused_path as fp

    rows = fp.measure(tokens=16, vocab=300, hidden=8, device=torch.device("cpu"), repeats=1, warmup=1,
                      min_sample_s=0.0, token_chunk=8, vocab_chunk=64, estimators=fp.TOPK_COMPARISON, k=8,
                      measure_memory=False)
    assert [(r.estimator, r.method) for r in rows] == [(n, m) for n in ("opd", "full_kl", "vopd_topk", "opd_bstar")
                                                      for m in ("materialised", "fused")]
    for r in rows:
        assert r.time_s > 0 and math.isfinite(r.time_ratio) and r.value_error < 1e-4
    assert fp.estimator_params("vopd_topk", 8) == {"k": 8} and fp.estimator_params("opd", 8) == {}
    assert len(fp.format_table(rows).splitlines()) == 2 + 4


def test_benchmark_main_takes_estimators_and_k(one_thread, tmp_path, monkeypatch, capsys):
    from benchmarks import fused_path as fp

    monkeypatch.setattr(fp, "grid", lambda quick: [8])
    monkeypatch.setattr(fp.common, "peak_memory", lambda fn, device: (fn(), 1)[1])
    results = tmp_path / "R.md"
    assert fp.main(["--quick", "--repeats", "1", "--threads", "0", "--vocab", "64", "--hidden", "4",
                    "--estimators", "vopd_topk", "opd_bstar", "--k", "4", "--results", str(results)]) == 0
    text = results.read_text()
    assert "estimators vopd_topk, opd_bstar (vopd_topk k = 4)" in text
    assert "| 8 | vopd_topk |" in text and "| 8 | opd_bstar |" in text
    with pytest.raises(SystemExit):
        fp.main(["--estimators", "k3", "--no-record"])
