"""Token-level OPD estimators straight from hidden states and lm_head weights, never holding [N, V].

At a 152k vocabulary a float32 [N, V] logits tensor is N x 0.6 MB per model (1.2 GB at
N = 2048), and the materialised path holds three of them (student logits, their gradient,
teacher logits). Here both models' logits exist only as [R, C] tiles (R tokens x C
vocabulary entries), recomputed in the backward, with an online (running-max) logsumexp.

Notation (one token n; "sg" = stop-gradient): student hidden h [d_s] and head (W [V, d_s],
optional b [V]); teacher h_T, (W_T, b_T), held fixed; sampled token y; per-model logit map

    x_v  = h . W_v + b_v,   z_v = c tanh(s x_v / c)   (logit scale s, final soft-capping c;
                                                       z_v = s x_v without capping),
    q = softmax(z), p = softmax(z_T),  lse = logsumexp(z),  lse_T = logsumexp(z_T),
    lp   = log q_y = z_y - lse                  (with gradient)
    lp_T = log p_y = z_T,y - lse_T              (detached)
    l_v  = log q_v - log p_v,   l = l_y          (the log-ratio of the registry)
    KL   = sum_v q_v l_v                        (with gradient; sg(KL) is vOPD's baseline)
    b*   = sum_v w_v l_v / sum_v w_v,   w_v = q_v (1 - 2 q_v + |q|^2)        (detached).

b* needs two sums besides the KL (``divergences._bstar_from_sums``): with sum_v q_v = 1,

    sum_v w_v     = 1 - |q|^2,
    sum_v w_v l_v = (1 + |q|^2) KL - 2 sum_v q_v^2 l_v.

One pass over the vocabulary (the forward). Per token, after the tiles seen so far, keep the
running maxima m (student) and m_T (teacher), with e_v = exp(z_v - m), d_v = z_v - z_T,v, and

    S1 = sum e_v,  A = sum e_v d_v,  S2 = sum e_v^2,  Bq = sum e_v^2 d_v,  T1 = sum exp(z_T,v - m_T).

When a tile raises the maximum from m to m', every stored e_v becomes e_v exp(m - m'), so with
r = exp(m - m') the sums that are linear in e rescale by r and the quadratic ones by r^2
(d_v does not depend on m):

    S1 <- r S1 + sum_tile e,    A <- r A + sum_tile e d,
    S2 <- r^2 S2 + sum_tile e^2,  Bq <- r^2 Bq + sum_tile e^2 d,   T1 <- r_T T1 + sum_tile e_T.

After the last tile (q_v = e_v / S1, l_v = d_v - (lse - lse_T)):

    lse = m + log S1,  lse_T = m_T + log T1,
    KL = A / S1 - (lse - lse_T),  |q|^2 = S2 / S1^2,  sum q^2 l = Bq / S1^2 - (lse - lse_T) |q|^2.

z_y and z_T,y are read from the tile that holds y. The maximum is only a shift (exact in
any order), so one pass is exact up to rounding; there is no second pass over V.

Backward, written by hand (``_FusedTokenStats``): with upstream gradients g (of lp) and k (of
KL), the logit-gradient tile is

    G_v = g (1[v = y] - q_v) + k q_v (log q_v - log p_v - KL)        (d/dz_v)
    G_v <- G_v s (1 - (z_v / c)^2)                                   (through the cap and scale)

recomputed tile by tile from h, W (and h_T, W_T when k is present), and

    dL/dh = sum_tiles G_tile @ W_tile,   dL/dW_tile = G_tile^T @ h,   dL/db_tile = sum_n G_tile.

The logsumexp carries a gradient too (d lse / d z_v = q_v): with its upstream gradient g_lse the
tile gains g_lse q_v (the top-k tail bucket below needs it; no estimator without it pays for it).

Memory held: three [R, C] tiles in the compute dtype (float32 for bf16/fp16/fp32 inputs,
float64 for float64) plus O(N) running sums in the forward; three tiles, a [C, d_s]
accumulator (only when W is not already in the compute dtype) and the [N, d_s] hidden gradient
in the backward, besides the gradients returned (the size of h, W, b). Nothing is saved for
the backward but the inputs and five [N] vectors. The backward walks vocabulary tiles in the
outer loop, so each W tile's gradient is complete before the next one starts.

Costs (multiply-adds, N tokens): forward N V (d_s + d_T); backward N V d_s x 3 (recompute, dh,
dW) plus N V d_T when the KL carries a gradient (full_kl): the teacher tile is recomputed.

Top-k supports (``topk``). S = the ids of the k largest logits of one model (the student's for
vopd_topk, opd_bstar_topk, student_topk_kl, topk_tail_kl; the teacher's for topk_kl), found in the
same pass: per token chunk a running candidate list (values, ids) [R, <= k] meets every tile,

    (vals, ids) <- topk(cat(vals, topk(z_tile, k)), k)       (the whole tile when it has <= k entries),

exact because the k largest of a union lie among the k largest of its parts. The ids come out
sorted by logit like ``torch.topk(z, k)``; tied logits are broken as torch.topk breaks them on
these candidate lists, which may differ from its choice on the full row (continuous logits have
no ties). On S the logits are gathered from the head rows (``_SupportLogits``), N k d work in
token chunks of about ``_SUPPORT_CHUNK_ELEMENTS`` (k x d) entries,

    z_S,j = c tanh(s (h . W_{S_j} + b_{S_j}) / c),   log q_S = z_S - lse,   log p_S = z_T,S - lse_T,

with a hand-written backward that regathers W_S per chunk (nothing of size N k d is saved):

    dL/dh = sum_j G_j W_{S_j},   dL/dW_v = sum_{(n, j): S_nj = v} G_nj h_n,   dL/db_v likewise,

G = dL/dz_S times s (1 - (z_S / c)^2). The estimators then call the registry's divergences on
the [N, k] log-probs: ``dv.renormalised_reverse_kl`` (vopd_topk's baseline, topk_kl,
student_topk_kl), ``dv.student_topk_optimal_baseline`` (b*_k) and ``dv.tail_bucket_reverse_kl``
(topk_tail_kl). The renormalised ones do not change when log q_S is shifted by a constant, so
they read z_S - sg(lse): the same values and exactly their gradients, without the pass over V
that lse's gradient costs. The tail bucket q_tail = 1 - sum_S q does depend on lse, so
topk_tail_kl's backward also walks the vocabulary (G_v = g_lse q_v, as above). Extra costs:
forward N k (d_s + d_T) plus a top-k per tile; backward 3 N k d_s.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import divergences as dv
from . import estimators as E
from .batch import TokenBatch
from .errors import InputError

# Default tiles (tokens x vocabulary entries). CPU: 1024 x 1024, 4 MiB per float32 tile (three alive
# at once), the fastest of the tiles tried (128-1024 tokens x 512-16384 entries at N = 512,
# V = 151,936, d = 896, one core of a shared machine: 10-30% apart, noisy). CUDA: 4096 x 8192
# (128 MiB per tile) for fewer kernel launches; not yet measured on a GPU.
DEFAULT_CHUNKS = {"cpu": (1024, 1024), "cuda": (4096, 8192)}

# Gathered head rows W_S per token chunk of the top-k support: about this many (k x d) entries
# (16 MiB in float32), so a chunk's [r, k, d] temporaries stay small whatever k and d.
_SUPPORT_CHUNK_ELEMENTS = 1 << 22
TOPK_SUPPORTS = ("student", "teacher")


def default_chunks(device: torch.device) -> tuple:
    """(token_chunk, vocab_chunk) for tiles on ``device`` (the CPU's for devices not listed)."""
    return DEFAULT_CHUNKS.get(torch.device(device).type, DEFAULT_CHUNKS["cpu"])


_NEG_INF = float("-inf")


class FusedTokenStats(NamedTuple):
    """Per-token outputs of ``fused_token_stats``, each shaped like the tokens.

    Attributes:
      student_logprobs: log q_y, with gradient.
      student_logsumexp: lse, with gradient (d lse / d z_v = q_v).
      teacher_logprobs: log p_y, detached (None without a teacher).
      teacher_logsumexp: lse_T, detached (None without a teacher).
      kl: KL(q || p), with gradient in the student only (None without a teacher).
      bstar: b*, detached (None unless asked for).
      topk_ids: the top-k support S [..., k] long, sorted by logit (None unless asked for).
      student_topk_logits: z on S [..., k], with gradient; log q on S is
        ``student_topk_logits - student_logsumexp[..., None]`` (None unless asked for).
      teacher_topk_logprobs: log p on S [..., k], detached (None unless asked for with a teacher).
    Masked positions hold 0 in every field.
    """

    student_logprobs: torch.Tensor
    student_logsumexp: torch.Tensor
    teacher_logprobs: Optional[torch.Tensor]
    teacher_logsumexp: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    bstar: Optional[torch.Tensor]
    topk_ids: Optional[torch.Tensor] = None
    student_topk_logits: Optional[torch.Tensor] = None
    teacher_topk_logprobs: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------- tiles

def _logit_tile(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], start: int, end: int,
                dtype: torch.dtype, scale: float, cap: Optional[float]) -> torch.Tensor:
    """z[:, start:end] = cap tanh(scale (h W[start:end]^T + b[start:end]) / cap) (or scale x), a new [R, C] tile."""
    w = W[start:end].to(dtype)
    if b is None:
        x = torch.mm(h, w.t())
    else:
        x = torch.addmm(b[start:end].to(dtype), h, w.t())
    if cap is not None:
        return x.mul_(scale / cap).tanh_().mul_(cap)
    return x if scale == 1.0 else x.mul_(scale)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 / fp16 / fp32 tiles are computed in float32)."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _finite_logits(*biases: Optional[torch.Tensor]) -> bool:
    """True when no bias holds -inf (or NaN): then every logit of a finite h W^T + b is finite."""
    return all(x is None or bool(torch.isfinite(x).all()) for x in biases)


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_v x[n, v] y[n, v] per row, without an [R, C] temporary."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).reshape(-1)


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """The running maximum as a safe shift: 0 where it is still -inf (a row with no finite logit yet)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _in_tile(y: torch.Tensor, start: int, width: int) -> tuple:
    """(y_n in [start, start + width), the column y_n - start clamped into the tile) [R], [R, 1]:
    masked gathers and scatters without a host synchronisation."""
    inside = (y >= start) & (y < start + width)
    return inside, (y - start).clamp_(0, width - 1).unsqueeze(1)


def _pick(tile: torch.Tensor, y: torch.Tensor, start: int, out: torch.Tensor) -> None:
    """out[n] = tile[n, y_n - start] for the rows whose token lies in this tile (others kept)."""
    inside, col = _in_tile(y, start, tile.shape[1])
    torch.where(inside, tile.gather(1, col).squeeze(1), out, out=out)


def _merge_topk(vals: torch.Tensor, ids: torch.Tensor, tile: torch.Tensor, start: int, k: int) -> tuple:
    """The running top-k (values, ids) [R, <= k] merged with a tile of columns start.. : the k largest
    of the candidates and the tile's own k largest (all of it when it has <= k entries), sorted."""
    if tile.shape[1] > k:
        tile_vals, cols = torch.topk(tile, k, dim=1)
    else:
        tile_vals = tile.clone()
        cols = torch.arange(tile.shape[1], device=tile.device).expand(tile.shape[0], -1)
    vals, ids = torch.cat([vals, tile_vals], 1), torch.cat([ids, cols + start], 1)
    if vals.shape[1] < k:
        return vals, ids
    vals, pick = torch.topk(vals, k, dim=1)
    return vals, ids.gather(1, pick)


