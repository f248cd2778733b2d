"""The estimator registry: every OPD gradient estimator as a surrogate loss.

Notation: student pi = softmax(z), teacher pi_T, sampled token y_t at state s_t,
mask m_t, "sg" = stop-gradient (detach),

    l_t    = log pi(y_t|s_t) - log pi_T(y_t|s_t)          (reward r_t = -l_t)
    KL_t   = sum_v pi(v|s_t) [log pi(v|s_t) - log pi_T(v|s_t)]
    S_t    = grad log pi(y_t|s_t)                          (the score)
    G_t^g  = sum_{t' >= t} g^(t'-t) m_t' l_t'               (reward-to-go)

Every estimator is a pure function ``fn(batch, **params) -> Tensor[B]`` returning
one surrogate value per sequence, summed over its tokens; the gradient of that
value is the estimator's single-sequence gradient. ``surrogate_loss`` reduces
the per-sequence values (mean over sequences by default). Sign conventions,
normalisation and surrogates live here and nowhere else.

Most estimators are composed (``composed``): a ``Return`` R_t (token log-ratio,
whole sequence, reward-to-go, future), minus a coefficient times a state
``Baseline`` b(s_t) (none, KL_t, student-top-k KL, b*, the oracle KL-to-go),
plus optionally an analytic term:

    sum_t m_t [A_t + sg(R_t - c b(s_t)) log pi(y_t|s_t)].

A baseline that depends on the state only keeps the expectation of the return's
estimator (E[b(s_t) S_t | s_t] = 0), so the target comes from the return. The
others (analytic divergences, k1/k2/k3 as losses, group estimators) are plain
functions.

The composed estimators, full_kl and the top-k losses read only a per-token record
(``token_stats.TokenStats``: lp_t, lp_T,t, KL_t, b*_t, log q and log p on a top-k support)
and say which of its fields they need (``token_stats.Needs``). Either scorer fills it: the
materialised one from a TokenBatch (``token_stats.from_batch``), the fused one from hidden
states (``lm.fused_score``); so one of them composed from existing parts runs on both.

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
import functools
from typing import Callable, Dict, Optional

import torch

from . import divergences as dv
from . import token_stats
from .batch import TokenBatch
from .errors import InputError
from .token_stats import Needs, TokenStats, require_oracle, require_teacher_logits

# ----------------------------------------------------------------------------- per-token pieces

def student_token_logprobs(batch: TokenBatch) -> torch.Tensor:
    """log pi(y_t|s_t), carrying the gradient. [B, T]"""
    return dv.token_logprobs(batch.student_logits, batch.tokens)


def log_ratio(batch, student_logprobs: torch.Tensor) -> torch.Tensor:
    """l_t = log pi(y_t) - log pi_T(y_t), detached, zero where masked (``batch``: a TokenBatch or a
    ``TokenStats``). [B, T]"""
    l = student_logprobs.detach() - batch.teacher_token_logprobs.to(student_logprobs.dtype)
    return torch.where(batch.mask.bool(), l, torch.zeros_like(l))


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


def score_surrogate(batch, student_logprobs: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """sum_t m_t sg(A_t) log pi(y_t|s_t): its gradient is sum_t m_t A_t S_t. [B]"""
    m = batch.mask.to(student_logprobs.dtype)
    return (m * advantage.detach() * student_logprobs).sum(-1)


def masked_sum(batch, per_token: torch.Tensor) -> torch.Tensor:
    """sum_t m_t x_t (``batch``: a TokenBatch or a ``TokenStats``). [B]"""
    return (batch.mask.to(per_token.dtype) * per_token).sum(-1)


# ----------------------------------------------------------------------------- estimators

# ----------------------------------------------------------------------------- returns
#
# A score-function estimator is  sum_t m_t sg(R_t - c b(s_t)) log pi(y_t|s_t)  (plus, for some, an
# analytic term), after mc_gradients' control_variates_surrogate_loss: a return R, a baseline b
# that depends on the state only (so it never adds bias) and a coefficient c.

@dataclasses.dataclass(frozen=True)
class Return:
    """The return R_t [B, T] that multiplies the score at position t.

    ``fn(l, **params)`` maps the masked, detached log-ratios l [B, T] to R [B, T].
    ``credit(params)`` = (a, c, gamma) says how R_t reaches beyond position t, for the
    dynamic-programming engine (``tabular.dp``): R_t = [R on the one-token sequence]
    + a sum_{t'<t} l_t' + c sum_{t'>t} gamma^(t'-t) l_t'; None when R_t is no such sum (the DP
    engine then refuses and enumeration is exact). ``target(params)`` is what the
    score-function estimator with this return (and any state baseline) is unbiased for.
    """

    name: str
    formula: str
    fn: Callable[..., torch.Tensor]
    params: Dict[str, object]
    credit: Callable[[dict], Optional[tuple]]
    target: Callable[[dict], str]


def _check_gamma(gamma: float) -> float:
    if not 0.0 <= gamma <= 1.0:
        raise InputError(f"rtg needs 0 <= gamma <= 1, got gamma={gamma}")
    return gamma


def _rtg_target(p: dict) -> str:
    return "sequence" if p["gamma"] == 1.0 else ("token" if p["gamma"] == 0.0 else "none")


TOKEN_RETURN = Return("token", "l_t", lambda l: l, {}, lambda p: (0.0, 0.0, 0.0), lambda p: "token")
SEQUENCE_RETURN = Return("sequence", "sum_t' l_t'", lambda l: l.sum(-1, keepdim=True).expand_as(l), {},
                         lambda p: (1.0, 1.0, 1.0), lambda p: "sequence")
REWARD_TO_GO = Return("reward_to_go", "sum_{t'>=t} gamma^(t'-t) l_t'",
                      lambda l, gamma: reward_to_go(l, _check_gamma(gamma)), {"gamma": 1.0},
                      lambda p: (0.0, 1.0, p["gamma"]), _rtg_target)
TO_GO_RETURN = Return("to_go", "sum_{t'>=t} l_t'", lambda l: reward_to_go(l, 1.0), {},
                      lambda p: (0.0, 1.0, 1.0), lambda p: "sequence")
def position_weights(l: torch.Tensor, gamma: float) -> torch.Tensor:
    """IW-OPD's weights w_t = 1 + gamma (1 - sum_{t'<t} |l_t'| / max(sum_t' |l_t'|, 1e-8)). [B, T]

    They fall from 1 + gamma at the first token to about 1 at the last, by the share of the
    sequence's total |log-ratio| already spent (arXiv 2606.22600, as TRL 1.16's IWOPDTrainer).
    """
    if not (isinstance(gamma, (int, float)) and gamma >= 0.0 and gamma == gamma and gamma != float("inf")):
        raise InputError(f"iw_opd needs a finite gamma >= 0, got gamma={gamma!r}")
    a = l.abs()
    prefix = a.cumsum(-1) - a
    return 1.0 + gamma * (1.0 - prefix / a.sum(-1, keepdim=True).clamp_min(1e-8))


POSITION_WEIGHTED_RETURN = Return("position_weighted", "w_t l_t", lambda l, gamma: position_weights(l, gamma) * l,
                                  {"gamma": 0.5}, lambda p: None,
                                  lambda p: "token" if p["gamma"] == 0.0 else "none")
FUTURE_RETURN = Return("future", "sum_{t'>t} l_t'", lambda l: reward_to_go(l, 1.0) - l, {},
                       lambda p: (0.0, 1.0, 1.0), lambda p: "none")


# ----------------------------------------------------------------------------- baselines

@dataclasses.dataclass(frozen=True)
class Baseline:
    """A state baseline b(s_t) [B, T], detached, read from the per-token record.

    ``fn(stats, **params)`` returns b (or None) from a ``TokenStats`` holding what
    ``needs(params)`` asks for: a scorer computes the sampled log-prob and what the baseline reads
    of the student logits in one pass. ``teacher_signal`` is what it needs from the teacher
    ("sampled" < "topk" < "full" < "oracle").
    """

    name: str
    formula: str
    fn: Callable[..., Optional[torch.Tensor]]
    params: Dict[str, object]
    teacher_signal: str
    needs: Callable[[dict], Needs] = lambda p: Needs()


def _renormalised_on_support(divergence: Callable) -> Callable:
    """b = divergence(log q on S_t, log p on S_t), detached: a top-k baseline."""
    def fn(stats: TokenStats, k: int) -> torch.Tensor:
        with torch.no_grad():
            return divergence(stats.student_topk_logprobs.detach(), stats.teacher_topk_logprobs)
    return fn


def _student_topk(p: dict) -> Needs:
    return Needs(topk=p["k"])


NO_BASELINE = Baseline("none", "0", lambda stats: None, {}, "sampled")
KL_BASELINE = Baseline("kl", "KL_t", lambda stats: stats.kl.detach(), {}, "full", lambda p: Needs(kl="baseline"))
STUDENT_TOPK_KL_BASELINE = Baseline("student_topk_kl", "KL_t^k", _renormalised_on_support(dv.renormalised_reverse_kl),
                                    {"k": 16}, "topk", _student_topk)
BSTAR_BASELINE = Baseline("bstar", "b*(s_t)", lambda stats: stats.bstar, {}, "full", lambda p: Needs(bstar=True))
STUDENT_TOPK_BSTAR_BASELINE = Baseline("student_topk_bstar", "b*_k(s_t)",
                                       _renormalised_on_support(dv.student_topk_optimal_baseline), {"k": 16}, "topk",
                                       _student_topk)
KL_TO_GO_BASELINE = Baseline("kl_to_go", "W_t(s_t)", lambda stats: stats.kl_to_go, {}, "oracle",
                             lambda p: Needs(kl_to_go=True))

_SIGNALS = ("sampled", "topk", "full", "oracle")


def logprobs_and_baseline(batch: TokenBatch, baseline: Baseline, name: str, **params) -> tuple:
    """(log pi(y_t|s_t) with its gradient, b [B, T] or None) of ``baseline`` on a batch, in the
    materialised scorer's one pass (``name``: the estimator, for error messages)."""
    stats = token_stats.from_batch(batch, Needs(logprobs=True) | baseline.needs(params), name)
    return stats.student_logprobs, baseline.fn(stats, **params)


