"""Per-token divergences between a student q = softmax(z) and a teacher p.

All functions act on the last (vocabulary) axis and return one value per token.
They compute in at least float32, whatever the input dtype (bf16 logits from a
GPU model are upcast chunk by chunk, never as one ``[B, T, V]`` float32 copy).
"""

from __future__ import annotations

from typing import Optional

import torch

# Detached reductions over V work on chunks of about this many elements per temporary
# (1 MiB in float32): small enough to stay in cache and to be served from the allocator's
# free lists, so they neither touch fresh pages nor keep a second [B, T, V] tensor alive.
_CHUNK_ELEMENTS = 1 << 18


def logsumexp_detached(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis of detached ``logits`` in the compute dtype, in chunks (no [B, T, V] copy)."""
    x = logits.detach()
    dtype = compute_dtype(x)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], dtype=dtype, device=x.device)
    rows = _chunk_rows(x.shape[-1], flat.shape[0])
    for start in range(0, flat.shape[0], rows):
        out[start:start + rows] = torch.logsumexp(flat[start:start + rows].to(dtype), dim=-1)
    return out.reshape(x.shape[:-1])


def _chunk_rows(vocab: int, tokens: int = 0, elements: int = _CHUNK_ELEMENTS) -> int:
    """Rows per chunk: about ``elements`` values, or 1/32 of all ``tokens`` when that is more,
    so a large vocabulary is not walked one token at a time (at most ~32 steps per call)."""
    return max(1, max(elements, tokens * vocab // 32) // max(1, vocab))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; anything narrower is computed in float32."""
    return torch.promote_types(x.dtype, torch.float32)


def token_logprobs_and_lse(logits: torch.Tensor, tokens: torch.Tensor) -> tuple:
    """(z_y - logsumexp(z), detached logsumexp(z)): log softmax(z)[y] without materialising log_softmax.

    The logsumexp comes back so that a baseline over the same logits
    (``reverse_kl_detached``, ``logprobs_at``) need not recompute it: one pass over V saved.
    """
    logits = logits.to(compute_dtype(logits))
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    return picked - lse, lse.detach()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[y] = z_y - logsumexp(z)."""
    return token_logprobs_and_lse(logits, tokens)[0]


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_v q_v (log q_v - log p_v); differentiable in both inputs."""
    dtype = compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    dtype = compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def renormalised_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Reverse KL of q and p both renormalised on a support S (the last axis):

    q~_v = q_v / sum_{u in S} q_u,  p~_v likewise,  KL(q~ || p~) = sum_{v in S} q~_v (log q~_v - log p~_v).
    """
    log_q = student_logprobs - torch.logsumexp(student_logprobs, dim=-1, keepdim=True)
    log_p = teacher_logprobs - torch.logsumexp(teacher_logprobs, dim=-1, keepdim=True)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


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
    log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(beta, dtype=dtype)),
                                         log_q + torch.log(torch.tensor(1.0 - beta, dtype=dtype))]), dim=0)
    kl_p_m = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q_m = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_p_m + (1.0 - beta) * kl_q_m


@torch.no_grad()
def reverse_kl_detached(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        student_lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(q || p) per token as a detached baseline, computed in chunks of tokens.

    Per chunk, log q = z - logsumexp(z) and log p = log_softmax(t) are formed in two
    temporaries of the chunk's size that are then overwritten in place (log q - log p, q);
    ``student_lse`` = logsumexp(z), when the caller has it (from ``token_logprobs_and_lse``),
    saves one pass over V. A chunk holds about 2^18 elements, or 1/32 of the tokens when
    that is more, so the extra memory stays a small fraction of one [B, T, V] tensor.
    """
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    dtype = compute_dtype(student_logits)
    s = student_logits.detach().reshape(-1, V)
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    lse_z = student_lse.reshape(-1) if student_lse is not None else None
    out = torch.empty(s.shape[0], dtype=dtype, device=s.device)
    rows = _chunk_rows(V, s.shape[0])
    for start in range(0, s.shape[0], rows):
        end = min(start + rows, s.shape[0])
        zc = s[start:end].to(dtype)
        tc = t[start:end].to(dtype)
        lz = lse_z[start:end] if lse_z is not None else torch.logsumexp(zc, dim=-1)
        log_q = torch.sub(zc, lz.unsqueeze(-1))
        diff = torch.log_softmax(tc, dim=-1).neg_().add_(log_q)        # log q - log p
        out[start:end] = log_q.exp_().mul_(diff).sum(-1)
    return out.reshape(lead)


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full-vocabulary log-probs log softmax(z)[ids] for ids [..., k]; ``lse`` = logsumexp(z) if known."""
    if not (torch.is_grad_enabled() and logits.requires_grad):
        # detached use (baselines, teacher scoring): no [B, T, V] float32 copy
        dtype = compute_dtype(logits)
        lse = logsumexp_detached(logits) if lse is None else lse
        return logits.detach().gather(-1, ids).to(dtype) - lse.unsqueeze(-1)
    logits = logits.to(compute_dtype(logits))
    return logits.gather(-1, ids) - torch.logsumexp(logits, dim=-1, keepdim=True)