class _FusedTokenStats(torch.autograd.Function):
    """(lp, lse, lp_T, lse_T, KL, b*) per token from (h, W, b) and (h_T, W_T, b_T), tile by tile.

    Inputs: h [N, d_s], W [V, d_s], b [V] or None, h_T [N, d_T] or None, W_T [V, d_T], b_T, y [N]
    long, cfg = (scale, cap, scale_T, cap_T, token_chunk, vocab_chunk, want_bstar, k, of): k > 0
    also returns the ids [N, k] of the top-k logits of ``of`` ("student" or "teacher"), else an
    empty [N, 0]. Formulas and the online rescaling: the module docstring. lp, lse and KL carry
    gradients to h, W and b; the other outputs are non-differentiable; the teacher receives none.
    """

    @staticmethod
    def forward(ctx, h, W, b, h_t, W_t, b_t, y, cfg):
        scale, cap, t_scale, t_cap, R, C, want_bstar, k, of = cfg
        N, V = h.shape[0], W.shape[0]
        teacher = h_t is not None
        dtype = _compute_dtype(h, W, *((h_t, W_t) if teacher else ()))

        def new(fill=None, size=N):
            return torch.full((size,), 0.0 if fill is None else fill, dtype=dtype, device=h.device)

        lse, zy = new(), new()
        t_lse, ty, kl = (new(), new(), new()) if teacher else (new(size=0), new(size=0), new(size=0))
        bstar = new() if teacher and want_bstar else new(size=0)
        topk_ids = torch.zeros(N, k, dtype=torch.long, device=h.device)
        # finite logits (no -inf bias entry): no 0 * inf products to clear, skip that pass
        finite = _finite_logits(b, b_t)
        for a in range(0, N, R):
            n_rows = min(R, N - a)
            hs = h[a:a + n_rows].to(dtype)
            ya = y[a:a + n_rows]
            m = torch.full((n_rows,), _NEG_INF, dtype=dtype, device=h.device)
            S1 = torch.zeros_like(m)
            if teacher:
                ht = h_t[a:a + n_rows].to(dtype)
                mt, T1, A = m.clone(), torch.zeros_like(m), torch.zeros_like(m)
                if want_bstar:
                    S2, Bq = torch.zeros_like(m), torch.zeros_like(m)
            top_vals, top_ids = m.new_empty(n_rows, 0), topk_ids.new_empty(n_rows, 0)
            for c in range(0, V, C):
                end = min(c + C, V)
                zs = _logit_tile(hs, W, b, c, end, dtype, scale, cap)
                _pick(zs, ya, c, zy[a:a + n_rows])
                if k and of == "student":
                    top_vals, top_ids = _merge_topk(top_vals, top_ids, zs, c, k)
                new_m = torch.maximum(m, zs.amax(-1))
                shift = _finite_or_zero(new_m)
                r = torch.exp(m - shift)                       # 0 on the first tile (m = -inf)
                e = torch.sub(zs, shift.unsqueeze(1)).exp_()
                S1.mul_(r).add_(e.sum(-1))
                m = new_m
                if not teacher:
                    continue
                zt = _logit_tile(ht, W_t, b_t, c, end, dtype, t_scale, t_cap)
                _pick(zt, ya, c, ty[a:a + n_rows])
                if k and of == "teacher":
                    top_vals, top_ids = _merge_topk(top_vals, top_ids, zt, c, k)
                ed = zs.sub_(zt).mul_(e)                       # e_v d_v
                if not finite:
                    dv._zero_nan_(ed)                          # 0 where q_v = 0
                A.mul_(r).add_(ed.sum(-1))
                if want_bstar:
                    r2 = r * r
                    S2.mul_(r2).add_(_row_dot(e, e))
                    Bq.mul_(r2).add_(_row_dot(ed, e))
                new_mt = torch.maximum(mt, zt.amax(-1))
                shift_t = _finite_or_zero(new_mt)
                T1.mul_(torch.exp(mt - shift_t)).add_(zt.sub_(shift_t.unsqueeze(1)).exp_().sum(-1))
                mt = new_mt
            sl = slice(a, a + n_rows)
            topk_ids[sl] = top_ids
            lse[sl] = m + S1.log()
            if teacher:
                t_lse[sl] = mt + T1.log()
                gap = lse[sl] - t_lse[sl]
                kl[sl] = A / S1 - gap
                if want_bstar:
                    Z2 = S1 * S1
                    q_sq = S2 / Z2
                    bstar[sl] = dv._bstar_from_sums(kl[sl], q_sq, Bq / Z2 - gap * q_sq)
        lp = zy - lse
        t_lp = ty - t_lse if teacher else new(size=0)
        ctx.save_for_backward(h, W, b, h_t, W_t, b_t, y, lse, t_lse if teacher else None, kl if teacher else None)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(t_lp, t_lse, bstar, topk_ids)
        ctx.set_materialize_grads(False)
        return lp, lse, t_lp, t_lse, kl, bstar, topk_ids

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_lse, g_tlp, g_tlse, g_kl, g_bstar, g_ids):
        h, W, b, h_t, W_t, b_t, y, lse, t_lse, kl = ctx.saved_tensors
        scale, cap, t_scale, t_cap, R, C = ctx.cfg[:6]
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        if h_t is None:
            g_kl = None
        none = (None,) * 8
        if (g_lp is None and g_lse is None and g_kl is None) or not (need_h or need_W or need_b):
            return none
        dtype = lse.dtype
        N, V = h.shape[0], W.shape[0]
        finite = _finite_logits(b, b_t)
        g_lp = None if g_lp is None else g_lp.to(dtype)
        g_q = None if g_lp is None else g_lp.neg()          # the coefficient of q_v: g_lse - g_lp
        if g_lse is not None:
            g_q = g_lse.to(dtype) if g_q is None else g_q.add_(g_lse.to(dtype))
        if g_kl is not None:
            g_kl = g_kl.to(dtype)
            offset = lse - t_lse + kl                       # log q - log p - KL = z - z_T - offset
        grad_h = torch.zeros(N, h.shape[1], dtype=dtype, device=h.device) if need_h else None
        grad_W = torch.zeros_like(W, memory_format=torch.contiguous_format) if need_W else None
        grad_b = torch.zeros_like(b) if need_b else None
        for c in range(0, V, C):
            end = min(c + C, V)
            w_tile = W[c:end].to(dtype)
            direct = need_W and grad_W.dtype == dtype
            acc_W = (grad_W[c:end] if direct else torch.zeros(end - c, W.shape[1], dtype=dtype, device=W.device)) \
                if need_W else None
            acc_b = torch.zeros(end - c, dtype=dtype, device=W.device) if need_b else None
            for a in range(0, N, R):
                sl = slice(a, min(a + R, N))
                hs = h[sl].to(dtype)
                zs = _logit_tile(hs, W, b, c, end, dtype, scale, cap)
                G = torch.sub(zs, lse[sl].unsqueeze(1)).exp_()                     # q
                if g_kl is not None:
                    zt = _logit_tile(h_t[sl].to(dtype), W_t, b_t, c, end, dtype, t_scale, t_cap)
                    w = zt.neg_().add_(zs).sub_(offset[sl].unsqueeze(1)).mul_(g_kl[sl].unsqueeze(1))
                    if g_q is not None:
                        w.add_(g_q[sl].unsqueeze(1))
                    G.mul_(w)
                    if not finite:
                        dv._zero_nan_(G)                                           # q = 0: no gradient
                    del zt, w
                else:
                    G.mul_(g_q[sl].unsqueeze(1))
                if g_lp is not None:                                               # + g 1[v = y]
                    inside, col = _in_tile(y[sl], c, end - c)
                    G.scatter_add_(1, col, torch.where(inside, g_lp[sl], 0.0).unsqueeze(1))
                if cap is not None:                                                # dz/dx = s (1 - (z/c)^2)
                    G.mul_(zs.div_(cap).square_().neg_().add_(1.0))
                if scale != 1.0:
                    G.mul_(scale)
                if need_h:
                    grad_h[sl].addmm_(G, w_tile)
                if need_W:
                    acc_W.addmm_(G.t(), hs)
                if need_b:
                    acc_b.add_(G.sum(0))
                del zs, G
            if need_W and not direct:
                grad_W[c:end] = acc_W
            if need_b:
                grad_b[c:end] = acc_b
        return (None if grad_h is None else grad_h.to(h.dtype), grad_W, grad_b) + (None,) * 5


