"""Exact ground truth on prefix trees: targets, and every estimator's mean and variance.

Targets, in logit space (theta = the student logit table, d(s) the probability
of reaching s, q_s = pi(.|s), l_s = log q_s - log p_s, KL_s = <q_s, l_s>):

    W(s)        = KL_s + sum_v q_s[v] W(s + v)                 KL-to-go, W = 0 past the horizon
    J           = W(root)                                       sequence-level reverse KL
    grad J[s]   = d(s) q_s * (C_s - W(s)),  C_s[v] = l_s[v] + W(s + v)
    g_tok[s]    = d(s) q_s * (l_s - KL_s)                       token-level OPD target
    g_fwd[s]    = d(s) (q_s - p_s)                              token-level forward-KL gradient

Estimator moments: all V^H sequences are scored as one batch (in chunks), with
the student logits at every visited position as one leaf tensor Z [N, H, V].
One backward pass of the summed per-sequence surrogates gives each sequence's
gradient with respect to its own positions (sequences share no leaves), which
is folded into parameter space by scattering onto the visited states. On a
prefix tree the positions of one sequence are distinct states, so

    E g            = sum_n P(y_n) scatter(dZ_n)
    tr Cov(g)      = sum_t [ sum_n P(y_n) |dZ_{n,t}|^2 - |E g restricted to level t|^2 ].
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Optional

import numpy as np
import torch

from synthetic.tree import PrefixTree, check_enumerable, level_offset
from . import estimators as est
from .batch import InputError

DEFAULT_CHUNK = 1 << 15


@dataclasses.dataclass(frozen=True)
class TreeQuantities:
    """Exact per-state quantities of a prefix tree (torch float64 tensors)."""

    log_q: torch.Tensor        # [S, V] student log-probs
    log_p: torch.Tensor        # [S, V] teacher log-probs
    reach: torch.Tensor        # [S]    d(s)
    kl: torch.Tensor           # [S]    KL_s
    kl_to_go: torch.Tensor     # [S]    W(s)
    next_kl_to_go: torch.Tensor  # [S, V] W(s + v), 0 past the horizon
    sequence_kl: float         # J
    grad_sequence: torch.Tensor  # [S, V] grad J
    grad_token: torch.Tensor     # [S, V] g_tok
    grad_forward_token: torch.Tensor  # [S, V] token-level forward-KL gradient

    @property
    def grad_future(self) -> torch.Tensor:
        """g_fut = grad J - g_tok: the future-coupling term token-level OPD drops."""
        return self.grad_sequence - self.grad_token


def tree_quantities(env) -> TreeQuantities:
    """All exact targets by one forward (reach) and one backward (KL-to-go) sweep over levels.

    Works on any layered environment (a PrefixTree, or a synthetic.markov.MarkovChain):
    one with ``vocab``, ``horizon``, ``num_states``, logit tables [S, V], ``level(t)``
    (the slice of states at position t) and ``children(t)`` ([n_t, V] next states).
    """
    V, H = env.vocab, env.horizon
    log_q = torch.log_softmax(torch.as_tensor(env.student_logits, dtype=torch.float64), -1)
    log_p = torch.log_softmax(torch.as_tensor(env.teacher_logits, dtype=torch.float64), -1)
    q = log_q.exp()
    l = log_q - log_p
    kl = (q * l).sum(-1)
    S = env.num_states
    levels = [env.level(t) for t in range(H)]

    reach = torch.zeros(S, dtype=torch.float64)
    reach[levels[0]] = 1.0
    for t in range(H - 1):
        reach.index_add_(0, env.children(t).reshape(-1), (reach[levels[t], None] * q[levels[t]]).reshape(-1))

    w = torch.empty(S, dtype=torch.float64)
    w_next = torch.zeros(S, V, dtype=torch.float64)
    for t in reversed(range(H)):
        if t + 1 < H:
            w_next[levels[t]] = w[env.children(t)]
        w[levels[t]] = kl[levels[t]] + (q[levels[t]] * w_next[levels[t]]).sum(-1)

    c = l + w_next
    grad_sequence = reach[:, None] * q * (c - w[:, None])
    grad_token = reach[:, None] * q * (l - kl[:, None])
    grad_forward = reach[:, None] * (q - log_p.exp())
    return TreeQuantities(log_q, log_p, reach, kl, w, w_next, float(w[0]), grad_sequence, grad_token, grad_forward)


@dataclasses.dataclass(frozen=True)
class Moments:
    """Exact mean gradient [S, V], total variance tr Cov, per-position variance [H] (None for groups)."""

    mean: torch.Tensor
    total_variance: float
    position_variance: Optional[np.ndarray]

    def mse(self, target: torch.Tensor, batch_size: int) -> float:
        """MSE of a batch-B mean gradient against ``target``: |bias|^2 + tr Cov / B."""
        return float(((self.mean - target) ** 2).sum()) + self.total_variance / batch_size


def _chunks(n: int, size: int) -> Iterable[tuple]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def exact_moments(tree: PrefixTree, specs: Dict[str, dict], chunk_size: int = DEFAULT_CHUNK,
                  quantities: Optional[TreeQuantities] = None) -> Dict[str, Moments]:
    """Exact moments of several estimators, ``specs`` = {label: {"name": estimator, **params}}.

    Streams over the V^H sequences in chunks; memory is O(chunk * H * V + S * V).
    """
    check_enumerable(tree.vocab, tree.horizon)
    for label, spec in specs.items():
        entry = est.get(spec["name"])
        if entry.group:
            raise InputError(f"'{label}': group estimator '{entry.name}' needs K rollouts per prompt; "
                             "its exact moments need K-tuple enumeration (exact_group_moments)")
        entry.params(**{k: v for k, v in spec.items() if k != "name"})
    tq = quantities or tree_quantities(tree)
    S, V, H = tree.num_states, tree.vocab, tree.horizon
    theta = torch.as_tensor(tree.student_logits, dtype=torch.float64)
    sums = {label: torch.zeros(S, V, dtype=torch.float64) for label in specs}
    second = {label: torch.zeros(H, dtype=torch.float64) for label in specs}

    for start, stop in _chunks(tree.num_sequences, chunk_size):
        tokens = tree.sequences(start, stop)
        states = tree.state_ids(tokens)
        prob = tq.log_q[states].gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1).exp()
        flat_states = states.reshape(-1)
        base = tree.token_batch(tokens, theta[states], tq.kl_to_go, tq.next_kl_to_go)
        for label, spec in specs.items():
            z = base.student_logits.clone().requires_grad_(True)
            batch = dataclasses.replace(base, student_logits=z)
            params = {k: v for k, v in spec.items() if k != "name"}
            est.per_sequence(spec["name"], batch, **params).sum().backward()
            grad = z.grad
            sums[label].index_add_(0, flat_states, (prob[:, None, None] * grad).reshape(-1, V))
            second[label] += (prob[:, None] * (grad ** 2).sum(-1)).sum(0)

    out = {}
    for label in specs:
        mean = sums[label]
        level_norms = torch.stack([(mean[level_offset(V, t):level_offset(V, t + 1)] ** 2).sum()
                                   for t in range(H)])
        position = (second[label] - level_norms).clamp_min(0.0).numpy()
        out[label] = Moments(mean, float(position.sum()), position)
    return out


def reference_moments(tree: PrefixTree, name: str, **params) -> Moments:
    """The slow, obviously correct reference: one autograd call per sequence on the logit table.

    E g = sum_y P(y) grad_theta L(y),  tr Cov = sum_y P(y) |grad_theta L(y)|^2 - |E g|^2.
    """
    check_enumerable(tree.vocab, tree.horizon)
    tq = tree_quantities(tree)
    mean = torch.zeros(tree.num_states, tree.vocab, dtype=torch.float64)
    second = 0.0
    for tokens in tree.sequences():
        tokens = tokens.unsqueeze(0)
        theta = torch.tensor(tree.student_logits, dtype=torch.float64, requires_grad=True)
        states = tree.state_ids(tokens)
        batch = tree.token_batch(tokens, theta[states], tq.kl_to_go, tq.next_kl_to_go)
        (grad,) = torch.autograd.grad(est.per_sequence(name, batch, **params).sum(), theta)
        prob = float(tq.log_q[states[0], tokens[0]].sum().exp())
        mean += prob * grad
        second += prob * float((grad ** 2).sum())
    return Moments(mean, second - float((mean ** 2).sum()), None)


def bias_report(mean: torch.Tensor, target: torch.Tensor) -> dict:
    """Bias of a mean gradient against a target: L2 norm, relative norm, cosine."""
    diff = float(torch.linalg.norm(mean - target))
    norm_t = float(torch.linalg.norm(target))
    norm_m = float(torch.linalg.norm(mean))
    cosine = float((mean * target).sum() / (norm_m * norm_t)) if norm_m > 0 and norm_t > 0 else float("nan")
    return {"l2": diff, "relative": diff / norm_t if norm_t > 0 else float("nan"), "cosine": cosine}


def target_gradient(quantities: TreeQuantities, target: str) -> Optional[torch.Tensor]:
    """The exact vector an estimator with this ``target`` label is unbiased for (None for 'none')."""
    return {"token": quantities.grad_token, "sequence": quantities.grad_sequence,
            "forward_token": quantities.grad_forward_token, "zero": torch.zeros_like(quantities.grad_token),
            }.get(target)


def default_specs(k: int, names: Optional[Iterable[str]] = None) -> Dict[str, dict]:
    """One spec per single-sequence registered estimator; top-k ones use ``k``."""
    specs = {}
    for entry in est.REGISTRY.values():
        if entry.group or (names is not None and entry.name not in names):
            continue
        spec = {"name": entry.name}
        if "k" in entry.defaults:
            spec["k"] = k
        specs[entry.name] = spec
    return specs


def analyse(tree, k: int = 2, names: Optional[Iterable[str]] = None, method: str = "dp") -> dict:
    """Exact J, and for every applicable estimator its mean, variance and bias (plain floats).

    ``method`` is "dp" (vopd_analysis.dp, any layered environment) or "enumerate"
    (all V^H sequences, prefix trees only). The JSON shape of ``vopd exact``:
    {"sequence_kl", "estimators": {name: {"mean_gradient", "total_variance",
    "bias_token", "bias_sequence", ...}}} with absolute L2 biases.
    """
    est._check_k(k, tree.vocab, "--k")
    tq = tree_quantities(tree)
    if method == "dp":
        from .dp import dp_moments
        moments = dp_moments(tree, default_specs(k, names), tq)
    elif method == "enumerate":
        moments = exact_moments(tree, default_specs(k, names), quantities=tq)
    else:
        raise InputError(f"unknown exact method '{method}'; choose 'dp' or 'enumerate'")
    result = {"vocab": tree.vocab, "horizon": tree.horizon, "k": k, "method": method, "sequence_kl": tq.sequence_kl,
              "grad_sequence_norm": float(torch.linalg.norm(tq.grad_sequence)),
              "grad_token_norm": float(torch.linalg.norm(tq.grad_token)), "estimators": {}}
    for name, m in moments.items():
        entry = est.get(name)
        result["estimators"][name] = {
            "unbiased_for": entry.target_for(**({"k": k} if "k" in entry.defaults else {})),
            "mean_gradient": m.mean.reshape(-1).tolist(),
            "total_variance": m.total_variance,
            "position_variance": m.position_variance.tolist(),
            "bias_token": bias_report(m.mean, tq.grad_token)["l2"],
            "bias_sequence": bias_report(m.mean, tq.grad_sequence)["l2"],
        }
    return result


def exact_group_moments(tree: PrefixTree, name: str, max_tuples: int = 1 << 16, **params) -> Moments:
    """Exact moments of a group estimator (K rollouts per prompt) by enumerating all N^K tuples.

    One draw is (1/K) times the gradient of the K per-sequence surrogates of a
    tuple of K independent sequences; its probability is the product of theirs.
    """
    entry = est.get(name)
    params = entry.params(**params)
    K = params["group_size"]
    n_tuples = tree.num_sequences ** K
    if n_tuples > max_tuples:
        raise InputError(f"'{name}' with K={K} on V^H = {tree.num_sequences} sequences has {n_tuples:,} "
                         f"K-tuples, more than {max_tuples:,}; use the Monte Carlo path")
    tq = tree_quantities(tree)
    seq = tree.sequences()
    index = torch.cartesian_prod(*[torch.arange(tree.num_sequences)] * K).reshape(n_tuples, K)
    tokens = seq[index.reshape(-1)]
    states = tree.state_ids(tokens)
    theta = torch.as_tensor(tree.student_logits, dtype=torch.float64)
    z = theta[states].clone().requires_grad_(True)
    est.per_sequence(name, tree.token_batch(tokens, z), **params).sum().backward()
    log_prob = tq.log_q[states].gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
    prob = log_prob.reshape(n_tuples, K).sum(-1).exp()
    draws = torch.zeros(n_tuples, tree.num_states, tree.vocab, dtype=torch.float64)
    rows = (torch.arange(n_tuples * K) // K).unsqueeze(1).expand_as(states)
    draws.index_put_((rows, states), z.grad / K, accumulate=True)
    draws = draws.reshape(n_tuples, -1)
    mean = (prob[:, None] * draws).sum(0)
    variance = float((prob * (draws ** 2).sum(-1)).sum() - (mean ** 2).sum())
    return Moments(mean.reshape(tree.num_states, tree.vocab), variance, None)
