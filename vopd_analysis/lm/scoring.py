"""Scoring rollouts with a student/teacher pair into the ``TokenBatch`` the estimators read.

    rollouts.generate_rollouts -> score (student with gradient, teacher without) -> TokenBatch

``score`` runs one student forward (with gradient) and one teacher forward (no gradient)
over the rollouts and keeps, at the response positions only, what the requested
estimators need from the teacher (each estimator's ``teacher_signal`` in
``vopd_analysis.estimators``: "sampled", "topk" or "full"; "oracle" ones are tabular only):

* always:  ``teacher_token_logprobs``  log pi_T(y_t | s_t);
* "full":  ``teacher_logits``          [B, T, V] (only if some estimator needs them), and
           ``teacher_logsumexp``       [B, T], a by-product that spares the vOPD baseline a pass;
* "topk":  ``teacher_topk_*`` and ``*_student_topk`` fields for the largest k requested.

Vocabulary. Both models' logits are sliced to the shared real vocabulary ``V`` (output layers
are often padded beyond the tokenizer), so pi and pi_T are softmaxes over the same V tokens.

Alignment. With a left-padded prompt of width P, column ``c`` of ``input_ids`` holds token
c and the logits at column c - 1 predict it; positions are ``cumsum(attention_mask) - 1``,
exactly as ``generate`` computes them, so scoring reproduces the sampling distribution.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Optional, Sequence

import torch

from .. import divergences as dv
from .. import estimators as est
from ..batch import TokenBatch
from ..errors import InputError
from .rollouts import Rollouts

DEFAULT_CHUNK_TOKENS = 1024


def needed_signals(estimator_names: Iterable[str], params: Optional[dict] = None):
    """What the teacher must provide for these estimators.

    Args:
      estimator_names: registry names.
      params: estimator name -> parameter overrides (the top-k size k).

    Returns:
      (keep_full, k): whether some estimator needs the full teacher logits, and the largest
      top-k requested (0 if none). An estimator that needs tabular oracle fields is an ``InputError``.
    """
    params = params or {}
    keep_full, k = False, 0
    for name in estimator_names:
        spec = est.get(name)
        if spec.teacher_signal == "full":
            keep_full = True
        elif spec.teacher_signal == "topk":
            k = max(k, int(spec.params(**params.get(name, {}))["k"]))
        elif spec.teacher_signal == "oracle":
            raise InputError(f"estimator '{name}' needs exact tabular quantities; it cannot run on real models")
    return keep_full, k


def response_index(response_mask: torch.Tensor):
    """The columns of each row's response, which occupies columns start_b .. start_b + len_b - 1
    (contiguous).

    Args:
      response_mask: [B, L], 1 on the response tokens; every row needs one (else ``InputError``).

    Returns:
      (cols, valid), each [B, T], T = max_b len_b: cols[b, t] = start_b + t where
      valid[b, t] = t < len_b, and start_b (a response column) elsewhere.
    """
    lengths = response_mask.sum(1)
    if int(lengths.min()) == 0:
        raise InputError("a rollout has an empty response (no generated token to score)")
    starts = response_mask.float().argmax(1)
    T = int(lengths.max())
    offsets = torch.arange(T, device=response_mask.device)
    valid = offsets.unsqueeze(0) < lengths.unsqueeze(1)
    cols = torch.where(valid, starts.unsqueeze(1) + offsets, starts.unsqueeze(1))
    return cols, valid


def forward_logits(model, input_ids, attention_mask, first_column: int) -> torch.Tensor:
    """The model's logits at columns first_column .. L-1, positions ``cumsum(attention_mask) - 1``
    (as ``generate`` computes them).

    Args:
      model: a causal LM.
      input_ids: [B, L] long.
      attention_mask: [B, L], 0 on padding.
      first_column: the first column whose logits are kept (earlier ones are not computed
        when the model accepts ``logits_to_keep``).

    Returns:
      [B, L - first_column, V_out] logits, V_out the model's output rows.
    """
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    keep = input_ids.shape[1] - first_column
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(**kwargs, logits_to_keep=keep).logits
    return model(**kwargs).logits[:, first_column:]


def response_logits(model, input_ids, attention_mask, cols: torch.Tensor, first_column: int,
                    vocab_size: Optional[int] = None, role: str = "student") -> torch.Tensor:
    """The logits z(s_t)[:V] of the state before each response token: row b, position t holds
    the logits at column cols[b, t] - 1, which predict the token at column cols[b, t].

    Args:
      model: a causal LM.
      input_ids: [B, L] long.
      attention_mask: [B, L].
      cols: [B, T] long, the response columns (``response_index``).
      first_column: a column <= min(cols) - 1; logits before it are not computed.
      vocab_size: V, the logits are sliced to [..., :V]; None: the model's output width.
      role: names the model in the error raised when V exceeds its output width.

    Returns:
      [B, T, V] logits (with the model's gradient, if enabled).
    """
    logits = forward_logits(model, input_ids, attention_mask, first_column)
    V = _shared_vocab(logits.shape[-1], vocab_size, role)
    rows = torch.arange(cols.shape[0], device=cols.device).unsqueeze(1)
    return logits[rows, cols - 1 - first_column, :V]


@torch.no_grad()
def teacher_signals(teacher_rows: torch.Tensor, tokens: torch.Tensor, student_rows: torch.Tensor, k: int,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict:
    """The teacher fields of a ``TokenBatch``, chunked over tokens in float32 (float64 for float64
    logits): per chunk
    log pi_T = log_softmax(z_T), and from it

        teacher_token_logprobs = log pi_T(y),   teacher_logsumexp = z_T[0] - log pi_T(0),
        teacher_topk_*         = the teacher's top-k ids and their log pi_T,
        student_topk_ids, teacher_logprobs_on_student_topk = the student's top-k ids and log pi_T there.

    Peak extra memory is O(chunk_tokens * V), never O(M * V) float32.

    Args:
      teacher_rows: [M, V] teacher logits (already sliced to V).
      tokens: [M] long, the sampled tokens y.
      student_rows: [M, V] student logits (read only for the top-k ids).
      k: top-k size; 0: no top-k fields.
      chunk_tokens: rows per chunk.

    Returns:
      Field name -> tensor: [M] float32 (float64) for the first two, [M, k] for the top-k fields.
    """
    M = tokens.shape[0]
    real = dv.compute_dtype(teacher_rows)
    out = {name: torch.empty(M, dtype=real, device=tokens.device)
           for name in ("teacher_token_logprobs", "teacher_logsumexp")}
    if k:
        for name, dtype in (("teacher_topk_ids", torch.long), ("teacher_topk_logprobs", real),
                            ("student_topk_ids", torch.long), ("teacher_logprobs_on_student_topk", real)):
            out[name] = torch.empty(M, k, dtype=dtype, device=tokens.device)
    for a in range(0, M, chunk_tokens):
        b = min(a + chunk_tokens, M)
        logp = torch.log_softmax(teacher_rows[a:b].to(real), dim=-1)
        out["teacher_token_logprobs"][a:b] = logp.gather(-1, tokens[a:b, None]).squeeze(-1)
        out["teacher_logsumexp"][a:b] = teacher_rows[a:b, 0].to(real) - logp[:, 0]     # z_0 - log p_0
        if k:
            top = torch.topk(logp, k, dim=-1)
            out["teacher_topk_ids"][a:b], out["teacher_topk_logprobs"][a:b] = top.indices, top.values
            s_ids = torch.topk(student_rows[a:b], k, dim=-1).indices
            out["student_topk_ids"][a:b] = s_ids
            out["teacher_logprobs_on_student_topk"][a:b] = logp.gather(-1, s_ids)
    return out


def score(student, teacher, rollouts: Rollouts, estimator_names: Sequence[str], vocab_size: Optional[int] = None,
          mask_token_ids: Sequence[int] = (), chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
          params: Optional[dict] = None) -> TokenBatch:
    """Score the rollouts with both models and build the ``TokenBatch`` the estimators need.

    Position t of the batch is response token y_t with state s_t = everything before it:
    ``student_logits[b, t] = z_theta(s_t)[:V]`` (with gradient, ``response_logits``),
    ``tokens[b, t] = y_t``, ``teacher_token_logprobs[b, t] = log pi_T(y_t | s_t)``; the other
    teacher fields only as ``needed_signals(estimator_names, params)`` asks.

    Args:
      student, teacher: causal LMs (the teacher is run without gradient).
      rollouts: N rollouts (``generate_rollouts``).
      estimator_names: the estimators the batch is for.
      vocab_size: the shared real vocabulary V (``check_compatible``); None: the logits'
        width, which must then be the same for both models.
      mask_token_ids: tokens left out of the loss (mask 0).
      chunk_tokens: tokens per float32 chunk of the teacher's log-softmax.
      params: estimator name -> parameter overrides (used for the top-k size).

    Returns:
      A validated ``TokenBatch`` of B = N sequences and T = the longest response
      (``tokens``/``mask`` [B, T], ``student_logits`` [B, T, V], ...).
    """
    keep_full, k = needed_signals(estimator_names, params)
    cols, valid = response_index(rollouts.response_mask)
    first = int(cols.min()) - 1
    if first < 0:
        raise InputError("a response starts at column 0: every rollout needs at least one prompt token")
    ids, att = rollouts.input_ids, rollouts.attention_mask
    student_logits = response_logits(student, ids, att, cols, first, vocab_size)
    V = student_logits.shape[-1]
    if k > V:
        raise InputError(f"top-k size k={k} is larger than the vocabulary V={V}")
    with torch.no_grad():
        teacher_logits = response_logits(teacher, ids, att, cols, first, vocab_size, role="teacher")
        if teacher_logits.shape[-1] != V:    # vocab_size None and the output widths differ
            raise InputError(f"student and teacher logits have different widths ({V} vs {teacher_logits.shape[-1]}); "
                             "pass vocab_size=check_compatible(...).vocab_size")
    rows = torch.arange(cols.shape[0], device=cols.device).unsqueeze(1)
    tokens = torch.where(valid, ids[rows, cols], torch.zeros_like(cols))
    if int(tokens.max()) >= V:
        raise InputError(f"a response contains token id {int(tokens.max())} outside the shared vocabulary "
                         f"[0, {V}); generate with vocab_size={V} so padded ids are never sampled")
    mask = valid & ~torch.isin(tokens, torch.as_tensor(list(mask_token_ids), dtype=tokens.dtype, device=tokens.device))
    sig = teacher_signals(teacher_logits.reshape(-1, V), tokens.reshape(-1), student_logits.detach().reshape(-1, V),
                          k, chunk_tokens)
    B, T = tokens.shape
    fields = {name: value.reshape(B, T, *value.shape[1:]) for name, value in sig.items()}
    if keep_full:
        fields["teacher_logits"] = teacher_logits
    else:
        del fields["teacher_logsumexp"]
    return TokenBatch(tokens=tokens, mask=mask.long(), student_logits=student_logits, **fields).validate()


def _shared_vocab(width: int, vocab_size: Optional[int], role: str = "student") -> int:
    """V: ``vocab_size`` if given (an ``InputError`` if it exceeds ``width``), else the logits' width."""
    if vocab_size is None:
        return width
    if vocab_size > width:
        raise InputError(f"vocab_size {vocab_size} exceeds the {role} model's {width} output logits; "
                         "use check_compatible(...).vocab_size")
    return vocab_size
