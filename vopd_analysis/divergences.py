"""Per-token divergences between a student q = softmax(z) and a teacher p.

All functions act on the last (vocabulary) axis and return one value per token.
They compute in at least float32, whatever the input dtype (bf16 logits from a
GPU model are upcast chunk by chunk, never as one ``[B, T, V]`` float32 copy).

Masked vocabularies. A logit of -inf is probability 0, and a term with probability 0
contributes 0 (0 log 0 = 0, 0 log(0/p) = 0), in the values and in their gradients: a
student and a teacher both at -inf on the same tokens (a hard-masked vocabulary) have the
finite KL of the remaining tokens, and a student at -inf where the teacher is finite simply
has q = 0 there. A teacher at -inf where the student has mass gives KL(q || p) = +inf, which
is the true value (its gradient is then not finite either). On finite inputs the convention
changes no result by a single bit (tests/test_divergences.py compares against the plain formulas).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import chunk_kernels

# Detached reductions over V work on chunks of about this many elements per temporary
# (1 MiB in float32): small enough to stay in cache and to be served from the allocator's
# free lists, so they neither touch fresh pages nor keep a second [B, T, V] tensor alive.
_CHUNK_ELEMENTS = 1 << 18


_NEG_INF = float("-inf")


def zero_nan_(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN set to 0 in place, infinities kept: in a product (z - t) e or q (log q - log p - c)
    of finite-or-(-inf) logits a NaN can only be 0 times an infinite log-ratio, a probability-0
    term, which contributes 0."""
    return x.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=_NEG_INF)


def _plogratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a (log a - log b) elementwise, with 0 where a = 0 exactly (log a = -inf): 0 log 0 = 0 and
    0 log(0 / b) = 0, in the value and in the gradient; other entries bit for bit the plain product."""
    diff = log_a - log_b
    return log_a.exp() * torch.where(log_a == _NEG_INF, torch.zeros((), dtype=diff.dtype, device=diff.device), diff)


def logsumexp_detached(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis of detached ``logits`` in the compute dtype, in chunks (no [B, T, V] copy)."""
    return _chunked_token_logprobs(logits.detach())[1]


