"""Plain SGD on a tabular student (theta = the logit table of a prefix tree) with any estimator.

Each step samples ``batch_size`` sequences from the current student
(PrefixTree.sample), gathers theta[states] from the leaf table, builds the
TokenBatch with tree.token_batch, calls ``surrogate_loss(...).backward()`` (sum
over tokens, mean over sequences) and updates theta -= lr * grad. The exact
sequence reverse KL J(theta) is recorded every ``eval_every`` steps. A run is
*unstable* when J becomes non-finite or exceeds ``diverge_factor`` times its
initial value J0 (it stops there; later evaluations are NaN), or when it ends
no lower than J0 (e.g. a student collapsed onto a wrong token, where the
gradient vanishes and J stays high but finite). The tables are
tiny, so the loop runs torch single-threaded (restored on exit): on a busy
2-core machine intra-op threads made each step ~15x slower.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from synthetic.tree import PrefixTree

from .. import estimators as est
from .targets import tree_quantities


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The outcome of one ``train`` run.

    Attributes:
      curve: columns ``step`` and ``J``: J0 at step 0, then every ``eval_every`` steps and at
        the last step; after a divergence the remaining evaluation steps are NaN.
      stable: no divergence and final J < J0.
      initial_J: J0, the exact sequence reverse KL of the initial student.
      final_J: the last J if stable, else NaN.
      diverged_at: the step at which J became non-finite or exceeded ``diverge_factor`` J0, or None.
    """

    curve: pd.DataFrame      # columns: step, J (NaN after a divergence)
    stable: bool
    initial_J: float
    final_J: float           # NaN if unstable
    diverged_at: int | None  # step at which instability was detected


def exact_J(tree: PrefixTree, theta: torch.Tensor) -> float:
    """J(theta) = E_{y ~ pi_theta}[sum_t log pi_theta(y_t|s_t) - log pi_T(y_t|s_t)], exactly.

    Args:
      tree: gives the teacher table and the layout.
      theta: the student logit table, [S, V].

    Returns:
      The sequence-level reverse KL in nats (``tree_quantities(...).sequence_kl``).
    """
    return tree_quantities(tree.with_student(theta.detach().numpy())).sequence_kl


def train(tree: PrefixTree, estimator: str, lr: float, steps: int, batch_size: int, seed: int,
          eval_every: int = 1, diverge_factor: float = 1.5, **params) -> TrainResult:
    """Train the student logit table of ``tree`` by plain SGD with ``estimator``, recording the exact J.

    Each step draws ``batch_size`` sequences from the current student and updates
    theta <- theta - lr grad_theta L, L = ``surrogate_loss(estimator, batch, **params)``
    (sum over tokens, mean over sequences). It stops early when J is non-finite or exceeds
    ``diverge_factor`` J0.

    Args:
      tree: the environment; its student table is the initial theta.
      estimator: a registered estimator name.
      lr: the learning rate.
      steps: the number of SGD steps.
      batch_size: sequences per step.
      seed: seed of the torch generator that draws the sequences.
      eval_every: steps between evaluations of the exact J (the last step is always evaluated).
      diverge_factor: J > diverge_factor J0 counts as a divergence.
      **params: the estimator's parameters (``k``, ``gamma``, ...; registry defaults for the rest).

    Returns:
      A ``TrainResult``.
    """
    params = est.get(estimator).params(**params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(tree, estimator, lr, steps, batch_size, seed, eval_every, diverge_factor, params)
    finally:
        torch.set_num_threads(threads)


def _train(tree, estimator, lr, steps, batch_size, seed, eval_every, diverge_factor, params) -> TrainResult:
    generator = torch.Generator().manual_seed(seed)
    theta = torch.tensor(tree.student_logits, dtype=torch.float64, requires_grad=True)
    J0 = exact_J(tree, theta)
    steps_rec, values = [0], [J0]
    diverged_at = None
    for step in range(1, steps + 1):
        current = tree.with_student(theta.detach().numpy())
        tokens = current.sample(batch_size, generator)
        batch = current.token_batch(tokens, theta[current.state_ids(tokens)])
        theta.grad = None
        est.surrogate_loss(estimator, batch, **params).backward()
        with torch.no_grad():
            theta -= lr * theta.grad
        finite = bool(torch.isfinite(theta).all())
        if step % eval_every == 0 or step == steps or not finite:
            J = exact_J(tree, theta) if finite else float("nan")
            steps_rec.append(step)
            values.append(J)
            if not np.isfinite(J) or J > diverge_factor * J0:
                diverged_at = step
                break
    curve = pd.DataFrame({"step": steps_rec, "J": values})
    if diverged_at is not None:
        missing = [s for s in range(eval_every, steps + 1, eval_every) if s > diverged_at]
        curve = pd.concat([curve, pd.DataFrame({"step": missing, "J": np.nan})], ignore_index=True)
    stable = diverged_at is None and values[-1] < J0
    return TrainResult(curve, stable, J0, values[-1] if stable else float("nan"), diverged_at)
