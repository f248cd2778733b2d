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

from vopd_analysis.batch import TokenBatch
from vopd_analysis.errors import InputError

from .tree import (
    GENERATION_COPIES,
    PrefixTree,
    _base_logits,
    check_generated,
    check_knobs,
    check_logit_values,
    check_memory,
    check_size,
    env_token_batch,
    level_offset,
    num_states,
)


def markov_num_states(vocab: int, horizon: int) -> int:
    """S = 1 + (H - 1) V: the root (t = 0) and one state per (t, previous token) for t = 1..H-1."""
    return 1 + (horizon - 1) * vocab


@dataclasses.dataclass(frozen=True)
class MarkovChain:
    """Student and teacher logit tables on the states (t, previous token) of a Markov chain.

    Exposes the layered-environment interface of ``vopd_analysis.tabular.targets.tree_quantities``
    and ``vopd_analysis.tabular.dp.dp_moments`` (``vocab``, ``horizon``, ``num_states``, the
    tables, ``level(t)``, ``children(t)``); the engines that sample or enumerate sequences
    take a ``PrefixTree``, which ``to_tree`` writes out; the Monte Carlo path samples the chain
    itself (``sample``, ``state_ids``, ``token_batch``, parameters = the Markov tables).
    Construction raises ``InputError`` unless both tables are finite numeric [S, V] numpy arrays;
    ``make_markov`` also refuses rows that span more than ``synthetic.tree.MAX_LOGIT_SPREAD``.

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
            check_logit_values(name, table)

    @property
    def num_states(self) -> int:
        """S = 1 + (H - 1) V."""
        return markov_num_states(self.vocab, self.horizon)

    @property
    def num_sequences(self) -> int:
        """V^H, the number of complete sequences."""
        return self.vocab ** self.horizon

    def state_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """The Markov state of every position: 0 at t = 0, 1 + (t - 1) V + y_{t-1} after.

        Args:
          tokens: sequences, [N, H] long, ids in [0, V).

        Returns:
          [N, H] long.
        """
        ids = torch.zeros_like(tokens)
        ids[:, 1:] = 1 + torch.arange(tokens.shape[1] - 1) * self.vocab + tokens[:, :-1]
        return ids

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw n sequences y ~ pi_theta from the student by ancestral sampling.

        Args:
          n: number of sequences.
          generator: the torch generator the draws come from.

        Returns:
          tokens, [n, H] long.
        """
        probs = torch.softmax(torch.as_tensor(self.student_logits), -1)
        tokens = torch.zeros(n, self.horizon, dtype=torch.long)
        for t in range(self.horizon):
            states = torch.zeros(n, dtype=torch.long) if t == 0 else 1 + (t - 1) * self.vocab + tokens[:, t - 1]
            tokens[:, t] = torch.multinomial(probs[states], 1, generator=generator).squeeze(1)
        return tokens

    def token_batch(self, tokens: torch.Tensor, student_logits: torch.Tensor, kl_to_go=None,
                    next_kl_to_go=None) -> TokenBatch:
        """The TokenBatch of the sequences ``tokens`` (``synthetic.tree.env_token_batch``)."""
        return env_token_batch(self, tokens, student_logits, kl_to_go, next_kl_to_go)

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
    check_knobs(teacher_temperature, divergence, coupling, zipf_exponent, seed)
    check_size(vocab, horizon)
    S = markov_num_states(vocab, horizon)
    check_memory(S, vocab, GENERATION_COPIES, "generating the tables")
    rng = np.random.default_rng(seed)
    depth = np.concatenate([[0], np.repeat(np.arange(1, horizon), vocab)])
    base = np.stack([_base_logits(rng, vocab, teacher_shape, zipf_exponent) for _ in range(horizon)])
    noise = rng.standard_normal((horizon, vocab))
    teacher = (base[depth] + coupling * rng.standard_normal((S, vocab))) / teacher_temperature
    student = teacher + divergence * (noise[depth] + coupling * rng.standard_normal((S, vocab)))
    check_generated(student, teacher)
    return MarkovChain(vocab, horizon, student, teacher)
