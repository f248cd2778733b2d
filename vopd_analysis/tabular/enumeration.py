"""Exact estimator moments on prefix trees by enumerating all V^H sequences.

The targets they are compared with are in ``targets``. Estimator moments: all V^H sequences are scored as one batch (in chunks), with
the student logits at every visited position as one leaf tensor Z [N, H, V].
One backward pass of the summed per-sequence surrogates gives each sequence's
gradient with respect to its own positions (sequences share no leaves), which
is folded into parameter space by scattering onto the visited states
(scatter(dZ_n)[s] = sum_t 1[s_{n,t} = s] dZ_{n,t}, ``targets.fold_onto_states``;
``exact_moments`` adds up the probability-weighted scatters chunk by chunk
without holding one [S, V] table per sequence). On a prefix tree the positions
of one sequence are distinct states, so

    E g            = sum_n P(y_n) scatter(dZ_n)
    tr Cov(g)      = sum_t [ sum_n P(y_n) |dZ_{n,t}|^2 - |E g restricted to level t|^2 ].
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Optional

import torch

from synthetic.tree import PrefixTree, check_enumerable, level_offset

from .. import estimators as est
from ..errors import InputError
from .targets import Moments, TreeQuantities, fold_onto_states, tree_quantities

DEFAULT_CHUNK = 1 << 15


def _chunks(n: int, size: int) -> Iterable[tuple]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def exact_moments(tree: PrefixTree, specs: Dict[str, dict], chunk_size: int = DEFAULT_CHUNK,
                  quantities: Optional[TreeQuantities] = None) -> Dict[str, Moments]:
    """Exact moments of several single-sequence estimators (see the module docstring).

    Streams over the V^H sequences in chunks; memory is O(chunk * H * V + S * V).

    Args:
      tree: an enumerable prefix tree.
      specs: {label: {"name": estimator, **params}}; group estimators are refused.
      chunk_size: sequences per chunk.
      quantities: the tree's ``tree_quantities``, if already computed.

    Returns:
      {label: ``Moments``}: mean [S, V], tr Cov and the per-position variance [H].
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
            est.per_sequence(spec["name"], batch, validate=False, **params).sum().backward()
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

    Returns:
      ``Moments`` with mean [S, V], tr Cov, and no per-position variance.
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
        (grad,) = torch.autograd.grad(est.per_sequence(name, batch, validate=False, **params).sum(), theta)
        prob = float(tq.log_q[states[0], tokens[0]].sum().exp())
        mean += prob * grad
        second += prob * float((grad ** 2).sum())
    return Moments(mean, second - float((mean ** 2).sum()), None)


def exact_group_moments(tree: PrefixTree, name: str, max_tuples: int = 1 << 16, **params) -> Moments:
    """Exact moments of a group estimator (K rollouts per prompt) by enumerating all N^K tuples.

    One draw is (1/K) times the gradient of the K per-sequence surrogates of a
    tuple of K independent sequences (``targets.fold_onto_states``); its probability
    is the product of theirs.

    Args:
      tree: an enumerable prefix tree with N = V^H sequences.
      name: the group estimator; ``params`` its parameters (``group_size`` = K).
      max_tuples: refuse (``InputError``) more than this many K-tuples.

    Returns:
      ``Moments`` with mean [S, V], tr Cov, and no per-position variance.
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
    est.per_sequence(name, tree.token_batch(tokens, z), validate=False, **params).sum().backward()
    log_prob = tq.log_q[states].gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
    prob = log_prob.reshape(n_tuples, K).sum(-1).exp()
    draws = fold_onto_states(z.grad, states, tree.num_states, K).reshape(n_tuples, -1)
    mean = (prob[:, None] * draws).sum(0)
    variance = float((prob * (draws ** 2).sum(-1)).sum() - (mean ** 2).sum())
    return Moments(mean.reshape(tree.num_states, tree.vocab), variance, None)
