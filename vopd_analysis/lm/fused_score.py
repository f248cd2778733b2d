"""Scoring rollouts without materialising logits: final hidden states and ``lm_head`` into ``fused``.

``scoring.score`` builds [B, T, V] student and teacher logits (3 x B T V x 4 bytes with the student's
gradient: 15 GB at 8,192 tokens and V = 151,936). Here each model runs its backbone only,
``response_hidden`` gathers the hidden state h(s_t) before each response token (the row whose
logits ``scoring.response_logits`` would return), ``output_head`` reads the head the model applies
to it (weight, bias, logit scale, final soft-capping), and ``vopd_analysis.fused`` computes the
estimator tile by tile: the logits z = c tanh(s (h W^T + b) / c) exist only as tiles.

The fused scorer fills the same per-token record as the materialised one (``token_stats.TokenStats``,
``stats_from_hidden``), and the registry's estimator reads it (``fused_per_sequence``): every estimator
that reads only the record (``Estimator.reads_stats``: the composed ones, full_kl and the top-k losses)
has a fused form, with no code here that names it.

Which path (``choose``): "materialised" is ``scoring.score``; "fused" is this module (for the
estimators of ``fused_names()``); "auto" takes the fused path when the estimator has
one and the batch has N x V >= ``AUTO_MIN_ELEMENTS`` (one float32 [N, V] tensor of 256 MiB or
more), the materialised one otherwise (it is faster when the logits are small).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Optional, Sequence

import torch

from .. import estimators as est
from .. import fused
from ..errors import InputError
from ..token_stats import Needs, TokenStats, check_k
from . import rollouts as ro
from . import scoring as sc

PATHS = ("auto", "materialised", "fused")
AUTO_MIN_ELEMENTS = 2 ** 26


def has_fused_form(estimator: str) -> bool:
    """Whether the fused scorer can fill what the estimator reads (``Estimator.reads_stats``)."""
    return estimator in est.REGISTRY and est.REGISTRY[estimator].reads_stats


def fused_names() -> list:
    """The registry's estimators with a fused form, in registry order."""
    return [name for name in est.REGISTRY if has_fused_form(name)]


def choose(path: str, estimator: str, num_tokens: int, vocab_size: int) -> bool:
    """Whether to score with the fused path.

    Args:
      path: "auto", "materialised" or "fused" (an estimator without a fused form is an ``InputError``).
      estimator: the registry name.
      num_tokens, vocab_size: N (response positions of the batch) and V.
    """
    if path not in PATHS:
        raise InputError(f"--logits must be one of {', '.join(PATHS)}, got '{path}'")
    has_fused = has_fused_form(estimator)
    if path == "fused" and not has_fused:
        raise InputError(f"--logits fused: estimator '{estimator}' has no fused form; fused estimators: "
                         f"{', '.join(fused_names())}")
    return path == "fused" or (path == "auto" and has_fused and num_tokens * vocab_size >= AUTO_MIN_ELEMENTS)


@dataclasses.dataclass
class Head:
    """What a causal LM applies to its last hidden state: z = c tanh(s (h W^T + b) / c)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float
    softcap: Optional[float]


def output_head(model) -> Head:
    """The model's output layer and logit post-processing, read from its config as transformers'
    models apply it: ``logit_scale`` (Cohere), else ``output_multiplier``, else ``lm_head_multiplier``
    (Falcon-H1), else 1 / ``logits_scaling`` (Granite; HyperCLOVA X multiplies by it); and
    ``final_logit_softcapping`` (Gemma 2). A model whose forward does anything else to its logits
    is not covered: ``tests/test_fused_score.py`` checks ``h W^T`` against the model's logits."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise InputError(f"{type(model).__name__} has no output embedding (lm_head) to fuse")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if scale is None and getattr(config, name, None) is not None:
            scale = float(getattr(config, name))
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = float(config.logits_scaling) if config.model_type == "hyperclovax" else 1.0 / config.logits_scaling
    return Head(head.weight, getattr(head, "bias", None), 1.0 if scale is None else scale,
                getattr(config, "final_logit_softcapping", None))


