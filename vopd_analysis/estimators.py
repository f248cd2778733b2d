"""The estimator registry: every OPD gradient estimator as a surrogate loss.

Notation (DESIGN.md section 1): student pi = softmax(z), teacher pi_T, sampled
token y_t at state s_t, mask m_t, "sg" = stop-gradient (detach),

    l_t    = log pi(y_t|s_t) - log pi_T(y_t|s_t)          (reward r_t = -l_t)
    KL_t   = sum_v pi(v|s_t) [log pi(v|s_t) - log pi_T(v|s_t)]
    S_t    = grad log pi(y_t|s_t)                          (the score)
    G_t^g  = sum_{t' >= t} g^(t'-t) m_t' l_t'               (reward-to-go)

Every estimator is a pure function ``fn(batch, **params) -> Tensor[B]`` returning
one surrogate value per sequence, summed over its tokens; the gradient of that
value is the estimator's single-sequence gradient. ``surrogate_loss`` reduces
the per-sequence values (mean over sequences by default). Sign conventions,
normalisation and surrogates live here and nowhere else.

Targets (``Estimator.target``):
* ``token``    g_tok = E[sum_t grad KL_t(s_t)], state distribution held fixed;
* ``sequence`` grad J, J = E[sum_t l_t] the sequence-level reverse KL;
* ``zero``     the expectation is the zero vector (k1 used as a loss);
* ``forward_token`` E[sum_t grad KL(pi_T || pi)(s_t)], states fixed (k3 as a loss);
* ``scaled_sequence`` (K-1)/K grad J (group-mean baseline, GRPO without std);
* ``none``     a different objective or a biased estimate of any of these.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import torch

from .batch import TokenBatch
from .errors import InputError
from . import divergences as dv


# ----------------------------------------------------------------------------- per-token pieces

def student_token_logprobs(batch: TokenBatch) -> torch.Tensor:
    """log pi(y_t|s_t), carrying the gradient. [B, T]"""
    return dv.token_logprobs(batch.student_logits, batch.tokens)


def log_ratio(batch: TokenBatch, student_logprobs: torch.Tensor) -> torch.Tensor:
    """l_t = log pi(y_t) - log pi_T(y_t), detached, zero where masked. [B, T]"""
    l = student_logprobs.detach() - batch.teacher_token_logprobs.to(student_logprobs.dtype)
    return torch.where(batch.mask.bool(), l, torch.zeros_like(l))


def _require_teacher_logits(batch: TokenBatch, name: str) -> torch.Tensor:
    if batch.teacher_logits is None:
        raise InputError(f"estimator '{name}' needs the full teacher logits, but the batch has none "
                         "(score the teacher with keep='full')")
    return batch.teacher_logits


def logprobs_and_reverse_kl_baseline(batch: TokenBatch, name: str = "vopd") -> tuple:
    """(log pi(y_t|s_t) with its gradient, KL_t(s_t) detached): the vOPD baseline, computed in
    the same chunked pass over the student logits as the sampled log-prob. [B, T] each"""
    return dv.token_logprobs_and_reverse_kl(batch.student_logits, batch.tokens,
                                            _require_teacher_logits(batch, name), batch.teacher_logsumexp)


def _check_k(k: int, vocab: int, name: str) -> int:
    if not isinstance(k, (int,)) or isinstance(k, bool):
        raise InputError(f"{name}: k must be an integer, got {k!r}")
    if k < 1 or k > vocab:
        raise InputError(f"{name}: k must satisfy 1 <= k <= V = {vocab}, got k={k}")
    return k


def topk_reverse_kl_baseline(batch: TokenBatch, k: int, student_lse=None) -> torch.Tensor:
    """KL on the student's top-k set S_k, both distributions renormalised on S_k (detached). [B, T]

    b_k(s) = sum_{v in S_k} q~_v (log q~_v - log p~_v), q~ = q / q(S_k), p~ = p / p(S_k),
    as in the vOPD authors' trainer. It depends on s_t only, so any k keeps the
    estimator unbiased.
    """
    _check_k(k, batch.vocab_size, "vopd_topk")
    with torch.no_grad():
        z = batch.student_logits.detach()
        if batch.teacher_logits is not None:
            ids = torch.topk(z, k, dim=-1).indices
            teacher_lp = dv.logprobs_at(batch.teacher_logits.detach(), ids)
        elif batch.student_topk_ids is not None and batch.student_topk_ids.shape[-1] >= k:
            ids = batch.student_topk_ids[..., :k]
            teacher_lp = batch.teacher_logprobs_on_student_topk[..., :k].to(dv.compute_dtype(z))
        else:
            raise InputError(f"estimator 'vopd_topk' (k={k}) needs the teacher's log-probs on the student's "
                             "top-k tokens (or full teacher logits), but the batch has neither")
        student_lp = dv.logprobs_at(z, ids, student_lse)
        return dv.renormalised_reverse_kl(student_lp, teacher_lp)


def teacher_topk(batch: TokenBatch, k: int):
    """(ids, full-vocabulary teacher log-probs) of the teacher's top-k tokens. [B, T, k] each"""
    _check_k(k, batch.vocab_size, "topk_kl")
    if batch.teacher_logits is not None:
        t = batch.teacher_logits.detach()
        ids = torch.topk(t, k, dim=-1).indices
        return ids, dv.logprobs_at(t, ids)
    if batch.teacher_topk_ids is not None and batch.teacher_topk_ids.shape[-1] >= k:
        return batch.teacher_topk_ids[..., :k], batch.teacher_topk_logprobs[..., :k]
    raise InputError(f"estimator 'topk_kl' (k={k}) needs the teacher's top-{k} log-probs "
                     "(or full teacher logits), but the batch has neither")


