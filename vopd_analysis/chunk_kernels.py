"""Compiled, fused kernels for the chunked log-prob / KL / b* pass (``divergences._ChunkedTokenLogprobs``).

The eager pass works chunk by chunk with one PyTorch op per line, so every line is a separate
sweep over the chunk; vOPD's baseline then costs a subtract, a multiply, a NaN fix-up and a sum
on top of opd. Here the same mathematics is written as two functions over the whole [N, V]
logits and handed to ``torch.compile`` (inductor: vectorised C++ on CPU, Triton on CUDA), which
turns each into one fused kernel: per row,

    forward:  m = max_v z_v,  Z = sum_v e_v,  e_v = exp(z_v - m),  lse = m + log Z
              (teacher)  A = sum_v e_v (z_v - t_v),  KL = A / Z - lse + lse_T
              (b*)       S2 = sum_v e_v^2,  B = sum_v e_v^2 (z_v - t_v),
                         |q|^2 = S2 / Z^2,  sum_v q_v^2 l_v = B / Z^2 - (lse - lse_T) |q|^2
    backward: G_v = q_v (k (z_v - t_v - shift) - g)   or   G_v = -g q_v   (no KL gradient),
              q_v = exp(z_v - lse),  shift = lse - lse_T + KL,  k, g the upstream gradients,

so the KL and b* sums ride along in the loop that already reads z and exponentiates it, and the
teacher is read once per pass, which is all a full-vocabulary baseline has to add to opd. No
[N, V] tensor is allocated besides the gradient (the sampled-token term g_j 1[v = y_j] is added
by the caller with ``scatter_add_``, O(N k)).

Terms with q_v = 0 are 0 (``torch.where(e == 0, 0, ...)``), as the eager pass's NaN fix-up
makes them; the two differ only on NaN or +inf inputs. Sums are reduced in a different order
(on CPU in float64, see ``_forward``) than the eager ops, so results agree with the eager pass
to float round-off, not bit for bit (tests/test_chunk_kernels.py: float32 values and gradients
within 1e-5 relative / 1e-6 absolute, float64 within 1e-12, bf16 gradients within one bf16 ulp,
and the KL and b* within 1e-5 of float64 at V = 151,936).

The switch (read on every call, so it can change at run time):

* ``compiled=`` on ``divergences.token_logprobs_and_lse``, ``token_logprobs_and_reverse_kl``,
  ``token_logprobs_and_optimal_baseline`` and ``reverse_kl_to_fixed_teacher``: ``False`` = eager,
  ``True`` = compiled at any size, ``None`` (default) = the environment decides;
* environment ``VOPD_COMPILE`` (or a ``with chunk_kernels.eager():`` block, which sets it to 0):
  ``0`` / ``false`` / ``off`` = always eager; ``1`` / ``true`` / ``on`` = compiled for logits of at
  least ``MIN_ELEMENTS`` values on any device (below that a compiled call's fixed overhead outweighs
  what fusing saves); unset = the same on CUDA, eager on the CPU. The CPU default is eager because
  the compiled sums round differently: the committed tables were computed by the eager pass and a
  run that samples from a trained student parts from them once a token flips, and the first call of
  each kernel variant costs seconds of compilation. ``VOPD_COMPILE=1`` turns it on for CPU runs
  (``benchmarks.estimator_cost`` does, to measure it).

Compilation costs seconds per new (dtype, teacher/b* variant) on first use; shapes are dynamic,
so a new N or V does not recompile. If ``torch.compile`` is unavailable or fails (no C++
compiler, no Triton, an unsupported Python), the first failure warns once and every later call
takes the eager pass. Inside an outer ``torch.compile`` region the eager pass is traced instead.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, Optional

import torch

# Below this many logits (1 MiB of float32) the eager pass is used unless compiled=True.
MIN_ELEMENTS = 1 << 18

_OFF = ("0", "false", "no", "off")
_compiled_fns: Dict[str, Callable] = {}
_failed = False
_RECOMPILE_LIMIT = 64


def use_compiled(requested: Optional[bool], numel: int, device_type: str = "cpu") -> bool:
    """Whether the compiled kernels serve a call on ``numel`` logits on a ``device_type`` device
    (``requested`` = the ``compiled=`` argument; the rule is in the module docstring)."""
    if requested is False or _failed or torch.compiler.is_compiling():
        return False
    if requested is None:
        setting = os.environ.get("VOPD_COMPILE")
        if setting is not None and setting.strip().lower() in _OFF:
            return False
        return numel >= MIN_ELEMENTS and (setting is not None or device_type == "cuda")
    return True


@contextlib.contextmanager
def eager():
    """``VOPD_COMPILE=0`` for the duration of a ``with`` block: the chunked pass runs eagerly."""
    before = os.environ.get("VOPD_COMPILE")
    os.environ["VOPD_COMPILE"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["VOPD_COMPILE"]
        else:
            os.environ["VOPD_COMPILE"] = before


def _forward(z: torch.Tensor, t: Optional[torch.Tensor], t_lse: Optional[torch.Tensor], want_bstar: bool,
             dtype: torch.dtype):
    """(lse, lse_T, KL, |q|^2, sum q^2 l) per row of [N, V] logits (the module docstring), in ``dtype``
    (the caller's ``divergences.compute_dtype``); entries that are not asked for (no teacher, no b*) are None. On CPU the row sums accumulate in float64:
    inductor's float32 sums over a 151,936-entry row were off by ~1e-5 relative (biasing the KL by
    ~4e-6), against ~1e-7 for the eager pass; float64 accumulation is below both."""
    acc = torch.float64 if z.device.type == "cpu" else dtype
    z = z.to(dtype)
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    Z = e.sum(-1, dtype=acc)
    lse = m.squeeze(-1) + Z.log().to(dtype)
    if t is None:
        return lse, None, None, None, None
    t = t.to(dtype)
    if t_lse is None:
        mt = t.amax(-1, keepdim=True)
        t_lse = mt.squeeze(-1) + torch.exp(t - mt).sum(-1, dtype=acc).log().to(dtype)
    ed = torch.where(e == 0, 0.0, (z - t) * e)                      # e (z - t), 0 where e = 0
    kl = t_lse - lse + (ed.sum(-1, dtype=acc) / Z).to(dtype)
    if not want_bstar:
        return lse, t_lse, kl, None, None
    Z2 = Z * Z
    q_sq = (e * e).sum(-1, dtype=acc) / Z2
    q2l = ((ed * e).sum(-1, dtype=acc) / Z2).to(dtype) - (lse - t_lse) * q_sq.to(dtype)
    return lse, t_lse, kl, q_sq.to(dtype), q2l


def _backward(z: torch.Tensor, t: Optional[torch.Tensor], lse: torch.Tensor, shift: Optional[torch.Tensor],
              g_kl: Optional[torch.Tensor], g_sum: Optional[torch.Tensor]) -> torch.Tensor:
    """The logit gradient without the sampled-token term, in z's dtype: -g q (no KL gradient) or
    q (k (z - t - shift) - g) with g = 0 when no log-prob gradient (``shift``, ``g_kl``, ``g_sum`` [N, 1])."""
    dtype = lse.dtype
    zc = z.to(dtype)
    q = torch.exp(zc - lse.unsqueeze(1))
    if g_kl is None:
        return (q * g_sum.neg()).to(z.dtype)
    w = (zc - t.to(dtype) - shift) * g_kl
    if g_sum is not None:
        w = w - g_sum
    return torch.where(q == 0, 0.0, q * w).to(z.dtype)                # q = 0: no gradient


def _call(name: str, fn: Callable, *args):
    """``torch.compile(fn)(*args)``, or None after warning once when compilation is unavailable."""
    global _failed
    try:
        if name not in _compiled_fns:
            _compiled_fns[name] = torch.compile(fn, dynamic=True)
        # one graph per (dtype, teacher / lse / b* variant): up to ~20, above dynamo's default limit
        # of 8 per function, past which it would silently run the unfused Python instead
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return _compiled_fns[name](*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the eager reference
        _failed = True
        warnings.warn(f"vopd_analysis: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                      "the chunked pass runs eagerly from now on (VOPD_COMPILE=0 silences this)",
                      RuntimeWarning, stacklevel=3)
        return None


def forward(z, t, t_lse, want_bstar: bool, dtype: torch.dtype):
    """Compiled ``_forward``, or None (then run the eager pass)."""
    return _call("forward", _forward, z, t, t_lse, want_bstar, dtype)


def backward(z, t, lse, shift, g_kl, g_sum):
    """Compiled ``_backward``, or None (then run the eager pass)."""
    return _call("backward", _backward, z, t, lse, shift, g_kl, g_sum)

