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
    raises ``InputError`` naming it. ``validate`` checks the shapes below, the dtypes and the values.

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

    def validate(self, allow_empty_mask: bool = False, unread: tuple = ()) -> "TokenBatch":
        """Check shapes, dtypes and values; raise ``InputError`` naming the first problem found.

        Checks: ``tokens`` is a [B, T] long tensor with ids in [0, V); every [B, T] and
        [B, T, V] field present has that shape (one V for student and teacher); each top-k id
        tensor is long, in [0, V), and comes with its log-probs, both [B, T, k]; the mask holds
        only 0 and 1 and (unless ``allow_empty_mask``) is not all zero; ``teacher_logsumexp``
        only with ``teacher_logits``; ``teacher_token_logprobs`` and ``teacher_logsumexp`` are
        finite; ``student_logits`` and ``teacher_logits`` hold no NaN and no +inf, and every
        row has a finite maximum: -inf is allowed on part of a row (a hard-masked token, which
        the divergences read as probability 0, with 0 log 0 = 0).

        Cost: one reduction pass (a row maximum) over each [B, T, V] tensor, no [B, T, V] copy.
        Under torch.func transforms (vmap, grad) only shapes and dtypes are checked: the value
        checks would be data-dependent control flow.

        Args:
          allow_empty_mask: accept a mask with no 1 (a shard without tokens, summed rather than
            averaged).
          unread: names of [B, T, V] fields (``"teacher_logits"``) whose values the caller will not
            read, so only their shapes are checked (an estimator of teacher signal "sampled").

        Returns:
          The batch itself, so that ``TokenBatch(...).validate()`` can be passed on.
        """
        B, T = self._check_shapes()
        if torch._C._functorch.is_functorch_wrapped_tensor(self.student_logits) or \
                torch._C._functorch.is_functorch_wrapped_tensor(self.tokens):
            return self
        self._check_ids(self.tokens, "token ids")
        for ids in ("teacher_topk_ids", "student_topk_ids"):
            if getattr(self, ids) is not None:
                self._check_ids(getattr(self, ids), ids)
        if not bool(((self.mask == 0) | (self.mask == 1)).all()):
            raise InputError("the response mask must hold only 0 and 1")
        if not allow_empty_mask and not bool(self.mask.any()):
            raise InputError("the response mask is empty: no token contributes to the loss")
        for name in ("teacher_token_logprobs", "teacher_logsumexp"):
            value = getattr(self, name)
            if value is not None and not bool(torch.isfinite(value.detach()).all()):
                raise InputError(f"{name} contains NaN or inf" + (
                    " (-inf: the teacher gives a sampled token probability 0, so the reverse KL is infinite)"
                    if name == "teacher_token_logprobs" else ""))
        for name in ("student_logits", "teacher_logits"):
            value = getattr(self, name)
            if value is not None and name not in unread:
                _check_logits(name, value.detach())
        return self

    def _check_shapes(self) -> tuple:
        """The shape and dtype checks of ``validate``; returns (B, T)."""
        if self.tokens.dim() != 2:
            raise InputError(f"tokens must be [B, T], got shape {tuple(self.tokens.shape)}")
        if self.tokens.dtype != torch.long:
            raise InputError(f"tokens must be a torch.long (int64) tensor of ids, got {self.tokens.dtype}")
        B, T = self.tokens.shape
        if tuple(self.student_logits.shape[:2]) != (B, T) or self.student_logits.dim() != 3:
            raise InputError(
                f"student_logits must be [B, T, V] = [{B}, {T}, V], got {tuple(self.student_logits.shape)}")
        if not self.student_logits.is_floating_point():
            raise InputError(f"student_logits must be a floating-point tensor, got {self.student_logits.dtype}")
        for name in ("mask", "teacher_token_logprobs", "teacher_logsumexp", "kl_to_go"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (B, T):
                raise InputError(f"{name} must be [B, T] = [{B}, {T}], got {tuple(value.shape)}")
        V = self.vocab_size
        if V < 1:
            raise InputError("student_logits has an empty vocabulary axis (V = 0)")
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
            if a is not None and (a.shape != b.shape or tuple(a.shape[:2]) != (B, T) or a.dim() != 3):
                raise InputError(f"{ids} and {vals} must both be [B, T, k], got "
                                 f"{tuple(a.shape)} and {tuple(b.shape)}")
            if a is not None and a.dtype != torch.long:
                raise InputError(f"{ids} must be a torch.long (int64) tensor, got {a.dtype}")
        if self.teacher_logsumexp is not None and self.teacher_logits is None:
            raise InputError("teacher_logsumexp is given without the teacher_logits it normalises")
        return B, T

    def _check_ids(self, ids: torch.Tensor, what: str) -> None:
        """Raise ``InputError`` unless every id lies in [0, V)."""
        if ids.numel():
            low, high = (int(x) for x in torch.aminmax(ids))
            if low < 0 or high >= self.vocab_size:
                raise InputError(f"{what} must lie in [0, {self.vocab_size}), got range [{low}, {high}]")


def _check_logits(name: str, logits: torch.Tensor) -> None:
    """Raise ``InputError`` if a row of ``logits`` [B, T, V] holds a NaN or a +inf or is -inf
    everywhere: its maximum (one reduction pass, NaN propagating) must be finite."""
    row_max = logits.amax(-1)
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise InputError(f"{name} contains NaN or inf at [b, t] = [{b}, {t}]: a NaN, a +inf or a row that is "
                         "-inf everywhere (-inf on part of a row, a masked token, is allowed)")