class _SupportLogits(torch.autograd.Function):
    """z_S [N, k] = c tanh(s (h . W_S + b_S) / c), the logits on the ids S [N, k], gathered from the
    head rows in token chunks (module docstring, "Top-k supports"); gradients reach h, W and b.

    Inputs: h [N, d], W [V, d], b [V] or None, ids [N, k] long, cfg = (scale, cap, token_chunk, dtype).
    Saved for the backward: the inputs and z_S; the rows W_S are gathered again chunk by chunk.
    """

    @staticmethod
    def _rows(N: int, k: int, d: int, R: int) -> int:
        """Tokens per chunk: at most R, and about ``_SUPPORT_CHUNK_ELEMENTS`` gathered entries."""
        return max(1, min(R, _SUPPORT_CHUNK_ELEMENTS // max(1, k * d)))

    @staticmethod
    def _gather(W, ids, dtype):
        """W_S [r, k, d] in the compute dtype."""
        return W.index_select(0, ids.reshape(-1)).to(dtype).reshape(*ids.shape, W.shape[1])

    @staticmethod
    def forward(ctx, h, W, b, ids, cfg):
        scale, cap, R, dtype = cfg
        N, k = ids.shape
        z = torch.empty(N, k, dtype=dtype, device=h.device)
        rows = _SupportLogits._rows(N, k, W.shape[1], R)
        for a in range(0, N, rows):
            sl = slice(a, a + rows)
            x = torch.bmm(_SupportLogits._gather(W, ids[sl], dtype), h[sl].to(dtype).unsqueeze(2)).squeeze(2)
            if b is not None:
                x.add_(b[ids[sl]].to(dtype))
            z[sl] = x.mul_(scale / cap).tanh_().mul_(cap) if cap is not None else x.mul_(scale)
        ctx.save_for_backward(h, W, b, ids, z)
        ctx.cfg = cfg
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        h, W, b, ids, z = ctx.saved_tensors
        scale, cap, R, dtype = ctx.cfg
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        G = g.to(dtype) * scale
        if cap is not None:                                           # dz/dx = s (1 - (z/c)^2)
            G = G * (1.0 - (z / cap).square())
        N, k = ids.shape
        d = W.shape[1]
        grad_h = torch.zeros(N, d, dtype=dtype, device=h.device) if need_h else None
        if need_W or need_b:                  # accumulate on the distinct rows of S only, in the compute dtype
            used, slot = torch.unique(ids, return_inverse=True)
        acc_W = torch.zeros(used.numel(), d, dtype=dtype, device=W.device) if need_W else None
        rows = _SupportLogits._rows(N, k, d, R)
        for a in range(0, N, rows):
            sl = slice(a, a + rows)
            if need_h:
                grad_h[sl] = torch.bmm(G[sl].unsqueeze(1), _SupportLogits._gather(W, ids[sl], dtype)).squeeze(1)
            if need_W:                                                # G_nj h_n into row S_nj
                outer = G[sl].unsqueeze(2) * h[sl].to(dtype).unsqueeze(1)
                acc_W.index_add_(0, slot[sl].reshape(-1), outer.reshape(-1, d))
        grad_W = grad_b = None
        if need_W:
            grad_W = torch.zeros_like(W, memory_format=torch.contiguous_format)
            grad_W[used] = acc_W.to(W.dtype)
        if need_b:
            grad_b = torch.zeros_like(b)
            grad_b[used] = torch.zeros(used.numel(), dtype=dtype, device=b.device).index_add_(
                0, slot.reshape(-1), G.reshape(-1)).to(b.dtype)
        return None if grad_h is None else grad_h.to(h.dtype), grad_W, grad_b, None, None


# ----------------------------------------------------------------------------- public API

def _check_chunk(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_head(scale, cap, who: str) -> tuple:
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale == scale
            and abs(scale) != float("inf") and scale != 0):
        raise InputError(f"{who} logit scale must be a finite non-zero number, got {scale!r}")
    if cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool)
                                and 0 < cap < float("inf")):
        raise InputError(f"{who} final logit soft-capping must be a finite positive number or None, got {cap!r}")
    return float(scale), None if cap is None else float(cap)