# ----------------------------------------------------------------------------- analytic terms

def reverse_kl_term(stats: TokenStats) -> torch.Tensor:
    """sum_t m_t KL_t(s_t), analytic over the vocabulary, teacher detached. [B]"""
    return masked_sum(stats, stats.kl)


@dataclasses.dataclass(frozen=True)
class Term:
    """An analytic term sum_t m_t A_t: ``fn(stats) -> [B]`` from a record holding ``needs``."""

    formula: str
    fn: Callable[[TokenStats], torch.Tensor]
    needs: Needs


REVERSE_KL = Term("KL_t", reverse_kl_term, Needs(kl="loss"))


def score_function_estimator(stats: TokenStats, *, ret: Return, baseline: Baseline, coefficient=1.0,
                             analytic: Optional[Callable] = None, **params) -> torch.Tensor:
    """sum_t m_t [A_t + sg(R_t - c b(s_t)) log pi(y_t|s_t)], one value per sequence. [B]

    Args:
      stats: the per-token record (``TokenStats``) with what ``composed``'s needs ask for.
      ret: the Return R; baseline: the Baseline b; coefficient: c, a number or the name of
        the parameter that holds it; analytic: optional stats -> [B] term sum_t m_t A_t
        (``reverse_kl_term``).
      **params: the parameters of ret, baseline and coefficient.
    Returns:
      [B] surrogate values; the gradient of their sum is the estimator's gradient.
    """
    lp = stats.student_logprobs
    b = baseline.fn(stats, **{p: params[p] for p in baseline.params})
    advantage = ret.fn(log_ratio(stats, lp), **{p: params[p] for p in ret.params})
    if b is not None:
        c = params[coefficient] if isinstance(coefficient, str) else coefficient
        advantage = advantage - (b if c == 1.0 else c * b)
    value = score_surrogate(stats, lp, advantage)
    return value if analytic is None else analytic(stats) + value