def optimal_scalar_baseline(batch: TokenBatch) -> torch.Tensor:
    """b*(s) = sum_y q_y |e_y - q|^2 l_y / sum_y q_y |e_y - q|^2 (logit space), detached. [B, T]

    The baseline that minimises the logit-space trace variance of (l_y - b) (e_y - q)
    at each state, using |e_y - q|^2 = 1 - 2 q_y + |q|^2.
    """
    t_logits = _require_teacher_logits(batch, "opd_bstar")
    with torch.no_grad():
        dtype = dv.compute_dtype(batch.student_logits)
        log_q = torch.log_softmax(batch.student_logits.detach().to(dtype), -1)
        log_p = torch.log_softmax(t_logits.detach().to(dtype), -1)
        q = log_q.exp()
        w = q * (1.0 - 2.0 * q + (q * q).sum(-1, keepdim=True))
        return (w * (log_q - log_p)).sum(-1) / w.sum(-1).clamp_min(torch.finfo(dtype).tiny)


def reward_to_go(l: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{t' >= t} gamma^(t'-t) l_t' along the last axis (l already masked)."""
    if gamma == 1.0:
        return l.flip(-1).cumsum(-1).flip(-1)
    T = l.shape[-1]
    idx = torch.arange(T, device=l.device)
    power = (idx.unsqueeze(0) - idx.unsqueeze(1)).to(l.dtype)  # power[t, t'] = t' - t
    weights = torch.where(power >= 0, torch.as_tensor(gamma, dtype=l.dtype) ** power.clamp_min(0),
                          torch.zeros((), dtype=l.dtype))  # 0 ** 0 = 1, so gamma = 0 gives the identity
    return l @ weights.T


def score_surrogate(batch: TokenBatch, student_logprobs: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """sum_t m_t sg(A_t) log pi(y_t|s_t): its gradient is sum_t m_t A_t S_t. [B]"""
    m = batch.mask.to(student_logprobs.dtype)
    return (m * advantage.detach() * student_logprobs).sum(-1)


def masked_sum(batch: TokenBatch, per_token: torch.Tensor) -> torch.Tensor:
    """sum_t m_t x_t. [B]"""
    return (batch.mask.to(per_token.dtype) * per_token).sum(-1)


def _require(batch: TokenBatch, field: str, name: str) -> torch.Tensor:
    value = getattr(batch, field)
    if value is None:
        raise InputError(f"estimator '{name}' needs the exact oracle field '{field}', which only the "
                         "tabular environments provide")
    return value


# ----------------------------------------------------------------------------- estimators

def opd(batch: TokenBatch) -> torch.Tensor:
    """Vanilla OPD: sum_t sg(l_t) log pi(y_t). Gradient sum_t l_t S_t."""
    lp = student_token_logprobs(batch)
    return score_surrogate(batch, lp, log_ratio(batch, lp))


def vopd(batch: TokenBatch) -> torch.Tensor:
    """vOPD: sum_t sg(l_t - KL_t) log pi(y_t); KL_t(s_t) = -V(s_t) is the closed-form value baseline."""
    lp, kl = logprobs_and_reverse_kl_baseline(batch, "vopd")
    return score_surrogate(batch, lp, log_ratio(batch, lp) - kl)


def vopd_topk(batch: TokenBatch, k: int = 16) -> torch.Tensor:
    """sum_t sg(l_t - KL_t^k) log pi(y_t), KL_t^k the reverse KL on the student's top-k, renormalised."""
    lp, lse = dv.token_logprobs_and_lse(batch.student_logits, batch.tokens)
    return score_surrogate(batch, lp, log_ratio(batch, lp) - topk_reverse_kl_baseline(batch, k, lse))


def opd_bstar(batch: TokenBatch) -> torch.Tensor:
    """sum_t sg(l_t - b*(s_t)) log pi(y_t) with the variance-optimal scalar baseline (analysis)."""
    lp = student_token_logprobs(batch)
    return score_surrogate(batch, lp, log_ratio(batch, lp) - optimal_scalar_baseline(batch))


def full_kl(batch: TokenBatch) -> torch.Tensor:
    """sum_t KL_t(s_t), analytic over the vocabulary (teacher detached): the Rao-Blackwellised opd."""
    t = _require_teacher_logits(batch, "full_kl")
    return masked_sum(batch, dv.reverse_kl_to_fixed_teacher(batch.student_logits, t, batch.teacher_logsumexp))


def topk_kl(batch: TokenBatch, k: int = 16) -> torch.Tensor:
    """sum_t KL(q~ || p~) on the teacher's top-k support S, both renormalised on S (biased)."""
    ids, teacher_lp = teacher_topk(batch, k)
    student_lp = dv.logprobs_at(batch.student_logits, ids)
    return masked_sum(batch, dv.renormalised_reverse_kl(student_lp, teacher_lp.detach().to(student_lp.dtype)))


def seq_reinforce(batch: TokenBatch) -> torch.Tensor:
    """sum_t sg(sum_t' l_t') log pi(y_t): REINFORCE with the whole-sequence return."""
    lp = student_token_logprobs(batch)
    total = log_ratio(batch, lp).sum(-1, keepdim=True)
    return score_surrogate(batch, lp, total.expand_as(lp))


def rtg(batch: TokenBatch, gamma: float = 1.0) -> torch.Tensor:
    """sum_t sg(sum_{t'>=t} gamma^(t'-t) l_t') log pi(y_t); gamma=0 is opd, gamma=1 unbiased for grad J."""
    if not 0.0 <= gamma <= 1.0:
        raise InputError(f"rtg needs 0 <= gamma <= 1, got gamma={gamma}")
    lp = student_token_logprobs(batch)
    return score_surrogate(batch, lp, reward_to_go(log_ratio(batch, lp), gamma))


def rtg_vopd(batch: TokenBatch) -> torch.Tensor:
    """sum_t sg(G_t - KL_t) log pi(y_t): reward-to-go minus the per-token KL baseline."""
    lp, kl = logprobs_and_reverse_kl_baseline(batch, "rtg_vopd")
    return score_surrogate(batch, lp, reward_to_go(log_ratio(batch, lp), 1.0) - kl)


def rtg_oracle(batch: TokenBatch) -> torch.Tensor:
    """sum_t sg(G_t - W_t(s_t)) log pi(y_t), W_t the exact KL-to-go (tabular oracle)."""
    lp = student_token_logprobs(batch)
    w = _require(batch, "kl_to_go", "rtg_oracle").to(lp.dtype)
    return score_surrogate(batch, lp, reward_to_go(log_ratio(batch, lp), 1.0) - w)


def rb_seq(batch: TokenBatch) -> torch.Tensor:
    """sum_t [KL_t(s_t) + sg(sum_{t'>t} l_t') log pi(y_t)]: current token exact, future sampled."""
    lp = student_token_logprobs(batch)
    future = reward_to_go(log_ratio(batch, lp), 1.0) - log_ratio(batch, lp)
    t = _require_teacher_logits(batch, "rb_seq")
    kl = dv.reverse_kl_to_fixed_teacher(batch.student_logits, t, batch.teacher_logsumexp)
    return masked_sum(batch, kl) + score_surrogate(batch, lp, future)


def rb_seq_oracle(batch: TokenBatch) -> torch.Tensor:
    """sum_t [KL_t(s_t) + sum_v pi(v|s_t) sg(W_{t+1}(s_t+v))]: only prefix noise is left (tabular floor)."""
    t = _require_teacher_logits(batch, "rb_seq_oracle").detach()
    w_next = _require(batch, "next_kl_to_go", "rb_seq_oracle")
    dtype = dv.compute_dtype(batch.student_logits)
    q = torch.softmax(batch.student_logits.to(dtype), -1)
    future = (q * w_next.detach().to(dtype)).sum(-1)
    return masked_sum(batch, dv.reverse_kl(batch.student_logits, t) + future)


def k1(batch: TokenBatch) -> torch.Tensor:
    """k1 = l_t used directly as a loss: gradient sum_t S_t, expectation zero."""
    lp = student_token_logprobs(batch)
    return masked_sum(batch, lp - batch.teacher_token_logprobs.to(lp.dtype))


def k2(batch: TokenBatch) -> torch.Tensor:
    """k2 = l_t^2 / 2 used as a loss: gradient sum_t l_t S_t, identical to opd on every sample."""
    lp = student_token_logprobs(batch)
    return masked_sum(batch, 0.5 * (lp - batch.teacher_token_logprobs.to(lp.dtype)) ** 2)


def k3(batch: TokenBatch) -> torch.Tensor:
    """k3 = (rho - 1) - log rho as a loss, rho = pi_T(y)/pi(y): gradient sum_t (1 - rho_t) S_t.

    Its expectation is the forward-KL gradient E[sum_t grad KL(pi_T || pi)(s_t)].
    """
    lp = student_token_logprobs(batch)
    log_rho = torch.where(batch.mask.bool(), batch.teacher_token_logprobs.to(lp.dtype) - lp, torch.zeros_like(lp))
    return masked_sum(batch, torch.expm1(log_rho) - log_rho)


def gkd_jsd(batch: TokenBatch, beta: float = 0.5) -> torch.Tensor:
    """sum_t JSD_beta(pi_T, pi)(s_t) over the full vocabulary (GKD / TRL convention, teacher detached)."""
    t = _require_teacher_logits(batch, "gkd_jsd").detach()
    try:
        per_token = dv.generalized_jsd(batch.student_logits, t, beta)
    except ValueError as err:
        raise InputError(str(err)) from None
    return masked_sum(batch, per_token)


def _grouped_returns(batch: TokenBatch, lp: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    B = batch.num_sequences
    if group_size < 2 or B % group_size:
        raise InputError(f"{name} needs group_size >= 2 dividing the number of sequences ({B}), "
                         f"got group_size={group_size}; rows [i*K, (i+1)*K) are one prompt's rollouts")
    return log_ratio(batch, lp).sum(-1).reshape(B // group_size, group_size)


def seq_rloo(batch: TokenBatch, group_size: int = 4) -> torch.Tensor:
    """K rollouts per prompt: A_i = L_i - mean_{j != i} L_j on the sequence return L = sum_t l_t."""
    lp = student_token_logprobs(batch)
    L = _grouped_returns(batch, lp, group_size, "seq_rloo")
    adv = (L - (L.sum(-1, keepdim=True) - L) / (group_size - 1)).reshape(-1, 1)
    return score_surrogate(batch, lp, adv.expand_as(lp))


def seq_grpo(batch: TokenBatch, group_size: int = 4, scale_std: bool = False) -> torch.Tensor:
    """K rollouts per prompt: A_i = L_i - mean_j L_j, divided by the group std if scale_std."""
    lp = student_token_logprobs(batch)
    L = _grouped_returns(batch, lp, group_size, "seq_grpo")
    adv = L - L.mean(-1, keepdim=True)
    if scale_std:
        adv = adv / (L.std(-1, keepdim=True) + 1e-6)
    return score_surrogate(batch, lp, adv.reshape(-1, 1).expand_as(lp))


# ----------------------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class Estimator:
    name: str
    fn: Callable[..., torch.Tensor]
    target: Callable[[dict], str]
    teacher_signal: str            # "sampled" | "topk" | "full" | "oracle"
    defaults: Dict[str, object]
    group: bool = False            # needs several rollouts per prompt
    analysis_only: bool = False    # needs exact tabular quantities
    credit: Callable[[dict], tuple] = lambda params: (0.0, 0.0, 0.0)
    """(a, c, gamma): beyond its value on a one-token sequence, the estimator's position-t
    advantage adds a * sum_{t'<t} l_t' + c * sum_{t'>t} gamma^(t'-t) l_t' (used by vopd_analysis.tabular.dp)."""

    @property
    def description(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def params(self, **overrides) -> dict:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise InputError(f"estimator '{self.name}' takes parameters {sorted(self.defaults) or 'none'}, "
                             f"got unknown {sorted(unknown)}")
        return {**self.defaults, **overrides}

    def target_for(self, **overrides) -> str:
        return self.target(self.params(**overrides))

    def credit_for(self, **overrides) -> tuple:
        return self.credit(self.params(**overrides))


def _const(value: str) -> Callable[[dict], str]:
    return lambda params: value


_WHOLE = _const((1.0, 1.0, 1.0))   # past and undiscounted future: the whole-sequence return
_TO_GO = _const((0.0, 1.0, 1.0))   # undiscounted future: the reward-to-go


REGISTRY: Dict[str, Estimator] = {e.name: e for e in [
    Estimator("opd", opd, _const("token"), "sampled", {}),
    Estimator("vopd", vopd, _const("token"), "full", {}),
    Estimator("vopd_topk", vopd_topk, _const("token"), "topk", {"k": 16}),
    Estimator("opd_bstar", opd_bstar, _const("token"), "full", {}, analysis_only=True),
    Estimator("full_kl", full_kl, _const("token"), "full", {}),
    Estimator("topk_kl", topk_kl, _const("none"), "topk", {"k": 16}),
    Estimator("seq_reinforce", seq_reinforce, _const("sequence"), "sampled", {}, credit=_WHOLE),
    Estimator("rtg", rtg, lambda p: "sequence" if p["gamma"] == 1.0 else ("token" if p["gamma"] == 0.0 else "none"),
              "sampled", {"gamma": 1.0}, credit=lambda p: (0.0, 1.0, p["gamma"])),
    Estimator("rtg_vopd", rtg_vopd, _const("sequence"), "full", {}, credit=_TO_GO),
    Estimator("rtg_oracle", rtg_oracle, _const("sequence"), "oracle", {}, analysis_only=True, credit=_TO_GO),
    Estimator("rb_seq", rb_seq, _const("sequence"), "full", {}, credit=_TO_GO),
    Estimator("rb_seq_oracle", rb_seq_oracle, _const("sequence"), "oracle", {}, analysis_only=True),
    Estimator("k1", k1, _const("zero"), "sampled", {}),
    Estimator("k2", k2, _const("token"), "sampled", {}),
    Estimator("k3", k3, _const("forward_token"), "sampled", {}),
    Estimator("gkd_jsd", gkd_jsd, lambda p: "token" if p["beta"] == 1.0 else "none", "full", {"beta": 0.5}),
    Estimator("seq_rloo", seq_rloo, _const("sequence"), "sampled", {"group_size": 4}, group=True),
    Estimator("seq_grpo", seq_grpo, lambda p: "none" if p["scale_std"] else "scaled_sequence", "sampled",
              {"group_size": 4, "scale_std": False}, group=True),
]}


def get(name: str) -> Estimator:
    """The registry entry called ``name``; unknown names list the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown estimator '{name}'; known estimators: {', '.join(REGISTRY)}") from None


def per_sequence(name: str, batch: TokenBatch, **params) -> torch.Tensor:
    """Per-sequence surrogate values [B] of estimator ``name`` (token sums, no reduction)."""
    spec = get(name)
    return spec.fn(batch, **spec.params(**params))


REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")


def surrogate_loss(name: str, batch: TokenBatch, reduction: str = "sequence_mean",
                   num_items_in_batch: Optional[float] = None, **params) -> torch.Tensor:
    """The loss to call ``.backward()`` on.

    ``sequence_mean`` (default): (1/N) sum_b sum_t values, N the number of sequences.
    ``token_mean``: (1/N) sum_b sum_t values, N the number of unmasked tokens.
    ``sum``: sum over tokens and sequences. ``none``: the [B] per-sequence values.

    Args:
      name: a registered estimator.
      batch: the TokenBatch.
      reduction: one of ``REDUCTIONS``.
      num_items_in_batch: N for the mean reductions when the batch is one shard of a larger
        one (TRL's convention): the global number of sequences or unmasked tokens over all
        processes. Each process then divides its local sum by the same N, and summing the
        gradients over processes gives the gradient of the global mean, whatever share of
        the tokens each process holds. Default: this batch's own count.
      **params: the estimator's parameters (registry defaults for the rest).
    Returns:
      A scalar (or [B] for ``none``).
    """
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction '{reduction}'; choose one of {REDUCTIONS}")
    values = per_sequence(name, batch, **params)
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if num_items_in_batch is None:
        if reduction == "sequence_mean":
            return values.mean()
        num_items_in_batch = batch.mask.sum().clamp_min(1)
    elif not float(num_items_in_batch) > 0:
        raise InputError(f"num_items_in_batch must be positive, got {num_items_in_batch}")
    return values.sum() / torch.as_tensor(num_items_in_batch, dtype=values.dtype, device=values.device)


def describe() -> list:
    """One dict per registered estimator: name, target, teacher signal, parameters, description."""
    return [{"name": e.name, "unbiased_for": e.target(e.defaults), "teacher_signal": e.teacher_signal,
             "params": dict(e.defaults), "group": e.group, "analysis_only": e.analysis_only,
             "description": e.description} for e in REGISTRY.values()]
