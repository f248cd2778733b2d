"""Tabular autoregressive environments with exact ground truth: prefix trees.

A prefix tree of vocabulary V and horizon H has one state per prefix
(a_1..a_t), t = 0..H-1, with a student and a teacher logit vector each:

    S = sum_{t<H} V^t = (V^H - 1) / (V - 1) states,

ordered level by level (root first) and, within a level, lexicographically by
prefix: the prefix (a_1..a_t) read as a base-V number is its index in level t,
which starts at offset (V^t - 1) / (V - 1). The child of state i of level t by
token v is state i*V + v of level t+1. A bandit is the tree with H = 1.

The student parameters theta are the student logit table [S, V] itself, so the
parameter space and the logit space coincide (flattened state-major).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Optional

import numpy as np
import torch

from vopd_analysis.batch import TokenBatch
from vopd_analysis.errors import InputError

MAX_EXACT_SEQUENCES = 1 << 23   # enumeration (and Monte Carlo tests against exact targets)
MAX_DP_STATES = 1 << 22         # dynamic programming on a prefix tree
# Largest max - min logit of one table row. The engines compute in float64, where a probability
# below e^-745 is 0 and k3's squared importance ratio (pi_T / pi)^2 overflows beyond e^709: at a
# spread of about 355 its variance is already inf. 300 keeps every estimator finite.
MAX_LOGIT_SPREAD = 300.0
GENERATION_COPIES = 4           # [S, V] float64 arrays alive while make_tree / make_markov draw a table


def power_exceeds(base: int, exponent: int, limit: int) -> bool:
    """Whether base^exponent > limit, without computing a huge power (base, exponent >= 1)."""
    if exponent * math.log(base) > math.log(limit) + 1.0:
        return True
    return base ** exponent > limit


def power_text(base: int, exponent: int) -> str:
    """base^exponent written out (with thousands separators) when short, else as about 10^k."""
    if exponent * math.log10(base) < 30:
        return f"{base ** exponent:,}"
    return f"about 10^{exponent * math.log10(base):,.0f}"


def memory_limit_bytes() -> int:
    """The machine's physical memory (os.sysconf), or 64 GiB where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


def check_memory(states: int, vocab: int, copies: float, what: str) -> None:
    """Raise ``InputError`` with the estimate if ``copies`` float64 [S, V] tables exceed the physical memory.

    Args:
      states: S.  vocab: V.
      copies: how many [S, V] float64 arrays the work holds at once.
      what: the work, for the message ("generating the tables", "the exact engines").
    """
    table = states * vocab * 8
    need, have = copies * table, memory_limit_bytes()
    if need > have:
        raise InputError(f"{what} for S = {states:,} states and V = {vocab:,} would need about {need / 2**30:,.1f} GiB "
                         f"({copies:,.0f} float64 [S, V] arrays of {table / 2**30:,.1f} GiB each; the student and "
                         f"teacher tables alone take {2 * table / 2**30:,.1f} GiB), more than this machine's "
                         f"{have / 2**30:,.1f} GiB of memory; lower V or H")


def check_knobs(teacher_temperature: float, divergence: float, coupling: float, zipf_exponent: float,
                seed) -> None:
    """Raise ``InputError`` for a generator knob that cannot make a table: a temperature that is not
    positive and finite, a non-finite divergence, coupling or Zipf exponent, or a seed that is not
    a non-negative integer (numpy's generators take those only)."""
    if not (isinstance(teacher_temperature, numbers.Real) and 0 < teacher_temperature < math.inf):
        raise InputError(f"teacher_temperature must be a positive finite number, got {teacher_temperature!r}")
    for name, value in (("divergence", divergence), ("coupling", coupling), ("zipf_exponent", zipf_exponent)):
        if not (isinstance(value, numbers.Real) and math.isfinite(value)):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")


def num_states(vocab: int, horizon: int) -> int:
    """Number of states of a prefix tree: S = sum_{t<H} V^t = (V^H - 1) / (V - 1).

    Args:
      vocab: V >= 2.
      horizon: H >= 1.

    Returns:
      S, the number of prefixes of length 0..H-1.
    """
    return (vocab ** horizon - 1) // (vocab - 1)