# ----------------------------------------------------------------------------- other estimators

def topk_kl(stats: TokenStats, k: int = 16) -> torch.Tensor:
    """sum_t KL(q~ || p~) on the teacher's top-k support S, both renormalised on S (biased)."""
    student_lp = stats.student_topk_logprobs
    return masked_sum(stats, dv.renormalised_reverse_kl(student_lp,
                                                        stats.teacher_topk_logprobs.detach().to(student_lp.dtype)))


def student_topk_kl(stats: TokenStats, k: int = 100) -> torch.Tensor:
    """sum_t KL(q~ || p~) on the student's top-k support, both renormalised, as a loss (biased unless k = V).

    The vOPD authors' ``opd_top_k`` loss: the support is chosen without gradient, the KL is
    differentiated through the student's probabilities on it.
    """
    student_lp = stats.student_topk_logprobs
    return masked_sum(stats, dv.renormalised_reverse_kl(student_lp, stats.teacher_topk_logprobs.to(student_lp.dtype)))


def topk_tail_kl(stats: TokenStats, k: int = 16) -> torch.Tensor:
    """sum_t [sum_{v in S} q_v log(q_v/p_v) + q_tail log(q_tail/p_tail)]: reverse KL over the student's
    top-k tokens plus one tail bucket, full-vocabulary probabilities, no renormalisation (TRL 1.16's
    sparse top-k loss). Biased unless k = V."""
    student_lp = stats.student_topk_logprobs
    return masked_sum(stats, dv.tail_bucket_reverse_kl(student_lp, stats.teacher_topk_logprobs.to(student_lp.dtype)))


