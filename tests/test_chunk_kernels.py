"""The compiled (fused) kernels of ``vopd_analysis.chunk_kernels`` against the eager chunked pass of
``divergences._ChunkedTokenLogprobs``, values and gradients, and the switch that turns them off.

Tolerances (the compiled kernels reduce in another order, so they agree to round-off, not bit for
bit): float32 |difference| <= 1e-5 relative + 1e-6 absolute (the gradients scaled by the largest
upstream weight, N); float64 1e-12; bfloat16 logits one bfloat16 ulp in the gradient (the compiled
backward rounds -g q to bf16 before adding the sampled-token term, the eager one after).

Compilation costs seconds per variant, so only a few shapes are compiled here; every other test
runs the eager pass (tests/conftest.py sets VOPD_COMPILE=0).
"""

import os
import warnings

import pytest
import torch

from vopd_analysis import chunk_kernels
from vopd_analysis import divergences as dv

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(N, V, dtype, masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (2 * torch.randn(N, V, generator=g, dtype=torch.float64)).to(dtype)
    t = (z.double() + torch.randn(N, V, generator=g, dtype=torch.float64)).to(dtype)
    if masked:          # a hard-masked vocabulary, and a student at -inf where the teacher is finite
        z[:, :5] = float("-inf")
        t[:, :3] = float("-inf")
        z[0, 7] = float("-inf")
    y = torch.randint(5, V, (N,), generator=g)
    return z, t, y


def _run(kind, z, t, y, compiled):
    """(values, gradient) of one chunked-pass function with an upstream weight per token."""
    N = z.shape[0]
    w = torch.arange(1, N + 1, dtype=torch.float64).to(dv.compute_dtype(z))
    zl = z.clone().requires_grad_(True)
    if kind == "lse":
        lp, lse = dv.token_logprobs_and_lse(zl, y, compiled=compiled)
        vals, loss = (lp, lse), (w * lp).sum()
    elif kind == "kl":
        lp, kl = dv.token_logprobs_and_reverse_kl(zl, y, t, dv.logsumexp_detached(t), compiled=compiled)
        vals, loss = (lp, kl), ((1 - kl) * w * lp).sum()
    elif kind == "kl_own_lse":
        lp, kl = dv.token_logprobs_and_reverse_kl(zl, y, t, compiled=compiled)
        vals, loss = (lp, kl), (kl * w * lp).sum()
    elif kind == "bstar":
        lp, b = dv.token_logprobs_and_optimal_baseline(zl, y, t, compiled=compiled)
        vals, loss = (lp, b), ((1 - b) * w * lp).sum()
    else:               # full_kl: the KL carries the gradient, with and without a log-prob beside it
        kl = dv.reverse_kl_to_fixed_teacher(zl, t, compiled=compiled)
        lp, _ = dv.token_logprobs_and_lse(zl, y, compiled=compiled)
        vals, loss = (kl,), (w * kl).sum() + lp.sum()
    loss.backward()
    return [v.detach() for v in vals], zl.grad


def _close(a, b, rtol, atol):
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["lse", "kl", "kl_own_lse", "bstar", "full_kl"])
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_equals_eager_float32(kind, masked):
    z, t, y = _pair(24, 300, torch.float32, masked=masked)
    ev, eg = _run(kind, z, t, y, compiled=False)
    cv, cg = _run(kind, z, t, y, compiled=True)
    for a, b in zip(ev, cv):
        _close(b, a, rtol=1e-5, atol=1e-6)
    _close(cg, eg, rtol=1e-5, atol=1e-6 * z.shape[0])


def test_compiled_equals_eager_float64_and_bfloat16():
    z, t, y = _pair(16, 200, torch.float64)
    for kind in ("kl", "bstar"):
        ev, eg = _run(kind, z, t, y, compiled=False)
        cv, cg = _run(kind, z, t, y, compiled=True)
        for a, b in zip(ev + [eg], cv + [cg]):
            _close(b, a, rtol=1e-12, atol=1e-12 * z.shape[0])
    z, t, y = _pair(16, 200, torch.bfloat16)
    ev, eg = _run("kl", z, t, y, compiled=False)
    cv, cg = _run("kl", z, t, y, compiled=True)
    for a, b in zip(ev, cv):
        _close(b, a, rtol=1e-5, atol=1e-6)
    assert cg.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * eg.float().abs().clamp_min(1.0)
    assert bool(((cg.float() - eg.float()).abs() <= ulp).all())