def _head_rows(W: torch.Tensor, vocab_size: Optional[int], who: str) -> torch.Tensor:
    if vocab_size is None:
        return W
    if vocab_size > W.shape[0]:
        raise InputError(f"vocab_size {vocab_size} exceeds the {who} lm_head's {W.shape[0]} rows")
    return W[:vocab_size]


def fused_token_stats(student_hidden: torch.Tensor, student_weight: torch.Tensor, tokens: torch.Tensor,
                      teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                      *, mask: Optional[torch.Tensor] = None,
                      student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                      student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                      student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                      vocab_size: Optional[int] = None, want_bstar: bool = False,
                      topk: Optional[int] = None, topk_support: str = "student",
                      token_chunk: Optional[int] = None, vocab_chunk: Optional[int] = None) -> FusedTokenStats:
    """lp, lse, lp_T, lse_T, KL(q || p), b* and a top-k support per token, from hidden states and
    lm_head weights.

    Logits z = c tanh(s (h W^T + b) / c) (z = s (h W^T + b) without soft-capping c) are built
    on [token_chunk, vocab_chunk] tiles only, for both models, in one pass over the vocabulary
    (formulas, rescaling and backward: the module docstring). Gradients reach the student's
    h, W and b through lp, lse, KL and the top-k logits; the teacher is data (detached here).

    Args:
      student_hidden: h [..., d_s], the student's final hidden states at the response positions.
      student_weight: W [V_s, d_s], the student lm_head weight (a gradient reaches it).
      tokens: y [...] long, the sampled tokens.
      teacher_hidden, teacher_weight: h_T [..., d_T] and W_T [V_T, d_T]; None for a student-only
        pass (then lp and lse only).
      mask: [...] 0/1, optional: positions with 0 are not computed (their token ids are never
        read) and every output is 0 there.
      student_bias, teacher_bias: optional lm_head biases [V_s], [V_T].
      student_logit_scale, teacher_logit_scale: s, multiplying the logits before the cap.
      student_softcap, teacher_softcap: c, the final soft-capping (Gemma), or None.
      vocab_size: V, the shared vocabulary: the first V rows of each head (the scorer's
        ``z[:V]``, dropping padded rows); None: both heads must have the same rows.
      want_bstar: also compute b* (needs the teacher).
      topk: k, also find the ids S of the k largest logits of ``topk_support`` in the same pass
        (1 <= k <= V; ties broken as torch.topk does on the tiles' candidates) and return z and
        log p on S (module docstring, "Top-k supports"); None: no support.
      topk_support: "student" or "teacher" (the teacher's needs the teacher).
      token_chunk, vocab_chunk: the tile R x C (None: ``default_chunks`` of the device).
    Returns:
      ``FusedTokenStats``, each field shaped like ``tokens``.
    """
    teacher = teacher_hidden is not None or teacher_weight is not None
    if teacher and (teacher_hidden is None or teacher_weight is None):
        raise InputError("give both teacher_hidden and teacher_weight, or neither")
    if want_bstar and not teacher:
        raise InputError("b* needs the teacher's hidden states and lm_head weight")
    if topk_support not in TOPK_SUPPORTS:
        raise InputError(f"topk_support must be one of {TOPK_SUPPORTS}, got {topk_support!r}")
    if topk is not None and topk_support == "teacher" and not teacher:
        raise InputError("the teacher's top-k support needs the teacher's hidden states and lm_head weight")
    R0, C0 = default_chunks(student_hidden.device)
    R = _check_chunk(R0 if token_chunk is None else token_chunk, "token_chunk")
    C = _check_chunk(C0 if vocab_chunk is None else vocab_chunk, "vocab_chunk")
    scale, cap = _check_head(student_logit_scale, student_softcap, "student")
    t_scale, t_cap = _check_head(teacher_logit_scale, teacher_softcap, "teacher")
    if tokens.dtype != torch.long:
        raise InputError(f"tokens must be a torch.long tensor of ids, got {tokens.dtype}")
    shape = tokens.shape
    if student_hidden.dim() < 1 or tuple(student_hidden.shape[:-1]) != tuple(shape):
        raise InputError(f"student_hidden must be [..., d] over the token shape {tuple(shape)}, "
                         f"got {tuple(student_hidden.shape)}")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise InputError(f"student_weight must be [V, {student_hidden.shape[-1]}], got {tuple(student_weight.shape)}")
    W = _head_rows(student_weight, vocab_size, "student")
    b = None if student_bias is None else student_bias[:W.shape[0]]
    if student_bias is not None and student_bias.shape != (student_weight.shape[0],):
        raise InputError(f"student_bias must be [{student_weight.shape[0]}], got {tuple(student_bias.shape)}")
    V = W.shape[0]
    k = 0 if topk is None else E._check_k(topk, V, "topk")
    h_t = W_t = b_t = None
    if teacher:
        if tuple(teacher_hidden.shape[:-1]) != tuple(shape):
            raise InputError(f"teacher_hidden must be [..., d] over the token shape {tuple(shape)}, "
                             f"got {tuple(teacher_hidden.shape)}")
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise InputError(f"teacher_weight must be [V, {teacher_hidden.shape[-1]}], "
                             f"got {tuple(teacher_weight.shape)}")
        if teacher_bias is not None and teacher_bias.shape != (teacher_weight.shape[0],):
            raise InputError(f"teacher_bias must be [{teacher_weight.shape[0]}], got {tuple(teacher_bias.shape)}")
        W_t = _head_rows(teacher_weight.detach(), vocab_size, "teacher")
        if W_t.shape[0] != V:
            raise InputError(f"student and teacher heads have {V} and {W_t.shape[0]} rows; "
                             "pass vocab_size = the shared vocabulary")
        b_t = None if teacher_bias is None else teacher_bias.detach()[:V]
        h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    y = tokens.reshape(-1)
    rows = None
    if mask is not None:
        if tuple(mask.shape) != tuple(shape):
            raise InputError(f"mask must have the token shape {tuple(shape)}, got {tuple(mask.shape)}")
        rows = mask.reshape(-1).nonzero().squeeze(1)
        h, y = h.index_select(0, rows), y.index_select(0, rows)
        h_t = None if h_t is None else h_t.index_select(0, rows)
    if y.numel():
        low, high = (int(v) for v in torch.aminmax(y))
        if low < 0 or high >= V:
            raise InputError(f"token ids must lie in [0, {V}), got range [{low}, {high}]")
    cfg = (scale, cap, t_scale, t_cap, R, C, bool(want_bstar), k, topk_support)
    *out, ids = _FusedTokenStats.apply(h, W, b, h_t, W_t, b_t, y, cfg)
    support = (None, None, None)
    if k:
        dtype = out[1].dtype
        z_s = _SupportLogits.apply(h, W, b, ids, (scale, cap, R, dtype))
        t_lp_s = None if not teacher else \
            _SupportLogits.apply(h_t, W_t, b_t, ids, (t_scale, t_cap, R, dtype)) - out[3].unsqueeze(1)
        support = (ids, z_s, t_lp_s)

    def full(x):
        if x is None or (x.numel() == 0 and y.numel() != 0):
            return None
        if rows is not None:
            x = x.new_zeros((tokens.numel(),) + x.shape[1:]).index_copy(0, rows, x)
        return x.reshape(tuple(shape) + x.shape[1:])

    lp, lse, t_lp, t_lse, kl, bstar = (full(x) for x in out)
    if not teacher:
        t_lp = t_lse = kl = None
    if not want_bstar:
        bstar = None
    return FusedTokenStats(lp, lse, t_lp, t_lse, kl, bstar, *(full(x) for x in support))


