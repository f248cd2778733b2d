"""Markov-state autoregressive environments: the state at position t is (t, y_{t-1}).

Where a prefix tree has V^t states at depth t, here there are V (one at t = 0),
so S = 1 + (H - 1) V states and the exact dynamic programme of
``vopd_analysis.tabular.dp`` costs O(H V^2): horizons of hundreds stay exact. The state
of position t >= 1 after token v has index 1 + (t - 1) V + v. Positions of one
sequence are distinct states (they differ in t), as on a prefix tree.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from vopd_analysis.errors import InputError
from .tree import PrefixTree, _base_logits, check_size, level_offset, num_states


def markov_num_states(vocab: int, horizon: int) -> int:
    """S = 1 + (H - 1) V: the root (t = 0) and one state per (t, previous token) for t = 1..H-1."""
    return 1 + (horizon - 1) * vocab


@dataclasses.dataclass(frozen=True)
class MarkovChain:
    """Student and teacher logit tables on the states (t, previous token) of a Markov chain.

    Exposes the layered-environment interface of ``vopd_analysis.tabular.targets.tree_quantities``
    and ``vopd_analysis.tabular.dp.dp_moments`` (``vocab``, ``horizon``, ``num_states``, the
    tables, ``level(t)``, ``children(t)``); the engines that sample or enumerate sequences
    take a ``PrefixTree``, which ``to_tree`` writes out. Construction raises ``InputError``
    unless both tables are finite [S, V] numpy arrays.

    Attributes:
      vocab: V >= 2.
      horizon: H >= 1.
      student_logits: student logits, [1 + (H - 1) V, V]; row 0 is the root, row
        1 + (t - 1) V + v the state of position t after token v.
      teacher_logits: teacher logits, same shape and order.
    """

    vocab: int
    horizon: int
    student_logits: np.ndarray
    teacher_logits: np.ndarray

    def __post_init__(self):
        check_size(self.vocab, self.horizon)
        shape = (self.num_states, self.vocab)
        for name in ("student_logits", "teacher_logits"):
            table = getattr(self, name)
            if not isinstance(table, np.ndarray) or table.shape != shape:
                raise InputError(f"{name} must have shape [1 + (H-1) V, V] = {list(shape)}, "
                                 f"got {getattr(table, 'shape', None)}")
            if not np.all(np.isfinite(table)):
                raise InputError(f"{name} contains NaN or inf")

    @property
    def num_states(self) -> int:
        """S = 1 + (H - 1) V."""
        return markov_num_states(self.vocab, self.horizon)

    def level(self, t: int) -> slice:
        """The states of position t: [0, 1) for t = 0, else [1 + (t - 1) V, 1 + t V)."""
        return slice(0, 1) if t == 0 else slice(1 + (t - 1) * self.vocab, 1 + t * self.vocab)

    def children(self, t: int) -> torch.Tensor:
        """Next states: children[i, v] = 1 + t V + v, the same for every state i of position t.

        Args:
          t: the position, 0 <= t < H - 1.

        Returns:
          [n_t, V] long tensor, n_t = 1 at t = 0 and V after.
        """
        n = 1 if t == 0 else self.vocab
        return (1 + t * self.vocab + torch.arange(self.vocab)).expand(n, self.vocab).clone()

    def to_tree(self) -> PrefixTree:
        """The same distributions written out as a ``PrefixTree`` (V^t copies of each row of position t).

        For checking the DP against enumeration, and for the engines that need a tree; it has
        (V^H - 1) / (V - 1) states, so only for small V^H.
        """
        return PrefixTree(self.vocab, self.horizon, self.student_logits[self.tree_to_markov()],
                          self.teacher_logits[self.tree_to_markov()])

    def tree_to_markov(self) -> np.ndarray:
        """The Markov state of every prefix-tree state: (t, last token of the prefix).

        Returns:
          [(V^H - 1) / (V - 1)] int64 numpy array: 0 for the root, 1 + (t - 1) V + (last token)
          for a prefix of length t >= 1, in prefix-tree order.
        """
        V = self.vocab
        index = [np.zeros(1, dtype=np.int64)]
        for t in range(1, self.horizon):
            index.append(1 + (t - 1) * V + np.arange(V ** t) % V)
        mapping = np.concatenate(index)
        assert mapping.shape[0] == num_states(V, self.horizon) and level_offset(V, 1) == 1
        return mapping


def make_markov(vocab: int = 4, horizon: int = 50, *, teacher_temperature: float = 1.0,
                teacher_shape: str = "gaussian", zipf_exponent: float = 1.5, divergence: float = 1.0,
                coupling: float = 1.0, seed: int = 0) -> MarkovChain:
    """A random Markov chain with the knobs of ``synthetic.tree.make_tree``.

    Teacher logits at (t, v): (u_t + kappa c_t(v)) / temperature; student: teacher
    + delta (n_t + kappa c'_t(v)). kappa couples each distribution to the previous
    token; at kappa = 0 the future does not depend on the sampled token.

    Args:
      vocab: V >= 2.
      horizon: H >= 1 (hundreds are fine for the DP).
      teacher_temperature, teacher_shape, zipf_exponent, divergence: as in ``make_tree``.
      coupling: kappa (default 1.0, unlike ``make_tree``'s 0.0).
      seed: seed of the numpy generator that draws every random term.

    Returns:
      The ``MarkovChain`` (float64 tables, [1 + (H - 1) V, V] each).
    """
    check_size(vocab, horizon)
    if teacher_temperature <= 0:
        raise InputError(f"teacher_temperature must be positive, got {teacher_temperature}")
    rng = np.random.default_rng(seed)
    S = markov_num_states(vocab, horizon)
    depth = np.concatenate([[0], np.repeat(np.arange(1, horizon), vocab)])
    base = np.stack([_base_logits(rng, vocab, teacher_shape, zipf_exponent) for _ in range(horizon)])
    noise = rng.standard_normal((horizon, vocab))
    teacher = (base[depth] + coupling * rng.standard_normal((S, vocab))) / teacher_temperature
    student = teacher + divergence * (noise[depth] + coupling * rng.standard_normal((S, vocab)))
    return MarkovChain(vocab, horizon, student, teacher)