def response_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cols: torch.Tensor,
                    first_column: int) -> torch.Tensor:
    """The final hidden states h(s_t) [B, T, d] whose logits ``scoring.response_logits`` returns: the
    backbone (``model.base_model``) with the same position ids, at columns cols[b, t] - 1.

    Args:
      model: a causal LM; input_ids, attention_mask: [B, L]; cols: [B, T] (``scoring.response_index``);
      first_column: the first column kept (only the rows from it on are gathered).
    """
    backbone = model.base_model
    if backbone is model:
        raise InputError(f"{type(model).__name__} exposes no backbone (base_model) to take hidden states from")
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if "use_cache" not in inspect.signature(backbone.forward).parameters:
        kwargs.pop("use_cache")
    hidden = backbone(**kwargs).last_hidden_state
    rows = torch.arange(cols.shape[0], device=cols.device).unsqueeze(1)
    return hidden[rows, cols - 1]


@dataclasses.dataclass
class HiddenBatch:
    """What the fused estimators read of one batch of rollouts: both models' final hidden states at
    the response positions [B, T, d], their heads, the tokens and mask [B, T] and the shared V."""

    student_hidden: torch.Tensor
    teacher_hidden: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    student_head: Head
    teacher_head: Head
    vocab_size: int

    def rows(self, index) -> "HiddenBatch":
        """The sequences ``index`` (a slice), sharing the graph of the hidden states."""
        return dataclasses.replace(self, student_hidden=self.student_hidden[index],
                                   teacher_hidden=self.teacher_hidden[index], tokens=self.tokens[index],
                                   mask=self.mask[index])


def hidden_batch(student, teacher, rollouts: ro.Rollouts, vocab_size: Optional[int] = None,
                 mask_token_ids: Sequence[int] = (), teacher_hidden: Callable = response_hidden) -> HiddenBatch:
    """``scoring.score``'s positions, tokens and mask, with hidden states instead of logits; the student's
    backbone runs with its gradient, the teacher's without.

    Args:
      student, teacher: causal LMs; rollouts: from ``rollouts.generate_rollouts``.
      vocab_size: the shared V (None: the student head's rows, which the teacher's must match).
      mask_token_ids: tokens left out of the loss.
      teacher_hidden: how the teacher's hidden states are computed (``response_hidden``'s
        signature; the TRL engine routes it through the teacher's distributed wrapper).
    """
    cols, valid = sc.response_index(rollouts.response_mask)
    first = int(cols.min()) - 1
    if first < 0:
        raise InputError("a response starts at column 0: every rollout needs at least one prompt token")
    ids, att = rollouts.input_ids, rollouts.attention_mask
    rows = torch.arange(cols.shape[0], device=cols.device).unsqueeze(1)
    tokens = torch.where(valid, ids[rows, cols], torch.zeros_like(cols))
    mask = (valid & ~torch.isin(tokens, torch.as_tensor(list(mask_token_ids), dtype=tokens.dtype,
                                                         device=tokens.device))).long()
    s_head, t_head = output_head(student), output_head(teacher)
    V = vocab_size or s_head.weight.shape[0]
    if int(tokens.max()) >= V:
        raise InputError(f"a response contains token id {int(tokens.max())} outside the shared vocabulary [0, {V}); "
                         f"generate with vocab_size={V} so padded ids are never sampled")
    h = response_hidden(student, ids, att, cols, first)
    with torch.no_grad():
        h_t = teacher_hidden(teacher, ids, att, cols, first)
    return HiddenBatch(h, h_t, tokens, mask, s_head, t_head, V)


def values(hb: HiddenBatch, estimator: str, params: Optional[dict] = None) -> tuple:
    """(per-sequence surrogate values [B], ``token_stats.TokenStats``) of ``estimator`` on ``hb``."""
    s, t = hb.student_head, hb.teacher_head
    return fused_per_sequence(
        estimator, hb.student_hidden, s.weight, hb.tokens, hb.mask, hb.teacher_hidden, t.weight,
        student_bias=s.bias, teacher_bias=t.bias, student_logit_scale=s.scale, teacher_logit_scale=t.scale,
        student_softcap=s.softcap, teacher_softcap=t.softcap, vocab_size=hb.vocab_size, return_stats=True,
        **(params or {}))


@dataclasses.dataclass
class FusedScore:
    """The fused path's result for one batch of rollouts: per-sequence surrogate values [B] (the
    gradient of their reduction is the estimator's), and what the metrics read."""

    values: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    stats: TokenStats

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    def loss(self, reduction: str, num_items_in_batch: Optional[float] = None) -> torch.Tensor:
        """``estimators.reduce`` of the values."""
        return est.reduce(self.values, self.mask, reduction, num_items_in_batch)

    def sampled_reverse_kl(self) -> torch.Tensor:
        """sum_t m_t (log pi(y_t) - log pi_T(y_t)) per sequence [B], detached."""
        m = self.mask.to(self.stats.student_logprobs.dtype)
        return ((self.stats.student_logprobs - self.stats.teacher_token_logprobs).detach() * m).sum(-1)

    def sequence_reverse_kl(self) -> Optional[torch.Tensor]:
        """sum_t m_t KL(pi || pi_T)(s_t) per sequence [B], detached."""
        return (self.stats.kl.detach() * self.mask.to(self.stats.kl.dtype)).sum(-1)