# ----------------------------------------------------------------------------- estimators

# name -> its per-sequence value (q~, p~: both renormalised on the top-k support S_t; S^T_t the
# teacher's top k, else the student's; q_tail = 1 - q(S_t)); the same as the registry's.
FUSED_ESTIMATORS = {
    "opd": "sum_t m_t sg(l_t) log pi(y_t)",
    "vopd": "sum_t m_t sg(l_t - KL_t) log pi(y_t)",
    "vopd_topk": "sum_t m_t sg(l_t - KL(q~ || p~)(S_t)) log pi(y_t)",
    "vopd_scaled": "sum_t m_t sg(l_t - alpha KL_t) log pi(y_t)",
    "opd_bstar": "sum_t m_t sg(l_t - b*(s_t)) log pi(y_t)",
    "opd_bstar_topk": "sum_t m_t sg(l_t - b*_k(s_t)) log pi(y_t)",
    "full_kl": "sum_t m_t KL_t",
    "topk_kl": "sum_t m_t KL(q~ || p~)(S^T_t)",
    "student_topk_kl": "sum_t m_t KL(q~ || p~)(S_t)",
    "topk_tail_kl": "sum_t m_t [sum_{v in S_t} q_v log(q_v / p_v) + q_tail log(q_tail / p_tail)]",
}