def k3_clamped(batch: TokenBatch) -> torch.Tensor:
    """verl's low_var_kl as a loss: x = clamp(log rho_t, -20, 20), sum_t clamp(e^x - x - 1, -10, 10).

    k3 with two clamps; where a clamp binds its gradient is zero, which biases the estimate
    of k3's forward-KL gradient.
    """
    lp = student_token_logprobs(batch)
    log_rho = torch.where(batch.mask.bool(), batch.teacher_token_logprobs.to(lp.dtype) - lp, torch.zeros_like(lp))
    x = log_rho.clamp(-20.0, 20.0)
    return masked_sum(batch, (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0))


def rb_seq_oracle(batch: TokenBatch) -> torch.Tensor:
    """sum_t [KL_t(s_t) + sum_v pi(v|s_t) sg(W_{t+1}(s_t+v))]: only prefix noise is left (tabular floor)."""
    t = require_teacher_logits(batch, "rb_seq_oracle").detach()
    w_next = require_oracle(batch, "next_kl_to_go", "rb_seq_oracle")
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
    t = require_teacher_logits(batch, "gkd_jsd").detach()
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


# ----------------------------------------------------------------------------- token selection

def high_entropy_mask(batch: TokenBatch, rho: float) -> torch.Tensor:
    """Keep, in each sequence, the ceil(rho n) unmasked positions of highest student entropy H(pi(.|s_t))
    (n = its unmasked positions; ties to the earlier position). [B, T] mask

    Revisiting OPD trains on the top 20% (rho = 0.2); TIP (arXiv 2604.14084) selects tokens by
    entropy too. The selection depends on every position's state, so a token-level estimator
    under it is in general unbiased for nothing.
    """
    if not (isinstance(rho, (int, float)) and 0.0 < rho <= 1.0):
        raise InputError(f"token selection needs 0 < rho <= 1, got rho={rho!r}")
    m = batch.mask.bool()
    H = torch.where(m, dv.entropy(batch.student_logits), torch.full_like(m, float("-inf"), dtype=torch.float64))
    keep = torch.ceil(rho * m.sum(-1).double() - 1e-9).long()
    order = torch.argsort(-H, dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(H.shape[-1], device=H.device).expand_as(order))
    return (m & (rank < keep.unsqueeze(-1))).to(batch.mask.dtype)


