"""Real Hugging Face causal LMs as a student/teacher pair: rollouts and scoring.

The pipeline is

    loading.load_pair -> generate_rollouts (student samples) -> score -> TokenBatch

``score`` runs one student forward (with gradient) and one teacher forward (no gradient)
over the rollouts and keeps, at the response positions only, what the requested
estimators need from the teacher (each estimator's ``teacher_signal`` in
``vopd_analysis.estimators``: "sampled", "topk" or "full"; "oracle" ones are tabular only):

* always:  ``teacher_token_logprobs``  log pi_T(y_t | s_t);
* "full":  ``teacher_logits``          [B, T, V] (only if some estimator needs them), and
           ``teacher_logsumexp``       [B, T], a by-product that spares the vOPD baseline a pass;
* "topk":  ``teacher_topk_*`` and ``*_student_topk`` fields for the largest k requested.

Vocabulary. Model output layers are often padded beyond the tokenizer (Qwen2.5-0.5B has
151936 rows, Qwen2.5-7B 152064, both tokenizers 151665 real tokens). Both models'
logits are sliced to the shared real vocabulary ``V``, so pi and pi_T are softmaxes over
the same V tokens, and generation never samples a padded id.

Alignment. With a left-padded prompt of width P, column ``c`` of ``input_ids`` holds token
c and the logits at column c - 1 predict it; positions are ``cumsum(attention_mask) - 1``,
exactly as ``generate`` computes them, so scoring reproduces the sampling distribution.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Iterable, List, Optional, Sequence

import torch

from ..batch import TokenBatch
from ..errors import InputError
from .. import estimators as est

DEFAULT_CHUNK_TOKENS = 1024


# ----------------------------------------------------------------------------- rollouts

@dataclasses.dataclass
class Rollouts:
    """Sampled sequences, one row per rollout; rows [i*K, (i+1)*K) belong to prompt i.

    ``input_ids``/``attention_mask`` [N, L]: left-padded prompt (width ``prompt_width``)
    followed by the response, right-padded after EOS. ``response_mask`` [N, L] is 1 on the
    generated tokens up to and including the first EOS. ``prompt_index`` [N].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_index: torch.Tensor
    prompt_width: int

    @property
    def num_rollouts(self) -> int:
        """N, the number of rows."""
        return self.input_ids.shape[0]

    def select(self, rows) -> "Rollouts":
        """The rollouts in ``rows`` (a list, slice or index tensor), trailing all-padding columns
        dropped (never the prompt's); ``prompt_index`` keeps the original prompt numbers."""
        rows = torch.as_tensor(rows) if not isinstance(rows, slice) else rows
        ids, att, resp = self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows]
        used = att.bool().any(0).nonzero()
        end = int(used.max()) + 1 if used.numel() else ids.shape[1]
        end = max(end, self.prompt_width)
        return Rollouts(ids[:, :end], att[:, :end], resp[:, :end], self.prompt_index[rows], self.prompt_width)

    def responses(self, tokenizer) -> List[str]:
        """The N decoded responses, special tokens (EOS) dropped."""
        out = []
        for ids, m in zip(self.input_ids, self.response_mask):
            out.append(tokenizer.decode(ids[m.bool()], skip_special_tokens=True))
        return out