# top-k estimators -> whose top k is the support S_t
_TOPK_SUPPORT = {"vopd_topk": "student", "opd_bstar_topk": "student", "topk_kl": "teacher",
                 "student_topk_kl": "student", "topk_tail_kl": "student"}


def _topk_term(name: str, stats: FusedTokenStats) -> torch.Tensor:
    """The top-k estimator's per-token quantity [B, T] from the support's log-probs: the detached
    baseline (vopd_topk, opd_bstar_topk) or the loss with its gradient (the others). The
    renormalised divergences do not change under a shift of log q_S, so they read z_S - sg(lse)
    (no gradient through lse, hence no backward pass over V); the tail bucket needs lse's gradient."""
    lse = stats.student_logsumexp.unsqueeze(-1)
    t_lp = stats.teacher_topk_logprobs
    if name == "topk_tail_kl":
        return dv.tail_bucket_reverse_kl(stats.student_topk_logits - lse, t_lp)
    lp = stats.student_topk_logits - lse.detach()
    if name == "vopd_topk":
        return dv.renormalised_reverse_kl(lp.detach(), t_lp)
    if name == "opd_bstar_topk":
        return dv.student_topk_optimal_baseline(lp.detach(), t_lp)
    return dv.renormalised_reverse_kl(lp, t_lp)                    # topk_kl, student_topk_kl