# ----------------------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class Estimator:
    """A registered estimator: ``fn(batch, **params) -> [B]`` surrogate values, and what it is.

    ``target(params)`` names what its expectation equals (module docstring); ``ret`` is the
    Return of a composed score-function estimator (None for the others, whose gradient at
    position t depends on (s_t, y_t) only, and for group estimators). An estimator that reads
    only the per-token record has ``from_stats(stats, **params)`` and ``needs(params)``
    (``on_stats``); its ``fn`` is ``from_stats`` on the materialised scorer's record.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    target: Callable[[dict], str]
    teacher_signal: str            # "sampled" | "topk" | "full" | "oracle"
    defaults: Dict[str, object]
    group: bool = False            # needs several rollouts per prompt
    ret: Optional[Return] = None
    summary: str = ""              # one line; default: the first line of fn's docstring
    reference: str = ""            # the paper it comes from (arXiv id)
    needs: Optional[Callable[[dict], Needs]] = None          # what from_stats reads of the record
    from_stats: Optional[Callable[..., torch.Tensor]] = None  # (TokenStats, **params) -> [B]

    @property
    def analysis_only(self) -> bool:
        """Needs exact tabular quantities (an oracle), so it cannot train a real model."""
        return self.teacher_signal == "oracle"

    @property
    def description(self) -> str:
        return self.summary or ((self.from_stats or self.fn).__doc__ or "").strip().splitlines()[0]

    @property
    def reads_stats(self) -> bool:
        """Computed from a ``TokenStats`` alone, so either scorer (materialised or fused) can fill it."""
        return self.from_stats is not None and not self.analysis_only

    def params(self, **overrides) -> dict:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise InputError(f"estimator '{self.name}' takes parameters {sorted(self.defaults) or 'none'}, "
                             f"got unknown {sorted(unknown)}")
        return {**self.defaults, **overrides}

    def target_for(self, **overrides) -> str:
        params = self.params(**overrides)
        return "none" if params.get("rho", 1.0) < 1.0 else self.target(params)

    def credit_for(self, **overrides) -> Optional[tuple]:
        """(a, c, gamma) for ``tabular.dp`` (see ``Return``), derived from the return; (0, 0, 0)
        for the estimators without one; None where no DP applies (group estimators, returns
        that are not sums of log-ratios, token selection)."""
        params = self.params(**overrides)
        if self.group or params.get("rho", 1.0) < 1.0:
            return None
        return (0.0, 0.0, 0.0) if self.ret is None else self.ret.credit(params)

    def __call__(self, batch: TokenBatch, **params) -> torch.Tensor:
        """[B] surrogate values with ``params`` over the defaults; ``rho`` < 1 first applies
        ``high_entropy_mask``."""
        params = self.params(**params)
        rho = params.pop("rho", 1.0)
        if rho != 1.0:
            batch = dataclasses.replace(batch, mask=high_entropy_mask(batch, rho))
        return self.fn(batch, **params)


def token_selectable(e: Estimator) -> Estimator:
    """``e`` with the token-selection parameter rho (default 1.0: every token), for token-level
    estimators (no return or the token log-ratio, not aimed at grad J, not group estimators)."""
    if e.group or e.ret not in (None, TOKEN_RETURN) or e.target(e.defaults) == "sequence":
        return e
    return dataclasses.replace(e, defaults={**e.defaults, "rho": 1.0})


def _const(value: str) -> Callable[[dict], str]:
    return lambda params: value


def _on_batch(batch: TokenBatch, *, name: str, needs: Callable[[dict], Needs], from_stats: Callable,
              **params) -> torch.Tensor:
    """``from_stats`` on the materialised scorer's record of ``batch`` (``token_stats.from_batch``)."""
    return from_stats(token_stats.from_batch(batch, needs(params), name), **params)


def on_stats(name: str, from_stats: Callable, needs: Callable[[dict], Needs], target: Callable[[dict], str],
             teacher_signal: str, defaults: dict, **fields) -> Estimator:
    """A registry row for an estimator that reads only the per-token record: ``from_stats(stats, **params)``
    on the record ``needs(params)`` describes, filled by either scorer."""
    fn = functools.partial(_on_batch, name=name, needs=needs, from_stats=from_stats)
    return Estimator(name, fn, target, teacher_signal, defaults, needs=needs, from_stats=from_stats, **fields)