def test_switch_environment_argument_and_size(monkeypatch):
    big, small = chunk_kernels.MIN_ELEMENTS, 6
    monkeypatch.delenv("VOPD_COMPILE", raising=False)
    assert chunk_kernels.use_compiled(None, big, "cuda") and not chunk_kernels.use_compiled(None, small, "cuda")
    assert not chunk_kernels.use_compiled(None, big, "cpu")          # unset: eager on the CPU
    monkeypatch.setenv("VOPD_COMPILE", "1")
    assert chunk_kernels.use_compiled(None, big, "cpu") and not chunk_kernels.use_compiled(None, small, "cpu")
    monkeypatch.delenv("VOPD_COMPILE")
    assert chunk_kernels.use_compiled(True, small) and not chunk_kernels.use_compiled(False, big)
    for off in ("0", "false", "off"):
        monkeypatch.setenv("VOPD_COMPILE", off)
        assert not chunk_kernels.use_compiled(None, big)
        assert chunk_kernels.use_compiled(True, small)       # the argument wins over the environment
    monkeypatch.setenv("VOPD_COMPILE", "1")
    with chunk_kernels.eager():
        assert not chunk_kernels.use_compiled(None, big)
    assert chunk_kernels.use_compiled(None, big)
    monkeypatch.delenv("VOPD_COMPILE")
    assert not chunk_kernels.use_compiled(None, big)
    with chunk_kernels.eager():
        assert not chunk_kernels.use_compiled(None, big)
    assert "VOPD_COMPILE" not in os.environ


def test_switch_off_runs_the_eager_pass_bit_for_bit(monkeypatch):
    """compiled=False, and VOPD_COMPILE=0 with the size threshold met, never call the kernels."""
    calls = []
    monkeypatch.setattr(chunk_kernels, "forward", lambda *a: calls.append(a))
    monkeypatch.setattr(chunk_kernels, "MIN_ELEMENTS", 1)
    monkeypatch.setenv("VOPD_COMPILE", "0")
    z, t, y = _pair(6, 40, torch.float32)
    a = dv.token_logprobs_and_reverse_kl(z, y, t)
    b = dv.token_logprobs_and_reverse_kl(z, y, t, compiled=False)
    assert not calls
    monkeypatch.setenv("VOPD_COMPILE", "1")
    dv.token_logprobs_and_reverse_kl(z, y, t)
    assert len(calls) == 1                              # on above the threshold: the kernel is asked
    # it returned None (as an unavailable compiler does): the eager pass answered, bit for bit
    c = dv.token_logprobs_and_reverse_kl(z, y, t, compiled=True)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(chunk_kernels, "_compiled_fns", {})
    monkeypatch.setattr(chunk_kernels, "_failed", False)
    monkeypatch.setattr(torch, "compile", broken)
    z, t, y = _pair(6, 40, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lp, kl = dv.token_logprobs_and_reverse_kl(z.clone().requires_grad_(True), y, t, compiled=True)
    assert any("torch.compile failed" in str(w.message) for w in caught)
    assert chunk_kernels._failed and not chunk_kernels.use_compiled(True, z.numel())
    ref = dv.token_logprobs_and_reverse_kl(z, y, t, compiled=False)
    assert torch.equal(lp.detach(), ref[0]) and torch.equal(kl, ref[1])



def test_compiled_sums_stay_accurate_over_a_large_vocabulary():
    """Row sums over V = 151,936 (float64 accumulation on CPU): the float32 KL and b* within 1e-5
    relative of the float64 reference, as the eager pass is (float32 accumulation was 3e-5 off)."""
    g = torch.Generator().manual_seed(3)
    N, V = 8, 151_936
    z = 3 * torch.randn(N, V, generator=g)
    t = z + torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    kl64 = dv.reverse_kl(z.double(), t.double())
    b64 = dv.optimal_scalar_baseline(torch.log_softmax(z.double(), -1), torch.log_softmax(t.double(), -1))
    for compiled in (False, True):
        _, kl = dv.token_logprobs_and_reverse_kl(z, y, t, compiled=compiled)
        _, b = dv.token_logprobs_and_optimal_baseline(z, y, t, compiled=compiled)
        assert float(((kl.double() - kl64) / kl64).abs().max()) < 1e-5
        assert float(((b.double() - b64) / b64).abs().max()) < 1e-5