def score(student, teacher, rollouts: ro.Rollouts, estimator: str, params: Optional[dict] = None,
          vocab_size: Optional[int] = None, mask_token_ids: Sequence[int] = (),
          teacher_hidden: Callable = response_hidden) -> FusedScore:
    """``scoring.score`` + ``estimators.per_sequence`` for one fused estimator, without [B, T, V] logits
    (``hidden_batch``, then ``values``). Values equal the materialised path's to rounding
    (``tests/test_fused_score.py``: float64 1e-10 on the tiny pair)."""
    hb = hidden_batch(student, teacher, rollouts, vocab_size, mask_token_ids, teacher_hidden)
    vals, stats = values(hb, estimator, params)
    return FusedScore(vals, hb.tokens, hb.mask, stats)


def loss_of(scored, estimator: str, reduction: str, num_items_in_batch: Optional[float], params: dict):
    """The loss of a ``FusedScore`` or of a ``TokenBatch`` (``estimators.surrogate_loss``, batch validated upstream)."""
    if isinstance(scored, FusedScore):
        return scored.loss(reduction, num_items_in_batch)
    return est.surrogate_loss(estimator, scored, reduction=reduction, num_items_in_batch=num_items_in_batch,
                              validate=False, **params)


def planned_tokens(rollouts: ro.Rollouts, max_new_tokens: Optional[int] = None) -> int:
    """N = rollouts x the response budget (``max_new_tokens``; None: the generated width): the positions
    the materialised logits hold when no response ends early. The "auto" choice reads this, not the
    longest response, so a batch whose responses all end early takes the same path as a full one."""
    budget = max_new_tokens if max_new_tokens is not None else rollouts.input_ids.shape[1] - rollouts.prompt_width
    return rollouts.num_rollouts * int(budget)


def score_either(path: str, student, teacher, rollouts: ro.Rollouts, estimator: str, params: dict,
                 vocab_size: int, teacher_hidden: Callable = response_hidden, max_new_tokens: Optional[int] = None):
    """A ``FusedScore`` or ``scoring.score``'s ``TokenBatch``, as ``choose(path, ...)`` says for this batch
    (N = ``planned_tokens(rollouts, max_new_tokens)``)."""
    if choose(path, estimator, planned_tokens(rollouts, max_new_tokens), vocab_size):
        return score(student, teacher, rollouts, estimator, params, vocab_size, teacher_hidden=teacher_hidden)
    return sc.score(student, teacher, rollouts, [estimator], vocab_size=vocab_size, params={estimator: params})


# ----------------------------------------------------------------------------- hidden states -> record -> registry

def stats_from_hidden(needs: Needs, tokens: torch.Tensor, mask: torch.Tensor, kernel: "fused.FusedTokenStats",
                      teacher_token_logprobs: Optional[torch.Tensor] = None) -> TokenStats:
    """The fused scorer's ``TokenStats``: the kernel's per-token outputs (``fused.fused_token_stats``, run
    with ``needs``' b* and support) named as the record names them. On the support,
    log q_S = z_S - lse with lse's gradient for ``needs.topk_grad`` "full", z_S - sg(lse) for
    "renormalised" (exact for shift-invariant functions, no backward pass over V), detached for "".

    Args:
      needs: what the estimator reads; tokens, mask: [B, T]; kernel: the pass's outputs.
      teacher_token_logprobs: log pi_T(y_t) [B, T], used instead of the kernel's when given.
    """
    lp = kernel.student_logprobs
    t_lp = kernel.teacher_logprobs if teacher_token_logprobs is None else teacher_token_logprobs.detach().to(lp.dtype)
    q_s = None
    if needs.topk is not None:
        lse = kernel.student_logsumexp.unsqueeze(-1)
        q_s = kernel.student_topk_logits - (lse if needs.topk_grad == "full" else lse.detach())
        q_s = q_s if needs.topk_grad else q_s.detach()
    return TokenStats(tokens, mask, lp, t_lp, kernel.kl, kernel.bstar, kernel.topk_ids, q_s,
                      kernel.teacher_topk_logprobs)


