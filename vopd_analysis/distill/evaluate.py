"""Held-out evaluation of a student: verifier accuracy (greedy), the exact reverse KL and the
teacher's log-likelihood of the student's samples.

The reverse KL reported is the exact per-token one summed over each sampled response,

    KL_seq(y) = sum_t KL(pi(.|s_t) || pi_T(.|s_t)),   y ~ pi (temperature 1),

averaged over one rollout per prompt: an unbiased estimate of the sequence-level
reverse KL J(theta) = E_y[sum_t KL_t(s_t)] with the per-token sums done exactly.
On the same samples, the teacher log-likelihood is sum_t log pi_T(y_t | s_t) over all
sampled tokens (EOS included) divided by their number: nats per token, higher is better.
Accuracy needs a verifier: prompts that cannot be graded (no answer and not the built-in
task's, e.g. the small preset's text prompts) are not decoded greedily and count as ungraded.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import divergences as dv
from .. import estimators as est
from ..lm import rollouts as ro
from ..lm import scoring as sc
from ..lm import tasks
from ..lm.fused_score import FusedScore


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                     vocab_size: Optional[int] = None) -> List[str]:
    """Greedy (argmax) responses of ``model``, generation stopping at EOS.

    Args:
      model: a causal LM (restored to its training mode afterwards).
      tokenizer: its tokenizer (prompts are left-padded by ``rollouts.encode_prompts``).
      prompts: P prompt strings.
      max_new_tokens: the most tokens generated per prompt.
      vocab_size: V; ids >= V (padded output rows) are never chosen. None: no restriction.

    Returns:
      P decoded responses, special tokens (EOS, padding) dropped.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    ids, att = ro.encode_prompts(model, tokenizer, prompts, max_new_tokens)
    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=ro.eos_ids(model, tokenizer))
    processors = LogitsProcessorList([ro.RestrictVocab(vocab_size)] if vocab_size else [])
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=config,
                         logits_processor=processors)
    model.train(was_training)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def sequence_reverse_kl(batch) -> torch.Tensor:
    """The exact reverse KL of each sampled sequence, KL_seq(y) = sum_t m_t KL(pi(.|s_t) || pi_T(.|s_t)).

    Args:
      batch: a ``TokenBatch`` with the full teacher logits (``scoring.score`` with an estimator that
        keeps them, e.g. "full_kl").

    Returns:
      [B] float, no gradient.
    """
    kl = dv.reverse_kl_to_fixed_teacher(batch.student_logits, batch.teacher_logits, batch.teacher_logsumexp)
    return est.masked_sum(batch, kl)


@torch.no_grad()
def sampled_reverse_kl(batch) -> torch.Tensor:
    """The single-sample reverse KL of each sequence, sum_t m_t l_t, l_t = log pi(y_t|s_t) - log pi_T(y_t|s_t).

    Args:
      batch: a ``TokenBatch``.

    Returns:
      [B] float, no gradient.
    """
    return est.masked_sum(batch, est.log_ratio(batch, est.student_token_logprobs(batch)))


def reverse_kl_sums(scored) -> tuple:
    """(sum over sequences of ``sequence_reverse_kl``, NaN without the teacher's full distribution;
    sum of ``sampled_reverse_kl``) of a ``TokenBatch``, or of a ``fused_score.FusedScore`` (its own
    per-sequence sums from the fused pass), as floats; NaN and NaN for None (a failed step)."""
    if scored is None:
        return float("nan"), float("nan")
    with torch.no_grad():
        if isinstance(scored, FusedScore):
            return float(scored.sequence_reverse_kl().sum()), float(scored.sampled_reverse_kl().sum())
        exact = float(sequence_reverse_kl(scored).sum()) if scored.teacher_logits is not None else float("nan")
        return exact, float(sampled_reverse_kl(scored).sum())


def gradable(record: dict) -> bool:
    """Whether ``tasks.verify`` can grade a response to ``record`` (tried on the empty response).

    Args:
      record: a prompt record {"prompt": str, "answer": optional}.

    Returns:
      True for records with an answer and for prompts of the built-in addition task.
    """
    return tasks.verify(record, "") is not None


@torch.no_grad()
def evaluate_shard(student, teacher, tokenizer, records: Sequence[dict], max_new_tokens: int, seed: int,
                   vocab_size: Optional[int] = None, batch_size: int = 64) -> torch.Tensor:
    """This process's share of the held-out metrics, as sums (the caller reduces over processes).

    For each chunk of ``batch_size`` records: greedy responses graded by ``tasks.verify`` (only
    if some record is gradable), then one student rollout per prompt (seed ``seed + i`` for
    the chunk starting at record i) scored with the full teacher logits.

    Args:
      student, teacher: causal LMs sharing a vocabulary.
      tokenizer: their tokenizer.
      records: R prompt records {"prompt", "answer" (optional)}.
      max_new_tokens: response length limit, greedy and sampled.
      seed: base seed of the rollouts.
      vocab_size: the shared real vocabulary V (None: the logits' width).
      batch_size: records per chunk.

    Returns:
      [6] float64: [correct, graded, sum_y KL_seq(y), sequences,
      sum over sampled tokens (EOS included) of log pi_T(y_t|s_t), sampled tokens].
    """
    sums = torch.zeros(6, dtype=torch.float64)
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [r["prompt"] for r in chunk]
        grades = []
        if any(gradable(r) for r in chunk):
            grades = [tasks.verify(r, t) for r, t in
                      zip(chunk, greedy_responses(student, tokenizer, prompts, max_new_tokens, vocab_size))]
        rollouts = ro.generate_rollouts(student, tokenizer, prompts, 1, max_new_tokens, seed=seed + i,
                                        vocab_size=vocab_size)
        batch = sc.score(student, teacher, rollouts, ["full_kl"], vocab_size=vocab_size)
        kl = sequence_reverse_kl(batch)
        teacher_loglik = est.masked_sum(batch, batch.teacher_token_logprobs.to(torch.float64))
        sums += torch.tensor([sum(g is True for g in grades), sum(g is not None for g in grades),
                              float(kl.sum()), len(chunk), float(teacher_loglik.sum()), float(batch.mask.sum())],
                             dtype=torch.float64)
    return sums
