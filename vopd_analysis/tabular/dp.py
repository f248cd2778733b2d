"""Exact estimator moments by dynamic programming over a layered environment.

Every single-sequence estimator's gradient at position t, in the logit block of
the state s = s_t with sampled token y = y_t and score e_y - q_s, is

    g_t = G1(s, y) + (a P_t + c F_t) (e_y - q_s),
    P_t = sum_{t'<t} l_t',   F_t = sum_{t'>t} gamma^(t'-t) l_t',

where G1(s, y) is the estimator's gradient on the one-token sequence y at s
(taken from the registry itself, with the oracle fields W(s), W(s + .) filled in)
and (a, c, gamma) is its ``credit``. The past P_t and the future (y, F_t) are
independent given s, so with the forward moments m_k(s) = E[P_t^k | s], the
backward moments L_k(s) = E[(sum_{t'>=t} gamma^(t'-t) l_t')^k | s], and
Phi_k(s, y) = gamma^k L_k(s + y):

    E[g_t]      = sum_s d(s) sum_y q_y [G1 + (a m1 + c Phi1) (e_y - q)]
    E|g_t|^2    = sum_s d(s) sum_y q_y [|G1|^2 + 2 (a m1 + c Phi1) G1.(e_y - q)
                                         + (a^2 m2 + 2 a c m1 Phi1 + c^2 Phi2) |e_y - q|^2]

Positions touch distinct states, so tr Cov = sum_t (E|g_t|^2 - |E g_t|^2).
Cost O(S V^2) instead of O(V^H H V): exact for Markov chains with horizons of
hundreds, and far faster than enumeration on prefix trees.
"""

from __future__ import annotations

from typing import Dict

import torch

from .. import estimators as est
from ..batch import TokenBatch
from ..errors import InputError
from .targets import Moments, TreeQuantities, tree_quantities

DEFAULT_CHUNK_ROWS = 1 << 16


def past_moments(env, tq: TreeQuantities) -> tuple:
    """m1(s) = E[P_t | s_t = s] and m2(s) = E[P_t^2 | s], P_t = sum_{t'<t} l_t' (forward sweep)."""
    S = env.num_states
    q = tq.log_q.exp()
    l = tq.log_q - tq.log_p
    mass1, mass2 = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    for t in range(env.horizon - 1):
        lv, kids = env.level(t), env.children(t).reshape(-1)
        flow = tq.reach[lv, None] * q[lv]                 # probability of taking v at s
        m1, m2 = mass1[lv, None] / tq.reach[lv, None].clamp_min(1e-300), mass2[lv, None] / tq.reach[lv, None].clamp_min(1e-300)
        mass1.index_add_(0, kids, (flow * (m1 + l[lv])).reshape(-1))
        mass2.index_add_(0, kids, (flow * (m2 + 2 * m1 * l[lv] + l[lv] ** 2)).reshape(-1))
    reach = tq.reach.clamp_min(1e-300)
    return mass1 / reach, mass2 / reach


def future_moments(env, tq: TreeQuantities, gamma: float) -> tuple:
    """Phi_k(s, y) = gamma^k E[(sum_{t'>=t+1} gamma^(t'-t-1) l_t')^k | s_{t+1} = s + y], k = 1, 2. [S, V] each"""
    S, V = env.num_states, env.vocab
    q = tq.log_q.exp()
    l = tq.log_q - tq.log_p
    L1, L2 = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    phi1, phi2 = torch.zeros(S, V, dtype=torch.float64), torch.zeros(S, V, dtype=torch.float64)
    for t in reversed(range(env.horizon)):
        lv = env.level(t)
        if t + 1 < env.horizon:
            kids = env.children(t)
            phi1[lv], phi2[lv] = gamma * L1[kids], gamma ** 2 * L2[kids]
        L1[lv] = (q[lv] * (l[lv] + phi1[lv])).sum(-1)
        L2[lv] = (q[lv] * (l[lv] ** 2 + 2 * l[lv] * phi1[lv] + phi2[lv])).sum(-1)
    return phi1, phi2


