"""Per-token divergences between a student q = softmax(z) and a teacher p.

All functions act on the last (vocabulary) axis and return one value per token.
They compute in at least float32, whatever the input dtype (bf16 logits from a
GPU model are upcast chunk by chunk, never as one ``[B, T, V]`` float32 copy).
"""

from __future__ import annotations

import torch

_DEFAULT_CHUNK_TOKENS = 1024


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; anything narrower is computed in float32."""
    return torch.promote_types(x.dtype, torch.float32)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[y] = z_y - logsumexp(z), without materialising log_softmax."""
    logits = logits.to(compute_dtype(logits))
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


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
                        chunk_tokens: int = _DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """KL(q || p) per token as a detached baseline, computed in chunks of tokens.

    Peak extra memory is O(chunk_tokens * V) instead of O(B * T * V).
    """
    lead = student_logits.shape[:-1]
    s = student_logits.detach().reshape(-1, student_logits.shape[-1])
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    out = torch.empty(s.shape[0], dtype=compute_dtype(s), device=s.device)
    for start in range(0, s.shape[0], chunk_tokens):
        end = start + chunk_tokens
        out[start:end] = reverse_kl(s[start:end], t[start:end])
    return out.reshape(lead)


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probs log softmax(z)[ids] for ids [..., k]."""
    logits = logits.to(compute_dtype(logits))
    return logits.gather(-1, ids) - torch.logsumexp(logits, dim=-1, keepdim=True)