def level_offset(vocab: int, t: int) -> int:
    """Global index of the first state of level t (prefixes of length t): (V^t - 1) / (V - 1).

    Args:
      vocab: V >= 2.
      t: the level, 0 <= t <= H (t = H gives S, one past the last state).

    Returns:
      The offset as an int.
    """
    return (vocab ** t - 1) // (vocab - 1)


@dataclasses.dataclass(frozen=True)
class PrefixTree:
    """Student and teacher logit tables on a prefix tree, states ordered as in the module docstring.

    Construction checks both tables (``check_tables``) and raises ``InputError`` if they are
    not finite [S, V] arrays. The student parameters theta are ``student_logits`` itself.

    Attributes:
      vocab: V >= 2.
      horizon: H >= 1 (a bandit has H = 1).
      student_logits: student logits, [S, V] float64 numpy array.
      teacher_logits: teacher logits, [S, V] float64 numpy array.
    """

    vocab: int
    horizon: int
    student_logits: np.ndarray
    teacher_logits: np.ndarray

    def __post_init__(self):
        check_tables(self.student_logits, self.teacher_logits, self.vocab, self.horizon)

    @property
    def num_states(self) -> int:
        """S = (V^H - 1) / (V - 1)."""
        return num_states(self.vocab, self.horizon)

    @property
    def num_sequences(self) -> int:
        """V^H, the number of complete sequences."""
        return self.vocab ** self.horizon

    def level(self, t: int) -> slice:
        """The global indices of the V^t states of level t (prefixes of length t), 0 <= t < H."""
        return slice(level_offset(self.vocab, t), level_offset(self.vocab, t + 1))

    def children(self, t: int) -> torch.Tensor:
        """Next states: children[i, v] = global index of (state i of level t) + v, for t < H - 1.

        Args:
          t: the level, 0 <= t < H - 1.

        Returns:
          [V^t, V] long tensor; row i is the i-th state of ``level(t)``, and
          children[i, v] = level_offset(V, t + 1) + i V + v.
        """
        n = self.vocab ** t
        return level_offset(self.vocab, t + 1) + torch.arange(n * self.vocab).reshape(n, self.vocab)

    def with_student(self, student_logits: np.ndarray) -> "PrefixTree":
        """The same tree with the student table replaced by ``student_logits`` [S, V] (as float64, checked)."""
        return dataclasses.replace(self, student_logits=np.asarray(student_logits, dtype=np.float64))

    def state_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global state index of every position, s_t = the prefix y_<t.

        Args:
          tokens: sequences, [N, H] long, ids in [0, V).

        Returns:
          [N, H] long: ids[n, t] = level_offset(V, t) + (y_1..y_t read as a base-V number).
        """
        V = self.vocab
        N, H = tokens.shape
        within = torch.zeros(N, dtype=torch.long)
        ids = torch.empty(N, H, dtype=torch.long)
        for t in range(H):
            ids[:, t] = level_offset(V, t) + within
            within = within * V + tokens[:, t]
        return ids

    def sequences(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The sequences numbered start..stop-1 in lexicographic order (sequence i = i in base V, y_1 first).

        Args:
          start: first sequence number, >= 0.
          stop: one past the last (default V^H).

        Returns:
          tokens, [stop - start, H] long.
        """
        stop = self.num_sequences if stop is None else stop
        index = torch.arange(start, stop, dtype=torch.long)
        digits = [(index // self.vocab ** (self.horizon - 1 - t)) % self.vocab for t in range(self.horizon)]
        return torch.stack(digits, dim=1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw n sequences y ~ pi_theta from the student by ancestral sampling.

        Args:
          n: number of sequences.
          generator: the torch generator the draws come from (the same seed gives the same draws).

        Returns:
          tokens, [n, H] long.
        """
        probs = torch.softmax(torch.as_tensor(self.student_logits), -1)
        tokens = torch.zeros(n, self.horizon, dtype=torch.long)
        within = torch.zeros(n, dtype=torch.long)
        for t in range(self.horizon):
            states = level_offset(self.vocab, t) + within
            tokens[:, t] = torch.multinomial(probs[states], 1, generator=generator).squeeze(1)
            within = within * self.vocab + tokens[:, t]
        return tokens

    def token_batch(self, tokens: torch.Tensor, student_logits: torch.Tensor,
                    kl_to_go: Optional[torch.Tensor] = None,
                    next_kl_to_go: Optional[torch.Tensor] = None) -> TokenBatch:
        """The TokenBatch of the sequences ``tokens`` (``env_token_batch``)."""
        return env_token_batch(self, tokens, student_logits, kl_to_go, next_kl_to_go)


def env_token_batch(env, tokens: torch.Tensor, student_logits: torch.Tensor,
                    kl_to_go: Optional[torch.Tensor] = None,
                    next_kl_to_go: Optional[torch.Tensor] = None) -> TokenBatch:
    """The TokenBatch of the sequences ``tokens`` on a layered environment (a ``PrefixTree`` or a
    ``synthetic.markov.MarkovChain``: anything with ``state_ids`` and ``teacher_logits``), with the
    full teacher logits and an all-ones mask.

    Args:
      env: the environment.
      tokens: sequences, [N, H] long.
      student_logits: the student logits at the visited states, [N, H, V] (a leaf the caller
        differentiates, e.g. theta[env.state_ids(tokens)]).
      kl_to_go: optional oracle table W(s), [S]; gathered at the visited states.
      next_kl_to_go: optional oracle table W(s + v), [S, V]; gathered at the visited states.

    Returns:
      A ``TokenBatch`` with B = N, T = H: ``teacher_logits`` [N, H, V] and
      ``teacher_token_logprobs`` [N, H] (log-softmax of the teacher table), mask of ones
      (float64), and ``kl_to_go`` [N, H] / ``next_kl_to_go`` [N, H, V] when given.
    """
    states = env.state_ids(tokens)
    teacher = torch.as_tensor(env.teacher_logits)[states]
    teacher_lp = torch.log_softmax(teacher, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return TokenBatch(
        tokens=tokens, mask=torch.ones_like(tokens, dtype=torch.float64), student_logits=student_logits,
        teacher_token_logprobs=teacher_lp, teacher_logits=teacher,
        kl_to_go=None if kl_to_go is None else kl_to_go[states],
        next_kl_to_go=None if next_kl_to_go is None else next_kl_to_go[states])


def check_size(vocab: int, horizon: int) -> None:
    """Raise ``InputError`` unless V >= 2 and H >= 1."""
    if vocab < 2:
        raise InputError(f"the vocabulary needs at least 2 tokens, got V={vocab}")
    if horizon < 1:
        raise InputError(f"the horizon must be at least 1, got H={horizon}")


def check_tables(student_logits: np.ndarray, teacher_logits: np.ndarray, vocab: int, horizon: int) -> None:
    """Raise ``InputError`` unless both tables are finite numeric numpy arrays of shape [S, V] for
    this V and H (``check_logit_values``). The row spread is checked where tables come in from
    outside (``from_arrays``, ``make_tree``: ``check_logit_spread``), not here: a training run
    (``with_student``) may drive the student far out and report it.

    Args:
      student_logits: the student table, [S, V].
      teacher_logits: the teacher table, [S, V].
      vocab: V >= 2.
      horizon: H >= 1; S = (V^H - 1) / (V - 1).
    """
    check_size(vocab, horizon)
    S = None if power_exceeds(vocab, horizon, 1 << 62) else num_states(vocab, horizon)   # None: no table has it
    for name, table in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if S is None or not isinstance(table, np.ndarray) or table.shape != (S, vocab):
            shape = getattr(table, "shape", None)
            count = f"{S:,}" if S is not None else f"(V^H - 1)/(V - 1) with V^H = {power_text(vocab, horizon)}"
            raise InputError(f"{name} must have shape [S, V] = [{count}, {vocab}] for V={vocab}, H={horizon} "
                             f"(S = (V^H - 1)/(V - 1)), got {shape}")
        check_logit_values(name, table)


def check_logit_values(name: str, table: np.ndarray) -> None:
    """Raise ``InputError`` unless ``table`` [S, V] is a real numeric array without NaN or inf."""
    if table.dtype.kind not in "biuf":
        raise InputError(f"{name} must be a real numeric array, got dtype {table.dtype}")
    if not np.all(np.isfinite(table)):
        raise InputError(f"{name} contains NaN or inf")


def check_logit_spread(name: str, table: np.ndarray, remedy: str = "clip the logits") -> None:
    """Raise ``InputError`` if a row of ``table`` [S, V] spans (max - min) more than ``MAX_LOGIT_SPREAD``,
    naming the first such row, its spread, why the engines cannot take it, and ``remedy``."""
    spread = np.ptp(table, axis=1) if table.size else np.zeros(0)
    if spread.size and float(spread.max()) > MAX_LOGIT_SPREAD:
        row = int(np.argmax(spread))
        raise InputError(f"{name} row {row} spans {float(spread[row]):.3g} (max - min logit), more than the "
                         f"{MAX_LOGIT_SPREAD:g} the float64 engines handle (probabilities below e^-745 underflow "
                         f"and squared importance ratios overflow beyond e^709); {remedy} (a token "
                         f"{MAX_LOGIT_SPREAD:g} below the top has probability below 1e-130)")


def from_arrays(student_logits, teacher_logits, horizon: int) -> PrefixTree:
    """A tree from explicit logit tables, converted to float64.

    Args:
      student_logits: array-like [S, V]; V is read from its second axis.
      teacher_logits: array-like [S, V].
      horizon: H; the tables must have S = (V^H - 1) / (V - 1) rows in tree order.

    Returns:
      The ``PrefixTree``; a wrong shape or a non-finite entry raises ``InputError``.
    """
    student, teacher = (_as_float_table(name, table) for name, table in
                        (("student_logits", student_logits), ("teacher_logits", teacher_logits)))
    if student.ndim != 2:
        raise InputError(f"student_logits must be a 2-D [S, V] array, got shape {student.shape}")
    tree = PrefixTree(student.shape[1], horizon, student, teacher)
    check_logit_spread("student_logits", student)
    check_logit_spread("teacher_logits", teacher)
    return tree


def _as_float_table(name: str, table) -> np.ndarray:
    """``table`` as a float64 numpy array; ``InputError`` for strings, objects, complex numbers or ragged lists."""
    array = np.asarray(table) if not isinstance(table, np.ndarray) else table
    if array.dtype.kind not in "biuf":
        raise InputError(f"{name} must be a real numeric array, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


_NPZ_MAGIC, _NPY_MAGIC = b"PK\x03\x04", b"\x93NUMPY"


def _load_npz(path: str):
    """``np.load(path)`` of a .npz archive (no pickles), with every failure an ``InputError`` naming it."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
    except FileNotFoundError:
        raise InputError(f"no such tables file: {path}") from None
    except OSError as err:
        raise InputError(f"cannot read tables file {path}: {err.strerror or err}") from None
    if head.startswith(_NPY_MAGIC):
        raise InputError(f"{path} is a single .npy array, not a .npz archive: save both tables with "
                         "np.savez(path, student_logits=..., teacher_logits=...)")
    if not head.startswith(_NPZ_MAGIC):
        raise InputError(f"{path} is not a NumPy .npz archive (a zip of .npy arrays, as np.savez writes): "
                         "it does not start with the zip signature")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises several types for a corrupt archive
        raise InputError(f"cannot read {path} as a NumPy .npz archive: {err}") from None


def _npz_array(data, path: str, name: str) -> np.ndarray:
    """One array of an open .npz; object arrays (which need pickles) and unreadable members are ``InputError``."""
    try:
        return data[name]
    except ValueError as err:
        raise InputError(f"{path}: {name} is an object array ({err}); save numeric [S, V] tables") from None
    except Exception as err:
        raise InputError(f"{path}: cannot read {name}: {err}") from None


def from_npz(path: str, horizon: int) -> PrefixTree:
    """A tree from a NumPy .npz holding ``student_logits`` and ``teacher_logits`` [S, V] (``vopd exact --tables``).

    Args:
      path: the .npz file.
      horizon: H.

    Returns:
      The ``PrefixTree``; a missing or unreadable file, a missing array or bad tables raise
      ``InputError``.
    """
    with _load_npz(path) as data:
        missing = {"student_logits", "teacher_logits"} - set(data.files)
        if missing:
            raise InputError(f"{path} lacks array(s) {sorted(missing)}; it has {sorted(data.files)}")
        tables = [_npz_array(data, path, name) for name in ("student_logits", "teacher_logits")]
    return from_arrays(*tables, horizon)


def _base_logits(rng: np.random.Generator, vocab: int, shape: str, zipf_exponent: float) -> np.ndarray:
    """One context-free logit vector: Gaussian, or Zipf-like log(1/rank^a) on a random order."""
    if shape == "gaussian":
        return rng.standard_normal(vocab)
    if shape == "zipf":
        return -zipf_exponent * np.log1p(rng.permutation(vocab).astype(np.float64))
    raise InputError(f"unknown teacher shape '{shape}'; choose 'gaussian' or 'zipf'")


def make_tree(vocab: int = 4, horizon: int = 3, *, teacher_temperature: float = 1.0,
              teacher_shape: str = "gaussian", zipf_exponent: float = 1.5, divergence: float = 1.0,
              coupling: float = 0.0, seed: int = 0) -> PrefixTree:
    """A random prefix tree with knobs.

    Teacher logits at state s of depth t:  (u_t + kappa c(s)) / temperature,
    student logits:                        teacher + delta (n_t + kappa c'(s)),
    with u_t a per-depth base vector (Gaussian or Zipf-like long tail), n_t
    per-depth Gaussian noise, and c(s), c'(s) independent per-state Gaussian
    vectors. kappa (``coupling``) sets how much later distributions depend on
    earlier tokens: at kappa = 0 every state of a depth is identical, the
    KL-to-go W_{t+1}(s + v) does not depend on v, and token-level OPD is
    unbiased for the sequence gradient. delta (``divergence``) sets the
    student-teacher gap; the temperature sets the teacher's entropy.

    Args:
      vocab: V >= 2.
      horizon: H >= 1.
      teacher_temperature: > 0 (else ``InputError``); divides the teacher logits (below 1: sharper).
      teacher_shape: ``"gaussian"`` (u_t ~ N(0, I)) or ``"zipf"`` (u_t[v] = -a log(1 + r_v),
        r a random permutation of 0..V-1, so the teacher's probabilities fall as 1/rank^a
        at kappa = 0 and temperature 1).
      zipf_exponent: a, for ``teacher_shape="zipf"``.
      divergence: delta, the scale of the student's deviation from the teacher.
      coupling: kappa, the scale of the per-state terms (0: no dependence on earlier tokens).
      seed: seed of the numpy generator that draws every random term.

    Returns:
      The ``PrefixTree`` (float64 tables, [S, V] each).
    """
    check_knobs(teacher_temperature, divergence, coupling, zipf_exponent, seed)
    check_size(vocab, horizon)
    if power_exceeds(vocab, horizon, 1 << 40):
        raise InputError(f"a prefix tree with V={vocab}, H={horizon} has (V^H - 1)/(V - 1) states, V^H = "
                         f"{power_text(vocab, horizon)}: too many to store; use a Markov chain (synthetic.markov)")
    S = num_states(vocab, horizon)
    check_memory(S, vocab, GENERATION_COPIES, "generating the tables")
    rng = np.random.default_rng(seed)
    depth = np.concatenate([np.full(vocab ** t, t) for t in range(horizon)])
    base = np.stack([_base_logits(rng, vocab, teacher_shape, zipf_exponent) for _ in range(horizon)])
    noise = rng.standard_normal((horizon, vocab))
    teacher = (base[depth] + coupling * rng.standard_normal((S, vocab))) / teacher_temperature
    student = teacher + divergence * (noise[depth] + coupling * rng.standard_normal((S, vocab)))
    check_generated(student, teacher)
    return PrefixTree(vocab, horizon, student, teacher)


def check_generated(student: np.ndarray, teacher: np.ndarray) -> None:
    """``check_logit_spread`` of generated tables, pointing at the knobs that widen them."""
    for name, table in (("teacher_logits", teacher), ("student_logits", student)):
        check_logit_spread(name, table, "raise teacher_temperature or lower divergence and coupling")


def bandit(vocab: int = 4, **knobs) -> PrefixTree:
    """A single categorical decision: ``make_tree(vocab, 1, **knobs)``, tables [1, V]."""
    return make_tree(vocab, 1, **knobs)


def check_enumerable(vocab: int, horizon: int, limit: int = MAX_EXACT_SEQUENCES) -> None:
    """Raise ``InputError`` if V^H > ``limit``, pointing to the Monte Carlo path (call before building the tree).

    Args:
      vocab: V.
      horizon: H.
      limit: the most sequences enumeration accepts (default ``MAX_EXACT_SEQUENCES`` = 2^23).
    """
    if power_exceeds(vocab, horizon, limit):
        raise InputError(
            f"V={vocab}, H={horizon} has V^H = {power_text(vocab, horizon)} sequences, more than the "
            f"{limit:,} the exact engine enumerates; use the Monte Carlo path "
            "(vopd_analysis.tabular.montecarlo, or `vopd mc`) for this size")