def response_mask_from_generated(generated: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """m_t = 1[no EOS among generated[:, :t]]: 1 on the generated tokens up to and including the
    first EOS, 0 after it.

    Args:
      generated: [N, T_gen] token ids after the prompt.
      eos_token_ids: the ids that end a response.

    Returns:
      [N, T_gen] long.
    """
    is_eos = torch.isin(generated, torch.as_tensor(list(eos_token_ids), device=generated.device))
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


def _eos_ids(model, tokenizer) -> List[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("neither the model's generation config nor the tokenizer defines an EOS token")
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class _RestrictVocab:
    """Logits processor: forbid ids >= V (padded rows), so samples come from softmax(z[:V])."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids, scores):
        scores[:, self.vocab_size:] = -float("inf")
        return scores


def encode_prompts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int):
    """Tokenize prompts with left padding (the pad token defaults to EOS), checking they fit.

    A prompt fits if its length <= max_position_embeddings - max_new_tokens; one that does
    not, or that encodes to zero tokens, is an ``InputError``.

    Args:
      model: gives ``config.max_position_embeddings`` (if it has one).
      tokenizer: set to left padding.
      prompts: P strings.
      max_new_tokens: the response budget the context must leave.

    Returns:
      (input_ids, attention_mask), each [P, W] long, W the longest prompt.
    """
    if isinstance(prompts, str) or not prompts:
        raise InputError("prompts must be a non-empty list of strings")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        budget = context - max_new_tokens
        lengths = enc["attention_mask"].sum(1)
        too_long = (lengths > budget).nonzero().flatten().tolist()
        if too_long:
            i = too_long[0]
            raise InputError(
                f"{len(too_long)} prompt(s) do not fit the context: prompt {i} has {int(lengths[i])} tokens, "
                f"but max_position_embeddings ({context}) - max_new_tokens ({max_new_tokens}) = {budget}")
    if int(enc["attention_mask"].sum(1).min()) == 0:
        raise InputError("a prompt encodes to zero tokens")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: Sequence[str], num_rollouts: int, max_new_tokens: int,
                      temperature: float = 1.0, top_p: float = 1.0, seed: Optional[int] = None,
                      vocab_size: Optional[int] = None) -> Rollouts:
    """Sample ``num_rollouts`` responses per prompt from ``model``.

    Sampling is from softmax(z[:V] / temperature), nucleus-truncated at ``top_p``; only
    temperature = top_p = 1 is on-policy (the estimators assume samples from pi itself).

    Args:
      model: the sampling (student) model; restored to its training mode afterwards.
      tokenizer: its tokenizer.
      prompts: P prompt strings.
      num_rollouts: K responses per prompt.
      max_new_tokens: the most tokens per response (EOS included).
      temperature, top_p: the sampling distribution (1, 1: on-policy).
      seed: makes the draw reproducible without touching the global RNG state; None: the
        global RNG.
      vocab_size: V; ids >= V (padded output rows) are never sampled. None: no restriction.

    Returns:
      ``Rollouts`` of N = P K rows, rows [iK, (i+1)K) from prompt i.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if num_rollouts < 1 or max_new_tokens < 1:
        raise InputError(f"need num_rollouts >= 1 and max_new_tokens >= 1, got {num_rollouts}, {max_new_tokens}")
    device = next(model.parameters()).device
    ids, att = encode_prompts(model, tokenizer, prompts, max_new_tokens)
    ids, att = ids.repeat_interleave(num_rollouts, 0).to(device), att.repeat_interleave(num_rollouts, 0).to(device)
    eos = _eos_ids(model, tokenizer)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                              max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=eos, repetition_penalty=1.0)
    processors = LogitsProcessorList([_RestrictVocab(vocab_size)] if vocab_size else [])
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        sequences = model.generate(input_ids=ids, attention_mask=att, generation_config=config,
                                   logits_processor=processors)
    model.train(was_training)
    return _assemble(sequences, att, ids.shape[1], eos, num_rollouts)


def _assemble(sequences, prompt_attention, width, eos, num_rollouts) -> Rollouts:
    """Build ``Rollouts`` from generate's output: masks for the prompt and the response up to EOS."""
    response = response_mask_from_generated(sequences[:, width:], eos)
    pad_ids = torch.where(response.bool(), sequences[:, width:], torch.zeros_like(response))
    input_ids = torch.cat([sequences[:, :width], pad_ids], 1)
    attention = torch.cat([prompt_attention, response], 1)
    response_mask = torch.cat([torch.zeros_like(prompt_attention), response], 1)
    prompt_index = torch.arange(sequences.shape[0], device=sequences.device) // num_rollouts
    return Rollouts(input_ids, attention, response_mask, prompt_index, width)


# ----------------------------------------------------------------------------- scoring

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
    real = torch.float64 if teacher_rows.dtype == torch.float64 else torch.float32
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


# ----------------------------------------------------------------------------- what the distributions look like

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
        sums["reverse_kl"] += float((q * (logq - logp)).sum(-1).double().sum())
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
    from .. import divergences as dv
    bins = [{"low": lo, "high": hi, "states": 0, "opd": 0.0, "vopd": 0.0, "bstar": 0.0}
            for lo, hi in zip(edges[:-1], edges[1:])]
    bounds = torch.tensor(list(edges[1:-1]), dtype=torch.float64)
    rows = max(1, min(chunk_tokens, (1 << 24) // teacher_logits.shape[-1]))      # float32 chunks of 64 MiB
    real = torch.promote_types(teacher_logits.dtype, torch.float32)
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


# ----------------------------------------------------------------------------- tiny random models (tests, demos)
# Built by ``vopd_analysis.lm.tiny`` (tiny imports nothing from this module, so the lazy imports
# below make no cycle); what is here is only the smoke preset: grouped-query attention (4 heads,
# 2 key/value heads), an MLP twice the hidden width, untied output layer, char tokenizer.

SMOKE_CHARS = "0123456789+= abcdefghijklmnopqrstuvwxyz"   # the smoke tokenizer: 3 specials + 39 chars = 42 ids


def _smoke_preset(hidden_size: int, num_layers: int, max_position_embeddings: int) -> tuple:
    """(ModelSize, qwen2_config arguments) of the smoke preset."""
    from .tiny import ModelSize
    size = ModelSize(hidden=hidden_size, layers=num_layers, heads=4, intermediate=2 * hidden_size)
    return size, {"max_positions": max_position_embeddings, "kv_heads": 2, "tie_word_embeddings": False}


def tiny_qwen2(tokenizer, seed: int = 0, vocab_size: Optional[int] = None, hidden_size: int = 32,
               num_layers: int = 2, max_position_embeddings: int = 64):
    """A randomly initialised smoke-preset ``Qwen2ForCausalLM`` of a few thousand parameters (``tiny.random_model``).

    Args:
      tokenizer: gives the vocabulary and the pad/EOS ids (e.g. ``tasks.build_tokenizer(SMOKE_CHARS)``);
        None: no pad/EOS id, ``vocab_size`` required.
      seed: the initialisation seed.
      vocab_size: output rows, if not ``len(tokenizer)``.
      hidden_size, num_layers, max_position_embeddings: the model's size.

    Returns:
      The model, float32, in eval mode.
    """
    from .tiny import random_model
    size, config = _smoke_preset(hidden_size, num_layers, max_position_embeddings)
    return random_model(size, tokenizer, seed, **{**config, "vocab_size": vocab_size})


def save_tiny_pair(directory, student_vocab: int = 0, teacher_vocab: int = 0, seed: int = 0, hidden_size: int = 32,
                   num_layers: int = 2, max_position_embeddings: int = 64):
    """Save a random smoke-preset student/teacher pair with the ``SMOKE_CHARS`` tokenizer (``tiny.save_random_pair``).

    Args:
      directory: written to: ``student/`` and ``teacher/``.
      student_vocab, teacher_vocab: output rows; 0: the tokenizer's 42 (pass larger ones to test padded rows).
      seed: the student's seed; the teacher's is ``seed + 1``.
      hidden_size, num_layers, max_position_embeddings: both models' size.

    Returns:
      (student_path, teacher_path).
    """
    from .tiny import save_random_pair
    size, config = _smoke_preset(hidden_size, num_layers, max_position_embeddings)
    return save_random_pair(directory, seed, size, size, SMOKE_CHARS, student_vocab or None, teacher_vocab or None,
                            **config)