def fused_per_sequence(name: str, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                       tokens: torch.Tensor, mask: torch.Tensor,
                       teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                       *, teacher_token_logprobs: Optional[torch.Tensor] = None,
                       student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                       student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                       student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                       vocab_size: Optional[int] = None, token_chunk: Optional[int] = None,
                       vocab_chunk: Optional[int] = None, return_stats: bool = False, **params):
    """Per-sequence surrogate values [B] of a registry estimator with a fused form, from hidden states:
    ``fused.fused_token_stats`` computes what the estimator's ``needs`` ask for (lp, lp_T, KL, b*,
    the top-k support; z = c tanh(s (h W^T + b) / c) only as tiles), ``stats_from_hidden`` fills the
    record and the registry's ``from_stats`` reads it: the same values (to rounding) and gradients
    as ``estimators.per_sequence(name, batch)`` on the batch of the materialised logits. The top-k
    support is found in the fused pass (``fused``'s docstring, "Top-k supports"); tied logits are
    broken as torch.topk breaks them.

    Args:
      name: one of ``fused_names()``.
      student_hidden: [B, T, d_s]; student_weight: [V, d_s]; tokens, mask: [B, T].
      teacher_hidden, teacher_weight: [B, T, d_T], [V, d_T]; an estimator that reads only lp and
        lp_T (opd) runs without them, from ``teacher_token_logprobs`` [B, T] (one student-only pass).
      teacher_token_logprobs: log pi_T(y_t) [B, T], used instead of the fused teacher's when given.
      student_bias, ..., vocab_chunk: as ``fused.fused_token_stats``.
      return_stats: also return the pass's ``TokenStats`` (lp, lp_T, KL, ... per token, for metrics).
      **params: the estimator's parameters (registry defaults, e.g. the top-k size ``k``, with the
        registry's error for k > V; ``rho`` < 1 is refused).
    Returns:
      [B] surrogate values; the gradient of their sum is the estimator's gradient. With
      ``return_stats``: (values, stats).
    """
    if not has_fused_form(name):
        raise InputError(f"the fused path has estimators {', '.join(fused_names())}; got '{name}'")
    entry = est.get(name)
    params = entry.params(**params)
    if params.pop("rho", 1.0) != 1.0:
        raise InputError("the fused path has no token selection (rho < 1): it needs every position's entropy")
    if tokens.dim() != 2 or tuple(mask.shape) != tuple(tokens.shape):
        raise InputError(f"tokens and mask must both be [B, T], got {tuple(tokens.shape)} and {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("the response mask must hold only 0 and 1")
    needs = entry.needs(params)
    student_only = needs == Needs(logprobs=True)
    if teacher_hidden is None and not (student_only and teacher_token_logprobs is not None):
        raise InputError(f"fused '{name}' needs the teacher's hidden states and lm_head weight"
                         + ("" if not student_only else " (or teacher_token_logprobs)"))
    if needs.topk is not None:
        vocab = student_weight.shape[0] if vocab_size is None else min(vocab_size, student_weight.shape[0])
        check_k(needs.topk, vocab, name)
    kernel = fused.fused_token_stats(student_hidden, student_weight, tokens, teacher_hidden, teacher_weight, mask=mask,
                                     student_bias=student_bias, teacher_bias=teacher_bias,
                                     student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                                     student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                                     vocab_size=vocab_size, want_bstar=needs.bstar, topk=needs.topk,
                                     topk_support=needs.topk_of, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    stats = stats_from_hidden(needs, tokens, mask, kernel, teacher_token_logprobs)
    values = entry.from_stats(stats, **params)
    return (values, stats) if return_stats else values


def fused_surrogate_loss(name: str, *args, reduction: str = "sequence_mean",
                         num_items_in_batch: Optional[float] = None, **kwargs) -> torch.Tensor:
    """The loss to call ``.backward()`` on, with ``estimators.surrogate_loss``'s reductions
    (``sequence_mean``, ``token_mean``, ``sum``, ``none``) over ``fused_per_sequence``'s values.

    Args:
      name, *args, **kwargs: as ``fused_per_sequence`` (mask is its fifth argument).
      reduction, num_items_in_batch: as ``estimators.surrogate_loss``.
    """
    if reduction not in est.REDUCTIONS:      # before the pass over the vocabulary
        raise InputError(f"unknown reduction '{reduction}'; choose one of {est.REDUCTIONS}")
    values = fused_per_sequence(name, *args, **kwargs)
    mask = args[3] if len(args) > 3 else kwargs["mask"]
    return est.reduce(values, mask, reduction, num_items_in_batch)