def _chunk_rows(vocab: int, tokens: int) -> int:
    """Rows per chunk: about ``_CHUNK_ELEMENTS`` values, or 1/32 of all ``tokens`` when that is
    more, so a large vocabulary is not walked one token at a time (at most ~32 steps per call);
    but at most half the tokens, so two chunk-sized temporaries never outweigh one [N, V] tensor."""
    rows = max(_CHUNK_ELEMENTS, tokens * vocab // 32) // max(1, vocab)
    return max(1, min(rows, tokens // 2))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: bf16 / fp16 / fp32 are computed in float32."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def bstar_from_sums(kl: torch.Tensor, q_sq: torch.Tensor, q2l: torch.Tensor) -> torch.Tensor:
    """b* = sum_y w_y l_y / sum_y w_y with w_y = q_y (1 + |q|^2 - 2 q_y), from per-row sums only:

        sum_y w_y     = 1 - |q|^2                         (sum_y q_y = 1)
        sum_y w_y l_y = (1 + |q|^2) KL - 2 sum_y q_y^2 l_y,

    so the chunked pass needs |q|^2 and sum q^2 l beside the KL it computes anyway. 0/0 (a
    one-hot student) reads as 0, as in ``optimal_scalar_baseline``."""
    den = 1.0 - q_sq
    num = (1.0 + q_sq) * kl - 2.0 * q2l
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Row by row over [N, V] logits z (in chunks of rows), with optional token ids y [N, k]
    (k = 1: the sampled token) and an optional teacher t held fixed (and its logsumexp, when the caller has it: then t is only
    read, never exponentiated):

        lse_n = logsumexp(z_n) = m_n + log Z_n,  e = exp(z_n - m_n), Z_n = sum_v e_v, m_n = max_v z_{n,v}
        lp_nj = z_{n,y_nj} - lse_n
        kl_n  = KL(softmax(z_n) || softmax(t_n)) = sum_v e_v (z_v - t_v) / Z_n - lse_n + logsumexp(t_n)
        b*_n  = sum_v w_v l_v / sum_v w_v,  w_v = q_v (1 - 2 q_v + |q|^2),  l_v = log q_v - log p_v
                (only when asked: ``optimal_scalar_baseline`` from the same chunk e)

    kl reuses the chunk e that the logsumexp needs, so the vOPD baseline costs one extra read
    of t and no extra exponential of z. The backward is written by hand (q = softmax(z_n),
    p = softmax(t_n)),

        d lp_nj / d z_{n,v} = 1[v = y_nj] - q_v,
        d kl_n / d z_{n,v} = q_v (log q_v - log p_v - kl_n),

    and fills the gradient chunk by chunk: besides the gradient itself no [N, V] tensor is
    ever allocated (autograd's logsumexp + gather keep three, a log_softmax-based KL five).
    lse is detached; a caller that uses kl as a baseline detaches it.

    With ``compiled`` the same sums and gradient come from the fused kernels of
    ``chunk_kernels`` (one loop over all rows, no chunks); the loops below are the eager
    reference, and serve whenever the compiled kernels are off or unavailable.
    """

    @staticmethod
    def forward(ctx, z, y, t, t_lse, want_bstar=False, compiled=False):
        N, V = z.shape
        dtype = compute_dtype(z)
        fused = chunk_kernels.forward(z, t, t_lse, want_bstar, dtype) if compiled else None
        ctx.compiled = fused is not None
        if fused is not None:
            lse, t_lse_own, kl, q_sq, q2l = fused
            t_lse = t_lse_own if t is not None else t_lse
            kl = lse.new_empty(0) if kl is None else kl
            bstar = bstar_from_sums(kl, q_sq, q2l) if want_bstar else lse.new_empty(0)
        else:
            lse, kl, bstar, t_lse = _ChunkedTokenLogprobs._eager_sums(z, t, t_lse, want_bstar, dtype)
        lp = lse.new_empty(0) if y is None else z.gather(1, y).to(dtype) - lse.unsqueeze(1)
        ctx.save_for_backward(z, y, lse, t, t_lse, kl if t is not None else None)
        ctx.mark_non_differentiable(lse, bstar)
        ctx.set_materialize_grads(False)
        return lp, lse, kl, bstar

    @staticmethod
    def _eager_sums(z, t, t_lse, want_bstar, dtype):
        """(lse, KL, b*, lse_T) of the docstring, chunk by chunk in eager PyTorch (the reference)."""
        N, V = z.shape
        lse = torch.empty(N, dtype=dtype, device=z.device)
        kl, compute_t_lse = lse.new_empty(0), t is not None and t_lse is None
        bstar = torch.empty_like(lse) if want_bstar else lse.new_empty(0)
        if t is not None:
            kl = torch.empty_like(lse)
            t_lse = torch.empty_like(lse) if compute_t_lse else t_lse
        rows = _chunk_rows(V, N)
        for a in range(0, N, rows):
            zc = z[a:a + rows].to(dtype)
            m = zc.amax(-1, keepdim=True)
            e = torch.sub(zc, m).exp_()
            Z = e.sum(-1)
            lse[a:a + rows] = m.squeeze(-1) + Z.log()
            if t is not None:
                tc = t[a:a + rows].to(dtype)
                if compute_t_lse:
                    t_lse[a:a + rows] = torch.logsumexp(tc, -1)
                ed = zero_nan_(torch.sub(zc, tc).mul_(e))            # e (z - t), 0 where e = 0
                kl[a:a + rows] = t_lse[a:a + rows] - lse[a:a + rows] + ed.sum(-1) / Z
                if want_bstar:   # b* from KL and two more sums over the chunk (see bstar_from_sums)
                    Z2 = Z * Z                                        # ed and e are not needed again
                    shift = lse[a:a + rows] - t_lse[a:a + rows]
                    e2d = ed.mul_(e).sum(-1)                          # sum e^2 (z - t)
                    q_sq = e.square_().sum(-1) / Z2                   # |q|^2
                    q2l = e2d / Z2 - shift * q_sq                     # sum q^2 (z - t - shift)
                    bstar[a:a + rows] = bstar_from_sums(kl[a:a + rows], q_sq, q2l)
        return lse, kl, bstar, t_lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_lse, g_kl, g_bstar):
        z, y, lse, t, t_lse, kl = ctx.saved_tensors
        g_lp = None if y is None or g_lp is None else g_lp.to(lse.dtype)          # [N, k]
        g_kl = None if t is None or g_kl is None else g_kl.reshape(-1, 1).to(lse.dtype)
        if g_lp is None and g_kl is None:
            return None, None, None, None, None, None
        dtype = lse.dtype
        if g_kl is not None:
            shift = (lse - t_lse + kl).unsqueeze(1)       # log q - log p - kl = z - t - shift
        if g_lp is not None:
            g_sum = g_lp.sum(1, keepdim=True)
        grad = chunk_kernels.backward(z, t, lse, None if g_kl is None else shift, g_kl,
                                      None if g_lp is None else g_sum) if ctx.compiled else None
        if grad is not None:
            if g_lp is not None:
                grad.scatter_add_(1, y, g_lp.to(grad.dtype))            # + sum_j g_nj e_{y_nj}
            return grad, None, None, None, None, None
        grad = torch.empty_like(z, memory_format=torch.contiguous_format)
        rows = _chunk_rows(z.shape[1], z.shape[0])
        for a in range(0, z.shape[0], rows):
            zc = z[a:a + rows].to(dtype)
            out = grad[a:a + rows] if grad.dtype == dtype else None
            q = torch.sub(zc, lse[a:a + rows, None], out=out).exp_()
            if g_kl is None:
                q.mul_(g_sum[a:a + rows].neg())
            else:
                w = torch.sub(zc, t[a:a + rows].to(dtype)).sub_(shift[a:a + rows]).mul_(g_kl[a:a + rows])
                zero_nan_(q.mul_(w if g_lp is None else w.sub_(g_sum[a:a + rows])))   # q = 0: no gradient
            if g_lp is not None:
                q.scatter_add_(1, y[a:a + rows], g_lp[a:a + rows])   # + sum_j g_nj e_{y_nj}
            if out is None:
                grad[a:a + rows] = q
        return grad, None, None, None, None, None


def _chunked_token_logprobs(logits: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                            teacher_logits: Optional[torch.Tensor] = None,
                            teacher_lse: Optional[torch.Tensor] = None, want_bstar: bool = False,
                            compiled: Optional[bool] = None) -> tuple:
    """(lp or None, detached lse, KL or None[, detached b*]) per token, by ``_ChunkedTokenLogprobs``; the
    teacher is held fixed (no gradient reaches it). ``tokens`` is [...] (lp [...]) or, for
    several ids per position, [..., k] (lp [..., k]).

    Under torch.func transforms (vmap, grad) the plain composite is traced instead: the
    chunked loop writes into preallocated buffers, which those transforms cannot batch.

    ``compiled``: False = the eager chunked pass, True = the fused kernels of ``chunk_kernels``
    at any size, None = environment ``VOPD_COMPILE`` and a size threshold decide (see there).
    """
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(logits.shape)} differ in shape")
    shape = logits.shape[:-1]
    if torch._C._functorch.is_functorch_wrapped_tensor(logits):
        logits = logits.to(compute_dtype(logits))
        lse = torch.logsumexp(logits, dim=-1)
        ids = None if tokens is None else tokens.reshape(*shape, -1)
        lp = None if tokens is None else (logits.gather(-1, ids) - lse.unsqueeze(-1)).reshape(tokens.shape)
        kl = None if teacher_logits is None else reverse_kl(logits, teacher_logits.detach())
        if want_bstar:
            log_q = torch.log_softmax(logits.detach(), -1)
            bstar = optimal_scalar_baseline(log_q, torch.log_softmax(teacher_logits.detach().to(log_q.dtype), -1))
            return lp, lse.detach(), kl, bstar
        return lp, lse.detach(), kl
    V = logits.shape[-1]
    y = None if tokens is None else tokens.reshape(shape.numel(), -1)
    t = None if teacher_logits is None else teacher_logits.detach().reshape(-1, V)
    t_lse = None if t is None or teacher_lse is None else teacher_lse.detach().reshape(-1).to(compute_dtype(logits))
    if want_bstar and t is None:
        raise ValueError("b* needs the teacher logits")
    lp, lse, kl, bstar = _ChunkedTokenLogprobs.apply(logits.reshape(-1, V), y, t, t_lse, want_bstar,
                                                 chunk_kernels.use_compiled(compiled, logits.numel(), logits.device.type))
    out = (None if y is None else lp.reshape(tokens.shape), lse.reshape(shape),
           None if t is None else kl.reshape(shape))
    return out + (bstar.reshape(shape),) if want_bstar else out


def token_logprobs_and_lse(logits: torch.Tensor, tokens: torch.Tensor, compiled: Optional[bool] = None) -> tuple:
    """(z_y - logsumexp(z), detached logsumexp(z)): log softmax(z)[y] without materialising log_softmax.

    The logsumexp comes back so that a baseline over the same logits (``logprobs_at``)
    need not recompute it: one pass over V saved. ``compiled``: the fused-kernel switch
    (``_chunked_token_logprobs``; False = eager, environment ``VOPD_COMPILE=0`` turns it off everywhere).
    """
    lp, lse, _ = _chunked_token_logprobs(logits, tokens, compiled=compiled)
    return lp, lse


def token_logprobs_and_reverse_kl(student_logits: torch.Tensor, tokens: torch.Tensor,
                                  teacher_logits: torch.Tensor,
                                  teacher_lse: Optional[torch.Tensor] = None,
                                  compiled: Optional[bool] = None) -> tuple:
    """(log softmax(z)[y] with its gradient, detached KL(softmax(z) || softmax(t))) per token:
    the sampled log-prob and the vOPD baseline in one pass over the student logits.

    ``teacher_lse`` = logsumexp(t) saves the one exponential pass over the teacher logits.
    Used as a baseline, the KL stays unbiased even if ``teacher_lse`` were off: any error in it
    is a function of the state alone, so it shifts the baseline, not the expected gradient.
    ``compiled``: the fused-kernel switch (``_chunked_token_logprobs``; False = eager, environment
    ``VOPD_COMPILE=0`` turns it off everywhere).
    """
    lp, _, kl = _chunked_token_logprobs(student_logits, tokens, teacher_logits, teacher_lse, compiled=compiled)
    return lp, kl.detach()


def token_logprobs_and_optimal_baseline(student_logits: torch.Tensor, tokens: torch.Tensor,
                                        teacher_logits: torch.Tensor,
                                        teacher_lse: Optional[torch.Tensor] = None,
                                        compiled: Optional[bool] = None) -> tuple:
    """(log softmax(z)[y] with its gradient, detached b*(s)) per token, in one chunked pass over the
    student logits, as ``token_logprobs_and_reverse_kl`` gives vOPD's baseline: b* is
    ``optimal_scalar_baseline`` computed from the chunk the logsumexp already exponentiated.

    Args:
      student_logits, teacher_logits: [..., V].  tokens: [...] sampled ids.
      teacher_lse: logsumexp(teacher_logits) [...], when known.
      compiled: the fused-kernel switch (``_chunked_token_logprobs``; False = eager, environment
        ``VOPD_COMPILE=0`` turns it off everywhere).
    Returns:
      (lp [...], b* [...]).
    """
    lp, _, _, bstar = _chunked_token_logprobs(student_logits, tokens, teacher_logits, teacher_lse,
                                              want_bstar=True, compiled=compiled)
    return lp, bstar


def reverse_kl_to_fixed_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                teacher_lse: Optional[torch.Tensor] = None,
                                compiled: Optional[bool] = None) -> torch.Tensor:
    """KL(q || p) per token with its gradient in the student logits only (the teacher is data),

        d KL / d z_v = q_v (log q_v - log p_v - KL),

    chunked like the sampled log-prob: the same value as ``reverse_kl`` without its five
    [B, T, V] temporaries. ``teacher_lse`` = logsumexp(t), when known, saves a pass over t.
    ``compiled``: the fused-kernel switch (``_chunked_token_logprobs``).
    """
    return _chunked_token_logprobs(student_logits, None, teacher_logits, teacher_lse, compiled=compiled)[2]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[y] = z_y - logsumexp(z)."""
    return token_logprobs_and_lse(logits, tokens)[0]


def kl_from_logprobs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) over the last axis, from log-probabilities; a_v = 0
    terms are 0 (0 log 0 = 0), an a_v > 0 where b_v = 0 gives +inf. ``reverse_kl`` is (log q, log p),
    ``forward_kl`` (log p, log q)."""
    return _plogratio(log_a, log_b).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_v q_v (log q_v - log p_v); differentiable in both inputs.

    q_v = 0 terms are 0 (a student at -inf, with or without the teacher); a teacher at -inf
    where q_v > 0 gives +inf, the true KL (module docstring).
    """
    dtype = compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    return kl_from_logprobs(log_q, log_p)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v); p_v = 0 terms are 0, a student at -inf where p_v > 0 gives +inf."""
    dtype = compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    return kl_from_logprobs(log_p, log_q)


def renormalised_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Reverse KL of q and p both renormalised on a support S (the last axis):

    q~_v = q_v / sum_{u in S} q_u,  p~_v likewise,  KL(q~ || p~) = sum_{v in S} q~_v (log q~_v - log p~_v).
    """
    log_q = student_logprobs - torch.logsumexp(student_logprobs, dim=-1, keepdim=True)
    log_p = teacher_logprobs - torch.logsumexp(teacher_logprobs, dim=-1, keepdim=True)
    return _plogratio(log_q, log_p).sum(-1)


def student_topk_logprobs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int,
                          student_lse: Optional[torch.Tensor] = None) -> tuple:
    """Full-vocabulary log-probs of both models on the student's top-k set S_k, detached.

    Args:
      student_logits, teacher_logits: [..., V].  k: the support size, 1 <= k <= V.
      student_lse: logsumexp of the student logits [...], when known (saves a pass over V).
    Returns:
      (log q on S_k [..., k], log p on S_k [..., k]), S_k ordered by student logit.
    """
    with torch.no_grad():
        ids = torch.topk(student_logits.detach(), k, dim=-1).indices
        return logprobs_at(student_logits.detach(), ids, student_lse), logprobs_at(teacher_logits.detach(), ids)


def logit_score_weights(q: torch.Tensor) -> torch.Tensor:
    """w_y = q_y |e_y - q|^2 = q_y (1 - 2 q_y + |q|^2): the probability of y times the squared norm
    of its logit-space score e_y - q. [..., V]"""
    return q * (1.0 - 2.0 * q + (q * q).sum(-1, keepdim=True))


def optimal_scalar_baseline(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """The state baseline that minimises the logit-space trace variance of (l_y - b)(e_y - q):

        b*(s) = sum_y w_y l_y / sum_y w_y,   w_y = q_y |e_y - q|^2 = q_y (1 - 2 q_y + |q|^2),

    with l_y = log q_y - log p_y. vOPD's KL_s = sum_y q_y l_y uses the weights q_y instead.
    Tokens with q_y = 0 (log q_y = -inf) have w_y = 0 and contribute 0.

    Args:
      student_logprobs, teacher_logprobs: log q and log p over the full vocabulary [..., V].
    Returns:
      [...] b*, 0/0 (a one-hot student) read as 0.
    """
    w = logit_score_weights(student_logprobs.exp())
    l = student_logprobs - teacher_logprobs
    l = torch.where(student_logprobs == _NEG_INF, torch.zeros((), dtype=l.dtype, device=l.device), l)
    return (w * l).sum(-1) / w.sum(-1).clamp_min(torch.finfo(w.dtype).tiny)


def score_moments(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> dict:
    """Row sums from which the one-token score variance of every state baseline follows (``score_variance``):

        S0 = sum_y w_y,  S1 = sum_y w_y l_y,  S2 = sum_y w_y l_y^2,  M = sum_v q_v^2 (l_v - KL)^2,  KL = sum_y q_y l_y,

    with w_y = q_y |e_y - q|^2 (``logit_score_weights``) and l_y = log q_y - log p_y (0 where q_y = 0).
    b* = S1 / S0 (``optimal_scalar_baseline``).

    Args:
      student_logprobs, teacher_logprobs: log q and log p over the full vocabulary [..., V].
    Returns:
      {"s0", "s1", "s2", "m", "kl"}, each [...].
    """
    q = student_logprobs.exp()
    l = student_logprobs - teacher_logprobs
    l = torch.where(student_logprobs == _NEG_INF, torch.zeros((), dtype=l.dtype, device=l.device), l)
    acc = torch.promote_types(q.dtype, torch.float64)          # elementwise in the input dtype, sums in float64
    w = logit_score_weights(q)
    wl = w * l
    kl = (q * l).sum(-1, dtype=acc)
    return {"s0": w.sum(-1, dtype=acc), "s1": wl.sum(-1, dtype=acc), "s2": (wl * l).sum(-1, dtype=acc),
            "m": (q * q * (l - kl.unsqueeze(-1).to(l.dtype)) ** 2).sum(-1, dtype=acc), "kl": kl}


def score_variance(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                   baseline: torch.Tensor, moments: Optional[dict] = None) -> torch.Tensor:
    """The logit-space trace variance, over the next token y ~ q at one state, of the one-token score-function
    term G_b(y) = (l_y - b)(e_y - q), l_y = log q_y - log p_y:

        Var_b = E_q |G_b|^2 - |E_q G_b|^2 = sum_y w_y (l_y - b)^2 - sum_v q_v^2 (l_v - KL)^2
              = S2 - 2 b S1 + b^2 S0 - M        (``score_moments``),

    with w_y = q_y |e_y - q|^2 and E_q G_b = (q_v (l_v - KL))_v, the same for every b (a state baseline adds
    no bias). b = 0 is opd, b = KL vOPD, b = b* = S1 / S0 its minimiser. Tokens with q_y = 0 contribute 0.

    Args:
      student_logprobs, teacher_logprobs: log q and log p over the full vocabulary [..., V].
      baseline: b per state [...].
      moments: ``score_moments`` of the same rows, if already computed.
    Returns:
      [...] Var_b.
    """
    m = score_moments(student_logprobs, teacher_logprobs) if moments is None else moments
    return m["s2"] - 2 * baseline * m["s1"] + baseline ** 2 * m["s0"] - m["m"]


def student_topk_optimal_baseline(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """b* on a support S (the last axis), both distributions renormalised on S:

        b*_k(s) = sum_{v in S} w~_v l~_v / sum_{v in S} w~_v,  w~_v = q~_v (1 - 2 q~_v + |q~|^2),
        l~_v = log q~_v - log p~_v,  q~ = q / q(S),  p~ = p / p(S)

    (``optimal_scalar_baseline`` of the renormalised pair; S = the student's top-k gives the
    support of vOPD's top-k baseline).

    Args:
      student_logprobs, teacher_logprobs: full-vocabulary log-probs on S [..., k].
    Returns:
      [...] b*_k.
    """
    log_q = student_logprobs - torch.logsumexp(student_logprobs, dim=-1, keepdim=True)
    log_p = teacher_logprobs - torch.logsumexp(teacher_logprobs, dim=-1, keepdim=True)
    return optimal_scalar_baseline(log_q, log_p)


def log_tail_mass(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_{v in S} exp(logprobs_v)) over the last axis: the log-mass outside S, computed as
    log(-expm1(logsumexp)) and floored at log(tiny) where S holds (up to round-off) all the mass. [...]"""
    inside = torch.logsumexp(logprobs, dim=-1).clamp_max(0.0)
    return torch.log((-torch.expm1(inside)).clamp_min(torch.finfo(logprobs.dtype).tiny))


def tail_bucket_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Reverse KL over the k buckets of a support S plus one tail bucket, no renormalisation (TRL 1.16's
    sparse top-k loss with ``_add_tail_bucket``):

        sum_{v in S} q_v (log q_v - log p_v) + q_tail (log q_tail - log p_tail),  q_tail = 1 - q(S).

    Args:
      student_logprobs, teacher_logprobs: full-vocabulary log-probs on S [..., k].
    Returns:
      [...]; equals KL(q || p) when S is the whole vocabulary (the tail then has mass ~0).
    """
    log_q = torch.cat([student_logprobs, log_tail_mass(student_logprobs).unsqueeze(-1)], -1)
    log_p = torch.cat([teacher_logprobs, log_tail_mass(teacher_logprobs).unsqueeze(-1)], -1)
    return _plogratio(log_q, log_p).sum(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) = logsumexp(z) - sum_v q_v z_v per token, detached, in chunks of rows. [...]"""
    with torch.no_grad():
        shape, V = logits.shape[:-1], logits.shape[-1]
        z = logits.detach().reshape(-1, V)
        dtype = compute_dtype(z)
        out = torch.empty(z.shape[0], dtype=dtype, device=z.device)
        rows = _chunk_rows(V, z.shape[0])
        for a in range(0, z.shape[0], rows):
            log_q = torch.log_softmax(z[a:a + rows].to(dtype), -1)
            out[a:a + rows] = -_plogratio(log_q, torch.zeros((), dtype=dtype, device=z.device)).sum(-1)
        return out.reshape(shape)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD of GKD in TRL's convention (q student, p teacher):

    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,  0 < beta < 1;
    the end points are the limits TRL uses: beta = 0 is KL(p || q), beta = 1 is KL(q || p).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gkd_jsd needs 0 <= beta <= 1, got beta={beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits)
    dtype = compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    both = torch.stack([log_p + torch.log(torch.tensor(beta, dtype=dtype)),
                        log_q + torch.log(torch.tensor(1.0 - beta, dtype=dtype))])
    masked = (both == _NEG_INF).all(0)          # p = q = 0: m = 0, and no NaN from logsumexp's backward
    both = torch.where(masked, torch.zeros((), dtype=dtype, device=both.device), both)
    log_m = torch.where(masked, torch.full((), _NEG_INF, dtype=dtype, device=both.device), torch.logsumexp(both, dim=0))
    kl_p_m = _plogratio(log_p, log_m).sum(-1)
    kl_q_m = _plogratio(log_q, log_m).sum(-1)
    return beta * kl_p_m + (1.0 - beta) * kl_q_m


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full-vocabulary log-probs log softmax(z)[ids] for ids [..., k]; ``lse`` = logsumexp(z) if known."""
    if not (torch.is_grad_enabled() and logits.requires_grad):
        # detached use (baselines, teacher scoring): no [B, T, V] float32 copy
        dtype = compute_dtype(logits)
        lse = logsumexp_detached(logits) if lse is None else lse
        return logits.detach().gather(-1, ids).to(dtype) - lse.unsqueeze(-1)
    return _chunked_token_logprobs(logits, ids)[0]
