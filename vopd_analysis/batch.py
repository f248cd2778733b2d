"""TokenBatch: the one container every estimator reads.

Tabular environments, real language models and the training loop all build a
``TokenBatch``; estimators know nothing about where its tensors came from.

Shapes: ``B`` sequences, ``T`` response positions, ``V`` vocabulary, ``k`` top-k.

* ``tokens``                 [B, T] long   sampled response tokens y_t
* ``mask``                   [B, T]        1 where y_t is part of the loss
* ``student_logits``         [B, T, V]     student logits at s_t (carry the gradient)
* ``teacher_token_logprobs`` [B, T]        log pi_T(y_t | s_t)
* ``teacher_logits``         [B, T, V]     optional full teacher logits
* ``teacher_logsumexp``      [B, T]        optional logsumexp of ``teacher_logits``, from the scorer
                                           (which needs it for ``teacher_token_logprobs`` anyway)
* ``teacher_topk_ids``       [B, T, k]     optional teacher top-k ids (by teacher probability)
* ``teacher_topk_logprobs``  [B, T, k]     their full-vocabulary teacher log-probs
* ``student_topk_ids``       [B, T, k]     optional student top-k ids (by student logit)
* ``teacher_logprobs_on_student_topk`` [B, T, k]  teacher log-probs at those ids
* ``kl_to_go``               [B, T]        optional exact W_t(s_t) (tabular oracle)
* ``next_kl_to_go``          [B, T, V]     optional exact W_{t+1}(s_t + v) (tabular oracle)

The top-k fields let a scorer keep only what an estimator needs instead of the
full ``[B, T, V]`` teacher tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .errors import InputError


@dataclasses.dataclass
class TokenBatch:
    """B sampled responses of T positions, with what the estimators read of student and teacher.

    Only the first four fields are required; an estimator that needs a missing optional one
    raises ``InputError`` naming it. ``validate`` checks the shapes below.

    Attributes:
      tokens: sampled tokens y_t, [B, T] long.
      mask: 1 where y_t counts in the loss, 0 elsewhere (padding), [B, T].
      student_logits: student logits at s_t, the tensor the gradient flows through, [B, T, V].
      teacher_token_logprobs: log pi_T(y_t | s_t), [B, T].
      teacher_logits: full teacher logits, [B, T, V], or None.
      teacher_logsumexp: logsumexp of ``teacher_logits`` over V, [B, T], or None.
      teacher_topk_ids, teacher_topk_logprobs: the teacher's top-k ids and their
        full-vocabulary teacher log-probs, [B, T, k] each, or None.
      student_topk_ids, teacher_logprobs_on_student_topk: the student's top-k ids (by
        logit) and the teacher's log-probs there, [B, T, k] each, or None.
      kl_to_go: exact W_t(s_t), [B, T], or None (tabular oracle).
      next_kl_to_go: exact W_{t+1}(s_t + v) for every v, [B, T, V], or None (tabular oracle).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    student_logits: torch.Tensor
    teacher_token_logprobs: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    teacher_logsumexp: Optional[torch.Tensor] = None
    teacher_topk_ids: Optional[torch.Tensor] = None
    teacher_topk_logprobs: Optional[torch.Tensor] = None
    student_topk_ids: Optional[torch.Tensor] = None
    teacher_logprobs_on_student_topk: Optional[torch.Tensor] = None
    kl_to_go: Optional[torch.Tensor] = None
    next_kl_to_go: Optional[torch.Tensor] = None

    @property
    def vocab_size(self) -> int:
        """V, the last axis of ``student_logits``."""
        return self.student_logits.shape[-1]

    @property
    def num_sequences(self) -> int:
        """B, the first axis of ``tokens``."""
        return self.tokens.shape[0]

    def validate(self) -> "TokenBatch":
        """Check shapes and values; raise ``InputError`` naming the first problem found.

        Checks: ``tokens`` is [B, T] with ids in [0, V); every [B, T] and [B, T, V] field
        present has that shape (one V for student and teacher); each top-k id tensor comes
        with its log-probs, both [B, T, k]; the mask is not all zero; ``teacher_logsumexp``
        only with ``teacher_logits``; ``student_logits``, ``teacher_logits``,
        ``teacher_token_logprobs`` and ``teacher_logsumexp`` hold no NaN or inf.

        Returns:
          The batch itself, so that ``TokenBatch(...).validate()`` can be passed on.
        """
        if self.tokens.dim() != 2:
            raise InputError(f"tokens must be [B, T], got shape {tuple(self.tokens.shape)}")
        B, T = self.tokens.shape
        if tuple(self.student_logits.shape[:2]) != (B, T) or self.student_logits.dim() != 3:
            raise InputError(
                f"student_logits must be [B, T, V] = [{B}, {T}, V], got {tuple(self.student_logits.shape)}")
        for name in ("mask", "teacher_token_logprobs", "teacher_logsumexp", "kl_to_go"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (B, T):
                raise InputError(f"{name} must be [B, T] = [{B}, {T}], got {tuple(value.shape)}")
        V = self.vocab_size
        for name in ("teacher_logits", "next_kl_to_go"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (B, T, V):
                raise InputError(
                    f"{name} must be [B, T, V] = [{B}, {T}, {V}] (same vocabulary as the student), "
                    f"got {tuple(value.shape)}")
        for ids, vals in (("teacher_topk_ids", "teacher_topk_logprobs"),
                          ("student_topk_ids", "teacher_logprobs_on_student_topk")):
            a, b = getattr(self, ids), getattr(self, vals)
            if (a is None) != (b is None):
                raise InputError(f"{ids} and {vals} must be given together")
            if a is not None and (a.shape != b.shape or tuple(a.shape[:2]) != (B, T)):
                raise InputError(f"{ids} and {vals} must both be [B, T, k], got "
                                 f"{tuple(a.shape)} and {tuple(b.shape)}")
        if self.tokens.numel() and (int(self.tokens.min()) < 0 or int(self.tokens.max()) >= V):
            raise InputError(f"token ids must lie in [0, {V}), got range "
                             f"[{int(self.tokens.min())}, {int(self.tokens.max())}]")
        if not bool(self.mask.any()):
            raise InputError("the response mask is empty: no token contributes to the loss")
        if self.teacher_logsumexp is not None and self.teacher_logits is None:
            raise InputError("teacher_logsumexp is given without the teacher_logits it normalises")
        for name in ("student_logits", "teacher_logits", "teacher_token_logprobs", "teacher_logsumexp"):
            value = getattr(self, name)
            if value is not None and not bool(torch.isfinite(value.detach()).all()):
                raise InputError(f"{name} contains NaN or inf")
        return self