def _loss_batch(tokens: torch.Tensor, mask: torch.Tensor, teacher_token_logprobs: torch.Tensor) -> TokenBatch:
    """A TokenBatch carrying tokens, mask and lp_T but no logits (an empty V axis): what the
    registry's ``log_ratio``, ``score_surrogate`` and ``masked_sum`` read, so that the fused
    estimators share their sign and masking conventions."""
    empty = teacher_token_logprobs.new_empty(*tokens.shape, 0)
    return TokenBatch(tokens=tokens, mask=mask, student_logits=empty, teacher_token_logprobs=teacher_token_logprobs)


def fused_per_sequence(name: str, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                       tokens: torch.Tensor, mask: torch.Tensor,
                       teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                       *, teacher_token_logprobs: Optional[torch.Tensor] = None,
                       student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                       student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                       student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                       vocab_size: Optional[int] = None, token_chunk: Optional[int] = None,
                       vocab_chunk: Optional[int] = None, return_stats: bool = False, **params):
    """Per-sequence surrogate values [B] of a token-level registry estimator, from hidden states:

        opd             sum_t m_t sg(l_t) log pi(y_t)
        vopd            sum_t m_t sg(l_t - KL_t) log pi(y_t)
        vopd_topk       sum_t m_t sg(l_t - KL_t^k) log pi(y_t)     (KL(q~ || p~) on the student's top k)
        vopd_scaled     sum_t m_t sg(l_t - alpha KL_t) log pi(y_t)
        opd_bstar       sum_t m_t sg(l_t - b*(s_t)) log pi(y_t)
        opd_bstar_topk  sum_t m_t sg(l_t - b*_k(s_t)) log pi(y_t)  (b* of q~, p~ on the student's top k)
        full_kl         sum_t m_t KL_t                             (gradient through the KL)
        topk_kl         sum_t m_t KL(q~ || p~) on the teacher's top k       (gradient through q~)
        student_topk_kl sum_t m_t KL(q~ || p~) on the student's top k       (gradient through q~)
        topk_tail_kl    sum_t m_t [sum_{v in S} q_v log(q_v/p_v) + q_tail log(q_tail/p_tail)],
                        S the student's top k, q_tail = 1 - q(S)         (gradient through q)

    with l_t = log pi(y_t) - log pi_T(y_t) and q~, p~ both renormalised on the support, the same
    values (to rounding) and gradients as ``estimators.per_sequence(name, batch)`` on the batch of
    the materialised logits z = c tanh(s (h W^T + b) / c). The top-k support is found in the
    fused pass (module docstring, "Top-k supports"); tied logits are broken as torch.topk breaks them.

    Args:
      name: one of ``FUSED_ESTIMATORS``.
      student_hidden: [B, T, d_s]; student_weight: [V, d_s]; tokens, mask: [B, T].
      teacher_hidden, teacher_weight: [B, T, d_T], [V, d_T]; only ``opd`` runs without them,
        from ``teacher_token_logprobs`` [B, T] (then one student-only pass).
      teacher_token_logprobs: log pi_T(y_t) [B, T], used instead of the fused teacher's when given.
      student_bias, ..., vocab_chunk: as ``fused_token_stats``.
      return_stats: also return the pass's ``FusedTokenStats`` (lp, lp_T, KL, ... per token, for metrics).
      **params: the estimator's parameters (registry defaults, e.g. the top-k size ``k``, with the
        registry's error for k > V; ``rho`` < 1 is refused).
    Returns:
      [B] surrogate values; the gradient of their sum is the estimator's gradient. With
      ``return_stats``: (values, stats).
    """
    if name not in FUSED_ESTIMATORS:
        raise InputError(f"the fused path has estimators {', '.join(FUSED_ESTIMATORS)}; got '{name}'")
    params = E.get(name).params(**params)
    if params.pop("rho", 1.0) != 1.0:
        raise InputError("the fused path has no token selection (rho < 1): it needs every position's entropy")
    if tokens.dim() != 2 or tuple(mask.shape) != tuple(tokens.shape):
        raise InputError(f"tokens and mask must both be [B, T], got {tuple(tokens.shape)} and {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("the response mask must hold only 0 and 1")
    if teacher_hidden is None and not (name == "opd" and teacher_token_logprobs is not None):
        raise InputError(f"fused '{name}' needs the teacher's hidden states and lm_head weight"
                         + ("" if name != "opd" else " (or teacher_token_logprobs)"))
    topk = None
    if name in _TOPK_SUPPORT:
        vocab = student_weight.shape[0] if vocab_size is None else min(vocab_size, student_weight.shape[0])
        topk = E._check_k(params["k"], vocab, name)
    stats = fused_token_stats(student_hidden, student_weight, tokens, teacher_hidden, teacher_weight, mask=mask,
                              student_bias=student_bias, teacher_bias=teacher_bias,
                              student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                              student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                              vocab_size=vocab_size, want_bstar=name == "opd_bstar",
                              topk=topk, topk_support=_TOPK_SUPPORT.get(name, "student"),
                              token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    lp = stats.student_logprobs
    t_lp = stats.teacher_logprobs if teacher_token_logprobs is None else teacher_token_logprobs.detach().to(lp.dtype)
    batch = _loss_batch(tokens, mask, t_lp)
    if name == "full_kl":
        values = E.masked_sum(batch, stats.kl)
    elif name in ("topk_kl", "student_topk_kl", "topk_tail_kl"):
        values = E.masked_sum(batch, _topk_term(name, stats))
    else:
        advantage = E.log_ratio(batch, lp)
        if name == "vopd":
            advantage = advantage - stats.kl.detach()
        elif name == "vopd_scaled":
            alpha = params["alpha"]
            advantage = advantage - (stats.kl.detach() if alpha == 1.0 else alpha * stats.kl.detach())
        elif name == "opd_bstar":
            advantage = advantage - stats.bstar
        elif name in ("vopd_topk", "opd_bstar_topk"):
            advantage = advantage - _topk_term(name, stats)
        values = E.score_surrogate(batch, lp, advantage)
    return (values, stats) if return_stats else values


def fused_surrogate_loss(name: str, *args, reduction: str = "sequence_mean",
                         num_items_in_batch: Optional[float] = None, **kwargs) -> torch.Tensor:
    """The loss to call ``.backward()`` on, with ``estimators.surrogate_loss``'s reductions
    (``sequence_mean``, ``token_mean``, ``sum``, ``none``) over ``fused_per_sequence``'s values.

    Args:
      name, *args, **kwargs: as ``fused_per_sequence`` (mask is its fifth argument).
      reduction, num_items_in_batch: as ``estimators.surrogate_loss``.
    """
    if reduction not in E.REDUCTIONS:      # before the pass over the vocabulary
        raise InputError(f"unknown reduction '{reduction}'; choose one of {E.REDUCTIONS}")
    values = fused_per_sequence(name, *args, **kwargs)
    mask = args[3] if len(args) > 3 else kwargs["mask"]
    return E.reduce(values, mask, reduction, num_items_in_batch)