def composed(name: str, ret: Return, baseline: Baseline = NO_BASELINE, coefficient=1.0,
             analytic: Optional[Term] = None, defaults: Optional[dict] = None,
             target: Optional[Callable[[dict], str]] = None, reference: str = "") -> Estimator:
    """A registry row for sum_t m_t [A_t + sg(R_t - c b(s_t)) log pi(y_t)] built from its parts.

    Its parameters are those of the return, the baseline and a named coefficient (values in
    ``defaults``); its target is the return's unless given; its teacher signal is the larger
    of the baseline's and (for an analytic term) "full".
    """
    params = {**ret.params, **baseline.params, **(defaults or {})}
    if isinstance(coefficient, str) and coefficient not in params:
        raise ValueError(f"{name}: coefficient parameter '{coefficient}' needs a default")
    signal = max(baseline.teacher_signal, "full" if analytic else "sampled", key=_SIGNALS.index)
    c = "" if coefficient == 1.0 else f"{coefficient} "
    score = f"sg({ret.formula})" if baseline is NO_BASELINE else f"sg({ret.formula} - {c}{baseline.formula})"
    summary = f"sum_t [{analytic.formula} + {score} log pi(y_t)]" if analytic else f"sum_t {score} log pi(y_t)"
    from_stats = functools.partial(score_function_estimator, ret=ret, baseline=baseline, coefficient=coefficient,
                                   analytic=None if analytic is None else analytic.fn)
    term_needs = Needs() if analytic is None else analytic.needs

    def needs(p: dict) -> Needs:
        return Needs(logprobs=True) | baseline.needs(p) | term_needs

    return on_stats(name, from_stats, needs, target or ret.target, signal, params, ret=ret, summary=summary,
                    reference=reference)


REGISTRY: Dict[str, Estimator] = {e.name: token_selectable(e) for e in [
    composed("opd", TOKEN_RETURN, reference="arXiv 2306.13649"),
    composed("vopd", TOKEN_RETURN, KL_BASELINE, reference="arXiv 2605.07865"),
    composed("vopd_topk", TOKEN_RETURN, STUDENT_TOPK_KL_BASELINE, reference="arXiv 2605.07865"),
    composed("vopd_scaled", TOKEN_RETURN, KL_BASELINE, coefficient="alpha", defaults={"alpha": 1.0}),
    composed("opd_bstar", TOKEN_RETURN, BSTAR_BASELINE),
    composed("opd_bstar_topk", TOKEN_RETURN, STUDENT_TOPK_BSTAR_BASELINE),
    composed("iw_opd", POSITION_WEIGHTED_RETURN, reference="arXiv 2606.22600"),
    on_stats("full_kl", reverse_kl_term, lambda p: REVERSE_KL.needs, _const("token"), "full", {},
             summary="sum_t KL_t(s_t), analytic over the vocabulary: the Rao-Blackwellised opd",
             reference="arXiv 2306.13649"),
    on_stats("topk_kl", topk_kl, lambda p: Needs(topk=p["k"], topk_of="teacher", topk_grad="renormalised"),
             _const("none"), "topk", {"k": 16}),
    on_stats("student_topk_kl", student_topk_kl, lambda p: Needs(topk=p["k"], topk_grad="renormalised"),
             _const("none"), "topk", {"k": 100}, reference="arXiv 2605.07865"),
    on_stats("topk_tail_kl", topk_tail_kl, lambda p: Needs(topk=p["k"], topk_grad="full"), _const("none"), "topk",
             {"k": 16}),
    composed("seq_reinforce", SEQUENCE_RETURN),
    composed("rtg", REWARD_TO_GO),
    composed("rtg_vopd", TO_GO_RETURN, KL_BASELINE),
    composed("rtg_oracle", TO_GO_RETURN, KL_TO_GO_BASELINE),
    composed("rb_seq", FUTURE_RETURN, analytic=REVERSE_KL, target=_const("sequence")),
    Estimator("rb_seq_oracle", rb_seq_oracle, _const("sequence"), "oracle", {}),
    Estimator("k1", k1, _const("zero"), "sampled", {}),
    Estimator("k2", k2, _const("token"), "sampled", {}),
    Estimator("k3", k3, _const("forward_token"), "sampled", {}),
    Estimator("k3_clamped", k3_clamped, _const("none"), "sampled", {}),
    Estimator("gkd_jsd", gkd_jsd, lambda p: "token" if p["beta"] == 1.0 else "none", "full", {"beta": 0.5},
              reference="arXiv 2306.13649"),
    Estimator("seq_rloo", seq_rloo, _const("sequence"), "sampled", {"group_size": 4}, group=True,
              reference="arXiv 2402.14740"),
    Estimator("seq_grpo", seq_grpo, lambda p: "none" if p["scale_std"] else "scaled_sequence", "sampled",
              {"group_size": 4, "scale_std": False}, group=True, reference="arXiv 2402.03300"),
]}