def local_gradients(env, tq: TreeQuantities, name: str, params: dict, rows: torch.Tensor) -> torch.Tensor:
    """G1(s, y) for the states ``rows``: the registry estimator on every one-token sequence. [n, V(y), V]"""
    V = env.vocab
    n = rows.shape[0]
    states = rows.repeat_interleave(V)
    tokens = torch.arange(V).repeat(n).unsqueeze(1)
    theta = torch.as_tensor(env.student_logits, dtype=torch.float64)
    teacher = torch.as_tensor(env.teacher_logits, dtype=torch.float64)[states].unsqueeze(1)
    z = theta[states].unsqueeze(1).clone().requires_grad_(True)
    batch = TokenBatch(tokens=tokens, mask=torch.ones(n * V, 1, dtype=torch.float64), student_logits=z,
                           teacher_token_logprobs=tq.log_p[states, tokens[:, 0]].unsqueeze(1), teacher_logits=teacher,
                           kl_to_go=tq.kl_to_go[states].unsqueeze(1),
                           next_kl_to_go=tq.next_kl_to_go[states].unsqueeze(1))
    est.per_sequence(name, batch, validate=False, **params).sum().backward()
    return z.grad.reshape(n, V, V)


def dp_moments(env, specs: Dict[str, dict], quantities: TreeQuantities = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Dict[str, Moments]:
    """Exact moments of several estimators, ``specs`` = {label: {"name": estimator, **params}}."""
    tq = quantities or tree_quantities(env)
    S, V, H = env.num_states, env.vocab, env.horizon
    q = tq.log_q.exp()
    m1, m2 = past_moments(env, tq)
    depth = torch.empty(S, dtype=torch.long)
    for t in range(H):
        depth[env.level(t)] = t
    eye = torch.eye(V, dtype=torch.float64)
    futures = {}
    out = {}
    for label, spec in specs.items():
        entry = est.get(spec["name"])
        if entry.group:
            raise InputError(f"'{label}': group estimator '{entry.name}' has no single-sequence DP; "
                             "use enumeration.exact_group_moments")
        params = entry.params(**{k: v for k, v in spec.items() if k != "name"})
        credit = entry.credit_for(**params)
        if credit is None:
            raise InputError(f"'{label}': estimator '{entry.name}' has a position-t gradient that depends on "
                             "the whole sequence (position weights or token selection): no DP; use tabular.enumeration")
        a, c, gamma = credit
        if c and gamma not in futures:
            futures[gamma] = future_moments(env, tq, gamma)
        mean = torch.zeros(S, V, dtype=torch.float64)
        second = torch.zeros(H, dtype=torch.float64)
        step = max(1, chunk_rows // (V * V))
        for start in range(0, S, step):
            rows = torch.arange(start, min(S, start + step))
            g1 = local_gradients(env, tq, entry.name, params, rows)          # [n, y, V]
            score = eye.unsqueeze(0) - q[rows].unsqueeze(1)                     # [n, y, V]: e_y - q
            w = (score ** 2).sum(-1)                                             # [n, y]
            coef = a * m1[rows, None].expand(-1, V)
            quad = a * a * m2[rows, None].expand(-1, V)
            if c:
                phi1, phi2 = futures[gamma][0][rows], futures[gamma][1][rows]
                coef = coef + c * phi1
                quad = quad + 2 * a * c * m1[rows, None] * phi1 + c * c * phi2
            qy = q[rows]
            mean[rows] = tq.reach[rows, None] * (qy[..., None] * (g1 + coef[..., None] * score)).sum(1)
            per_state = (qy * ((g1 ** 2).sum(-1) + 2 * coef * (g1 * score).sum(-1) + quad * w)).sum(1)
            second.index_add_(0, depth[rows], tq.reach[rows] * per_state)
        level_norms = torch.stack([(mean[env.level(t)] ** 2).sum() for t in range(H)])
        position = (second - level_norms).clamp_min(0.0).numpy()
        out[label] = Moments(mean, float(position.sum()), position)
    return out
