"""The per-token statistics record that both scorers fill and the record-reading estimators read.

Two scorers compute the same per-token quantities: the materialised one from a ``TokenBatch`` of
[B, T, V] logits (``from_batch``, chunked over rows by ``divergences``), the fused one from hidden
states and ``lm_head`` weights tile by tile (``lm.fused_score.stats_from_hidden`` over
``fused.fused_token_stats``). Each fills one ``TokenStats`` with only what the estimator's
``Needs`` asks for; the registry's estimators (``estimators``) then read the record, so an
estimator composed from an existing return and baseline runs on either scorer unchanged.

Notation as in ``estimators``: q = softmax(z) the student, p the teacher, y_t the sampled token,

    lp_t   = log q(y_t|s_t)                     (with its gradient)
    lp_T,t = log p(y_t|s_t)                     (detached)
    KL_t   = sum_v q_v (log q_v - log p_v)     (gradient in the student only)
    b*_t   = sum_v w_v l_v / sum_v w_v,  w_v = q_v (1 - 2 q_v + |q|^2)      (detached)
    S_t    = the ids of the k largest logits of the student (or the teacher); log q and log p on S_t.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import divergences as dv
from .batch import TokenBatch
from .errors import InputError

KL_USES = ("", "baseline", "loss")          # not read < detached (a baseline) < with its gradient (a loss)
TOPK_SUPPORTS = ("student", "teacher")


@dataclasses.dataclass(frozen=True)
class Needs:
    """What an estimator reads of ``TokenStats``; a scorer computes only this.

    Attributes:
      logprobs: lp_t with its gradient (and lp_T,t, l_t).
      kl: "" (not read), "baseline" (KL_t detached, computed in lp's pass) or "loss" (KL_t with its
        gradient, an analytic term).
      bstar: b*_t, detached, computed in lp's pass.
      topk: k, the size of the top-k support S_t (None: no support).
      topk_of: "student" or "teacher": whose top k is S_t.
      topk_grad: "" (log q on S_t detached, for a baseline), "renormalised" (its gradient is exact
        for a function invariant to shifting log q on S_t, such as the renormalised KL: the fused
        scorer then skips logsumexp's gradient and its pass over V) or "full".
      kl_to_go: the tabular oracle's W_t(s_t).
    """

    logprobs: bool = False
    kl: str = ""
    bstar: bool = False
    topk: Optional[int] = None
    topk_of: str = "student"
    topk_grad: str = ""
    kl_to_go: bool = False

    def __or__(self, other: "Needs") -> "Needs":
        """What two parts of one estimator read together (at most one of them reads a top-k support)."""
        support = self if other.topk is None else other
        return Needs(self.logprobs or other.logprobs, max(self.kl, other.kl, key=KL_USES.index),
                     self.bstar or other.bstar, support.topk, support.topk_of, support.topk_grad,
                     self.kl_to_go or other.kl_to_go)


@dataclasses.dataclass
class TokenStats:
    """Per-token statistics of B sequences of T positions; None where the ``Needs`` did not ask.

    The fields ``mask`` and ``teacher_token_logprobs`` are named as in ``TokenBatch``, so the
    registry's ``log_ratio``, ``score_surrogate`` and ``masked_sum`` read either.

    Attributes:
      tokens, mask: y_t [B, T] long and 1 where y_t counts.
      student_logprobs: lp_t [B, T], with its gradient.
      teacher_token_logprobs: lp_T,t [B, T], detached.
      kl: KL_t [B, T] (detached from the materialised scorer when only a baseline needs it).
      bstar: b*_t [B, T], detached.
      topk_ids: S_t [B, T, k] long, ordered by logit.
      student_topk_logprobs: log q on S_t [B, T, k], with the gradient ``Needs.topk_grad`` asked for.
      teacher_topk_logprobs: log p on S_t [B, T, k], detached.
      kl_to_go: W_t(s_t) [B, T] (tabular oracle).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    student_logprobs: Optional[torch.Tensor] = None
    teacher_token_logprobs: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    bstar: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    student_topk_logprobs: Optional[torch.Tensor] = None
    teacher_topk_logprobs: Optional[torch.Tensor] = None
    kl_to_go: Optional[torch.Tensor] = None


def check_k(k: int, vocab: int, name: str) -> int:
    """``k``, or an ``InputError`` unless it is an integer with 1 <= k <= V."""
    if not isinstance(k, (int,)) or isinstance(k, bool):
        raise InputError(f"{name}: k must be an integer, got {k!r}")
    if k < 1 or k > vocab:
        raise InputError(f"{name}: k must satisfy 1 <= k <= V = {vocab}, got k={k}")
    return k


def require_teacher_logits(batch: TokenBatch, name: str) -> torch.Tensor:
    """The batch's full teacher logits, or an ``InputError`` naming estimator ``name``."""
    if batch.teacher_logits is None:
        raise InputError(f"estimator '{name}' needs the full teacher logits, but the batch has none "
                         "(score the teacher with keep='full')")
    return batch.teacher_logits


def require_oracle(batch: TokenBatch, field: str, name: str) -> torch.Tensor:
    """The batch's exact oracle ``field``, or an ``InputError`` naming estimator ``name``."""
    value = getattr(batch, field)
    if value is None:
        raise InputError(f"estimator '{name}' needs the exact oracle field '{field}', which only the "
                         "tabular environments provide")
    return value


def student_topk_support(batch: TokenBatch, k: int, name: str) -> tuple:
    """(ids, log p on S_k), S_k the student's top-k tokens at each state, from the full teacher
    logits or from the batch's precomputed ``teacher_logprobs_on_student_topk``. [B, T, k] each, detached"""
    check_k(k, batch.vocab_size, name)
    with torch.no_grad():
        z = batch.student_logits.detach()
        if batch.teacher_logits is not None:
            ids = torch.topk(z, k, dim=-1).indices
            return ids, dv.logprobs_at(batch.teacher_logits.detach(), ids)
        if batch.student_topk_ids is None or batch.student_topk_ids.shape[-1] < k:
            raise InputError(f"estimator '{name}' (k={k}) needs the teacher's log-probs on the student's "
                             "top-k tokens (or full teacher logits), but the batch has neither")
        return (batch.student_topk_ids[..., :k],
                batch.teacher_logprobs_on_student_topk[..., :k].to(dv.compute_dtype(z)))


def teacher_topk(batch: TokenBatch, k: int, name: str) -> tuple:
    """(ids, full-vocabulary log p) of the teacher's top-k tokens. [B, T, k] each"""
    check_k(k, batch.vocab_size, name)
    if batch.teacher_logits is not None:
        t = batch.teacher_logits.detach()
        ids = torch.topk(t, k, dim=-1).indices
        return ids, dv.logprobs_at(t, ids)
    if batch.teacher_topk_ids is not None and batch.teacher_topk_ids.shape[-1] >= k:
        return batch.teacher_topk_ids[..., :k], batch.teacher_topk_logprobs[..., :k]
    raise InputError(f"estimator '{name}' (k={k}) needs the teacher's top-{k} log-probs "
                     "(or full teacher logits), but the batch has neither")


def from_batch(batch: TokenBatch, needs: Needs, name: str) -> TokenStats:
    """The materialised scorer: ``needs`` from the batch's logits, each in one chunked pass of
    ``divergences`` (lp together with a detached KL_t, b*_t or the logsumexp the support reuses;
    KL_t with its gradient in a pass of its own). ``name`` is the estimator, for error messages."""
    z, y = batch.student_logits, batch.tokens
    lp = kl = bstar = lse = None
    if needs.logprobs:
        if needs.kl == "baseline":
            lp, kl = dv.token_logprobs_and_reverse_kl(z, y, require_teacher_logits(batch, name),
                                                      batch.teacher_logsumexp)
        elif needs.bstar:
            lp, bstar = dv.token_logprobs_and_optimal_baseline(z, y, require_teacher_logits(batch, name),
                                                               batch.teacher_logsumexp)
        elif needs.topk is not None:
            lp, lse = dv.token_logprobs_and_lse(z, y)
        else:
            lp = dv.token_logprobs(z, y)
    if needs.kl == "loss":
        kl = dv.reverse_kl_to_fixed_teacher(z, require_teacher_logits(batch, name), batch.teacher_logsumexp)
    ids = q_s = p_s = None
    if needs.topk is not None:
        support = student_topk_support if needs.topk_of == "student" else teacher_topk
        ids, p_s = support(batch, needs.topk, name)
        if needs.topk_grad:
            q_s = dv.logprobs_at(z, ids)
        else:
            with torch.no_grad():
                q_s = dv.logprobs_at(z.detach(), ids, lse)
    w = None
    if needs.kl_to_go:
        w = require_oracle(batch, "kl_to_go", name).to(lp.dtype)
    return TokenStats(y, batch.mask, lp, batch.teacher_token_logprobs, kl, bstar, ids, q_s, p_s, w)