def base_name(label: str) -> str:
    """The registry name in a label that carries parameters: ``vopd_topk(k=64)`` -> ``vopd_topk`` (no
    registry name contains a parenthesis)."""
    return label.split("(", 1)[0]


def get(name: str) -> Estimator:
    """The registry entry called ``name``; unknown names list the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown estimator '{name}'; known estimators: {', '.join(REGISTRY)}") from None


def per_sequence(name: str, batch: TokenBatch, *, validate: bool = True, **params) -> torch.Tensor:
    """Per-sequence surrogate values [B] of estimator ``name`` (token sums, no reduction).

    Args:
      name: a registered estimator.
      batch: the TokenBatch; checked by ``TokenBatch.validate`` (an all-masked batch is
        allowed here: its values are 0) unless ``validate=False``.
      validate: False skips the check, for loops whose batches were checked upstream (the
        exact engines build theirs from checked tables).
      **params: the estimator's parameters (registry defaults for the rest).
    Returns:
      [B] surrogate values.
    """
    entry = get(name)
    if validate:
        batch.validate(allow_empty_mask=True, unread=_unread(entry))
    return entry(batch, **params)


def _unread(entry: "Estimator") -> tuple:
    """The [B, T, V] batch fields whose values ``entry`` never reads (validation checks their shapes only)."""
    return ("teacher_logits",) if entry.teacher_signal == "sampled" else ()


REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")


def surrogate_loss(name: str, batch: TokenBatch, reduction: str = "sequence_mean",
                   num_items_in_batch: Optional[float] = None, *, validate: bool = True,
                   **params) -> torch.Tensor:
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
      validate: check the batch with ``TokenBatch.validate`` first (default); an all-masked
        batch is then an error for the mean reductions without ``num_items_in_batch`` (it has
        nothing to average). False skips the check (batches checked upstream).
      **params: the estimator's parameters (registry defaults for the rest).
    Returns:
      A scalar (or [B] for ``none``).
    """
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction '{reduction}'; choose one of {REDUCTIONS}")
    if validate:
        batch.validate(allow_empty_mask=reduction in ("sum", "none") or num_items_in_batch is not None,
                       unread=_unread(get(name)))
    return reduce(per_sequence(name, batch, validate=False, **params), batch.mask, reduction, num_items_in_batch)


def reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str,
           num_items_in_batch: Optional[float] = None) -> torch.Tensor:
    """``surrogate_loss``'s reductions of per-sequence values [B] (``mask`` [B, T] counts the tokens).

    ``none``: the values; ``sum``: their sum; ``sequence_mean`` / ``token_mean``: their sum over
    N, ``num_items_in_batch`` when given (checked positive and finite), else the number of
    sequences / of unmasked tokens (at least 1).
    """
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction '{reduction}'; choose one of {REDUCTIONS}")
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if num_items_in_batch is None:
        if reduction == "sequence_mean":
            return values.mean()
        num_items_in_batch = mask.sum().clamp_min(1)
    elif not 0 < float(num_items_in_batch) < float("inf"):
        raise InputError(f"num_items_in_batch must be positive and finite, got {num_items_in_batch}")
    return values.sum() / torch.as_tensor(num_items_in_batch, dtype=values.dtype, device=values.device)


def describe() -> list:
    """One dict per registered estimator: name, target, teacher signal, parameters, description."""
    return [{"name": e.name, "unbiased_for": e.target(e.defaults), "teacher_signal": e.teacher_signal,
             "params": dict(e.defaults), "group": e.group, "analysis_only": e.analysis_only,
             "description": e.description, "reference": e.reference} for e in REGISTRY.values()]
