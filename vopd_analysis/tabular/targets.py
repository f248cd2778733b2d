"""Exact targets on a layered environment (prefix tree or Markov chain), and the moment record.

In logit space (theta = the student logit table, d(s) the probability of
reaching s, q_s = pi(.|s), l_s = log q_s - log p_s, KL_s = <q_s, l_s>):

    W(s)        = KL_s + sum_v q_s[v] W(s + v)                 KL-to-go, W = 0 past the horizon
    J           = W(root)                                       sequence-level reverse KL
    grad J[s]   = d(s) q_s * (C_s - W(s)),  C_s[v] = l_s[v] + W(s + v)
    g_tok[s]    = d(s) q_s * (l_s - KL_s)                       token-level OPD target
    g_fwd[s]    = d(s) (q_s - p_s)                              token-level forward-KL gradient

``Moments`` is what both exact engines (``enumeration`` and ``dp``) return.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch


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


def fold_onto_states(grad: torch.Tensor, states: torch.Tensor, num_states: int, group_size: int = 1) -> torch.Tensor:
    """Per-draw gradients in parameter space (the logit table theta [S, V]) from per-position ones.

    A batch built on Z = theta[states] has d/dZ_{j,t} = the gradient with respect to the row of
    the state s_{j,t} that sequence j visits at position t, so draw i, made of the K consecutive
    sequences j = iK .. iK + K - 1, has the gradient

        G_i[s] = (1/K) sum_{j = iK}^{iK + K - 1} sum_t 1[s_{j,t} = s] dZ_{j,t}.

    Args:
      grad: [n K, H, V] gradient of the summed per-sequence surrogates with respect to Z.
      states: [n K, H] long, the state ids s_{j,t}.
      num_states: S.
      group_size: K (1: one draw per sequence).

    Returns:
      [n, S, V] in ``grad``'s dtype.
    """
    n = grad.shape[0] // group_size
    dense = torch.zeros(n, num_states, grad.shape[-1], dtype=grad.dtype)
    rows = (torch.arange(n * group_size) // group_size).unsqueeze(1).expand_as(states)
    dense.index_put_((rows, states), grad / group_size, accumulate=True)
    return dense


@dataclasses.dataclass(frozen=True)
class Moments:
    """Exact mean gradient [S, V], total variance tr Cov, per-position variance [H] (None for groups)."""

    mean: torch.Tensor
    total_variance: float
    position_variance: Optional[np.ndarray]

    def mse(self, target: torch.Tensor, batch_size: int) -> float:
        """MSE of a batch-B mean gradient against ``target``: |bias|^2 + tr Cov / B."""
        return float(((self.mean - target) ** 2).sum()) + self.total_variance / batch_size


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
