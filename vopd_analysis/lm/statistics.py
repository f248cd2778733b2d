"""What the distributions look like at the states the student visits: entropies, top-k mass, the
reverse KL and the one-token score variance of each state baseline, binned by teacher entropy.

    distribution_statistics = rollouts.generate_rollouts -> scoring.score -> token_distribution_statistics
                                                                          + entropy_binned_score_variance
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import divergences as dv
from ..errors import InputError
from .rollouts import generate_rollouts
from .scoring import DEFAULT_CHUNK_TOKENS, score


@torch.no_grad()
def token_distribution_statistics(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                  top_k: Sequence[int] = (1, 16, 256),
                                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict:
    """Per-token means over the M rows of student and teacher logits, in float32 chunks:

    * ``teacher_entropy``     H(pi_T) = -sum_v p_v log p_v (nats), p = softmax(teacher row);
    * ``teacher_top{k}_mass`` the probability of the teacher's k most likely tokens (1 when k >= V);
    * ``reverse_kl``          KL(pi || pi_T) = sum_v q_v (log q_v - log p_v), q = softmax(student row);
    * ``student_entropy``     H(pi).

    Uniform teacher logits give entropy log V and top-k mass k / V; identical rows give reverse KL 0.

    Args:
      student_logits, teacher_logits: [M, V], M > 0.
      top_k: the k of the top-k masses.
      chunk_tokens: rows per chunk.

    Returns:
      Name -> float: the means above, plus ``tokens`` (M) and ``vocab_size`` (V).
    """
    M, V = teacher_logits.shape
    if student_logits.shape != teacher_logits.shape or M == 0:
        raise InputError(f"need equal non-empty [M, V] student and teacher logits, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    sums = {"teacher_entropy": 0.0, "student_entropy": 0.0, "reverse_kl": 0.0,
            **{f"teacher_top{k}_mass": 0.0 for k in top_k}}
    for a in range(0, M, chunk_tokens):
        logp = torch.log_softmax(teacher_logits[a:a + chunk_tokens].float(), dim=-1)
        logq = torch.log_softmax(student_logits[a:a + chunk_tokens].float(), dim=-1)
        p, q = logp.exp(), logq.exp()
        sums["teacher_entropy"] += float(-(p * logp).sum(-1).double().sum())
        sums["student_entropy"] += float(-(q * logq).sum(-1).double().sum())
        sums["reverse_kl"] += float(dv.kl_from_logprobs(logq, logp).double().sum())
        for k in top_k:
            sums[f"teacher_top{k}_mass"] += float(torch.topk(p, min(k, V), dim=-1).values.sum(-1).double().sum())
    return {**{name: total / M for name, total in sums.items()}, "tokens": M, "vocab_size": V}


ENTROPY_EDGES = (0.0, 0.25, 1.0, 2.0, 3.0, 4.5, float("inf"))   # teacher-entropy bins (nats) of the states


@torch.no_grad()
def entropy_binned_score_variance(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                  edges: Sequence[float] = ENTROPY_EDGES,
                                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> List[dict]:
    """The states binned by the teacher's entropy H(pi_T(s)), and per bin the sums over its states of the
    logit-space one-token score variance (``divergences.score_variance``) with no baseline (opd), vOPD's
    KL baseline and the optimal b*: what each baseline leaves at a state, whatever the vocabulary.

    Args:
      student_logits, teacher_logits: [M, V] rows of visited states.
      edges: increasing bin edges in nats; bin i holds edges[i] <= H < edges[i + 1].
      chunk_tokens: rows per chunk (at most 64 MiB of float32; elementwise in float32, or float64 for
        float64 logits, sums in float64).

    Returns:
      One dict per bin: {"low", "high", "states", "opd", "vopd", "bstar"} (sums over the bin's states).
    """
    bins = [{"low": lo, "high": hi, "states": 0, "opd": 0.0, "vopd": 0.0, "bstar": 0.0}
            for lo, hi in zip(edges[:-1], edges[1:])]
    bounds = torch.tensor(list(edges[1:-1]), dtype=torch.float64)
    rows = max(1, min(chunk_tokens, (1 << 24) // teacher_logits.shape[-1]))      # float32 chunks of 64 MiB
    real = dv.compute_dtype(teacher_logits)
    for a in range(0, teacher_logits.shape[0], rows):
        lp = torch.log_softmax(teacher_logits[a:a + rows].to(real), dim=-1)
        lq = torch.log_softmax(student_logits[a:a + rows].to(real), dim=-1)
        entropy = -(lp.exp() * lp).sum(-1, dtype=torch.float64)
        index = torch.bucketize(entropy, bounds, right=True)
        m = dv.score_moments(lq, lp)                          # one pass gives every baseline's variance
        baselines = {"opd": torch.zeros_like(m["kl"]), "vopd": m["kl"], "bstar": m["s1"] / m["s0"].clamp_min(1e-300)}
        values = {key: dv.score_variance(lq, lp, b, m) for key, b in baselines.items()}
        for i, b in enumerate(bins):
            in_bin = index == i
            b["states"] += int(in_bin.sum())
            for key, v in values.items():
                b[key] += float(v[in_bin].sum())
    return bins


@torch.no_grad()
def distribution_statistics(student, teacher, tokenizer, prompts: Sequence[str], num_rollouts: int,
                            max_new_tokens: int, seed: Optional[int] = None, vocab_size: Optional[int] = None,
                            top_k: Sequence[int] = (1, 16, 256), chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict:
    """What the estimators see: ``token_distribution_statistics`` at every response token of
    student samples, the teacher and the student both conditioned on the student's own prefix.

    Args:
      student, teacher, tokenizer: the pair (the student is scored in eval mode, then restored).
      prompts: P prompts.
      num_rollouts: K samples per prompt (``generate_rollouts`` with ``seed``).
      max_new_tokens: response length limit.
      seed: the rollouts' seed.
      vocab_size: the shared real vocabulary V.
      top_k, chunk_tokens: as for ``token_distribution_statistics``.

    Returns:
      ``token_distribution_statistics``'s dict plus ``teacher_token_logprob``, the mean of
      log pi_T(y_t | s_t) over the sampled tokens, ``mean_response_tokens``, and ``by_entropy``
      (``entropy_binned_score_variance`` of the visited states).
    """
    rollouts = generate_rollouts(student, tokenizer, prompts, num_rollouts, max_new_tokens, seed=seed,
                                 vocab_size=vocab_size)
    was_training = student.training
    student.eval()
    batch = score(student, teacher, rollouts, ["full_kl"], vocab_size=vocab_size, chunk_tokens=chunk_tokens)
    student.train(was_training)
    keep = batch.mask.bool()
    out = token_distribution_statistics(batch.student_logits[keep], batch.teacher_logits[keep], top_k, chunk_tokens)
    out["by_entropy"] = entropy_binned_score_variance(batch.student_logits[keep], batch.teacher_logits[keep],
                                                      chunk_tokens=chunk_tokens)
    out["teacher_token_logprob"] = float(batch.teacher_token_logprobs[keep].double().mean())
    out["mean_response_tokens"] = float(rollouts.response_mask.sum(1).double().mean())
    return out
