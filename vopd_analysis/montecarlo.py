"""Monte Carlo side: estimator draws from sampled sequences, moments, and a test of unbiasedness.

For trees too large to enumerate (and as a check on the exact engine), draw n
sequences from the student, compute each one's estimator gradient in
parameter space, and test H0: E g = g* along m + 1 fixed unit directions u_j
(the target's own direction and m seeded Gaussian ones, all independent of the
draws) with one-sample t-tests,

    t_j = sqrt(n) |mean_i u_j.(g_i - g*)| / sd_i(u_j.g_i),   p = min(1, (m + 1) min_j p_j)

(Bonferroni). Random directions mix every coordinate, so rarely visited states
(whose coordinates have almost no sampled variance) cannot inflate the
statistic the way an inverted sample covariance would; the target direction
catches a pure rescaling such as the (K-1)/K of a group-mean baseline. Draws
without any variance (a deterministic estimator) reject iff they miss the
target beyond round-off. The false-positive rate at ``alpha`` is checked in
tests/test_montecarlo.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy import stats

from synthetic.tree import PrefixTree
from . import estimators as est
from .batch import InputError
from .exact import tree_quantities


def sample_gradients(tree: PrefixTree, name: str, n: int, seed: int, **params) -> np.ndarray:
    """n independent draws of estimator ``name`` in parameter space, [n, S*V] float64.

    A group estimator (K rollouts per prompt) gives one draw per group of K
    sampled sequences: (1/K) times the gradient of its K per-sequence surrogates.
    """
    entry = est.get(name)
    params = entry.params(**params)
    group = params.get("group_size", 1) if entry.group else 1
    if n < 1:
        raise InputError(f"need at least one sample, got n={n}")
    generator = torch.Generator().manual_seed(seed)
    tokens = tree.sample(n * group, generator)
    states = tree.state_ids(tokens)
    theta = torch.as_tensor(tree.student_logits, dtype=torch.float64)
    z = theta[states].clone().requires_grad_(True)
    tq = tree_quantities(tree) if entry.analysis_only else None
    batch = tree.token_batch(tokens, z, *((tq.kl_to_go, tq.next_kl_to_go) if tq else ()))
    est.per_sequence(name, batch, **params).sum().backward()
    dense = torch.zeros(n, tree.num_states, tree.vocab, dtype=torch.float64)
    rows = (torch.arange(n * group) // group).unsqueeze(1).expand_as(states)
    dense.index_put_((rows, states), z.grad / group, accumulate=True)
    return dense.reshape(n, -1).numpy()


def trace_covariance(samples: np.ndarray) -> float:
    """Unbiased tr Cov: sum_i |x_i - xbar|^2 / (n - 1)."""
    centred = samples - samples.mean(0)
    return float((centred ** 2).sum() / (samples.shape[0] - 1))


def trace_covariance_ci(samples: np.ndarray, confidence: float = 0.95, n_resamples: int = 999,
                        seed: int = 0) -> tuple:
    """Bootstrap (BCa) confidence interval of tr Cov over the draws."""
    index = np.arange(samples.shape[0])
    result = stats.bootstrap((index,), lambda i: trace_covariance(samples[i]), vectorized=False,
                             confidence_level=confidence, n_resamples=n_resamples,
                             random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclasses.dataclass(frozen=True)
class TestResult:
    statistic: float   # max_j |t_j| over the tested directions (inf: a deterministic miss)
    p_value: float     # Bonferroni-adjusted
    directions: int
    alpha: float

    @property
    def reject(self) -> bool:
        return self.p_value < self.alpha


def unbiasedness_test(samples: np.ndarray, target: np.ndarray, alpha: float = 0.05,
                      n_directions: int = 16, seed: int = 0, atol: float = 1e-9) -> TestResult:
    """Test H0: E[samples] = target at level ``alpha`` (see the module docstring)."""
    x = np.asarray(samples, dtype=np.float64) - np.asarray(target, dtype=np.float64).reshape(1, -1)
    n = x.shape[0]
    if n < 3:
        raise InputError(f"the unbiasedness test needs at least 3 draws, got {n}")
    directions = np.random.default_rng(seed).standard_normal((x.shape[1], n_directions))
    target_norm = np.linalg.norm(target)
    if target_norm > 0:
        directions = np.concatenate([np.reshape(target, (-1, 1)) / target_norm, directions], axis=1)
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    y = x @ directions
    mean, sd = y.mean(0), y.std(0, ddof=1)
    m = directions.shape[1]
    scale = 1.0 + float(np.abs(np.asarray(target)).max())
    if np.all(sd <= atol * scale):  # a deterministic estimator: any offset is a bias
        miss = bool(np.abs(x.mean(0)).max() > atol * scale)
        return TestResult(float("inf") if miss else 0.0, 0.0 if miss else 1.0, m, alpha)
    t = np.abs(mean) / np.maximum(sd, atol * scale) * np.sqrt(n)
    p = min(1.0, m * float(2.0 * stats.t.sf(t.max(), n - 1)))
    return TestResult(float(t.max()), p, m, alpha)
