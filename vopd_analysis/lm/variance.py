"""Monte-Carlo gradient variance of OPD estimators on any torch model.

For an estimator, let g_i in R^D be the flattened parameter gradient of its surrogate on
rollout i alone (i = 1..N, rollouts drawn from the student). With
g_bar = (1/N) sum_i g_i, this module estimates

* trace of the covariance    tr Sigma = sum_i |g_i - g_bar|^2 / (N - 1)
                                      = (sum_i |g_i|^2 - N |g_bar|^2) / (N - 1)  (unbiased),
  streamed with Welford's update (no cancellation), in float64, memory O(D);
* the same trace restricted to each parameter group (layer / named prefix);
* |G|^2, G = E[g], unbiased:  |g_bar|^2 - tr Sigma / N;
* SNR of the N-rollout mean:  snr = |g_bar|^2 / (tr Sigma / N)  (signal over the variance of g_bar);
* the gradient noise scale B_simple = tr Sigma / |G|^2 (McCandlish et al. 2018, "An Empirical
  Model of Large-Batch Training"): the batch size at which the mean's noise equals its signal;
  also tr Sigma / |g_ref|^2 against a common reference, comparable across estimators;
* the cosine between g_bar and a reference gradient g_ref.

Projections: each g_i is also projected on m fixed Gaussian directions u_j (entries N(0, 1),
seeded, regenerated block by block so they cost no O(m D) memory). Since E_u[(u.x)^2] = |x|^2,
the sample variance of u_j . g_i over i, averaged over j, is an unbiased (Hutchinson) estimate of
tr Sigma; the per-rollout projections let a caller bootstrap over rollouts.

``probe`` samples rollouts once and evaluates every estimator on the SAME rollouts (common
random numbers), one backward pass per rollout and estimator, or (method="vmap") batched
per-sample gradients with torch.func.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.func import functional_call, vjp, vmap

from .. import estimators as est
from ..errors import InputError
from . import fused_score as fs
from . import rollouts as ro
from . import scoring as sc

_PROJECTION_BLOCK = 1 << 20


# ----------------------------------------------------------------------------- parameter groups

def group_key(name: str) -> str:
    """The group of a parameter name: up to its first numeric component (one transformer layer),
    else its module path (the name without the final attribute).

    'model.layers.3.mlp.up_proj.weight' -> 'model.layers.3';  'lm_head.weight' -> 'lm_head'.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def trainable_parameters(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for every parameter that requires grad, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def select_parameters(model: torch.nn.Module, spec: str = "all") -> List[str]:
    """Make the probe's gradient cover only the parameters ``spec`` names (``requires_grad``), return their names.

    ``spec``:

    * ``"all"``: every parameter (a tied output layer is the input embedding, counted once);
    * ``"last:N"``: the last N decoder layers (``model.layers.<i>``), the final norm (``model.norm``) and
      an untied output layer; a tied one is left out, since its gradient is the input embedding's and
      reaches the whole vocabulary through the input side;
    * ``"regex:PATTERN"``: the parameters whose name matches PATTERN (``re.search``).

    The gradient restricted to a subset of coordinates is the projection of the full one: its
    trace variance is the sum of those coordinates' variances, so ratios between estimators on a
    subset can differ from the full-parameter ratios (the probe's per-group table shows by how much).

    Args:
      model: the student.
      spec: as above.

    Returns:
      The names of the selected parameters, in ``named_parameters`` order (an ``InputError`` if none).
    """
    import re
    names = [n for n, _ in model.named_parameters()]
    if spec == "all":
        chosen = set(names)
    elif spec.startswith("last:"):
        try:
            count = int(spec[len("last:"):])
        except ValueError:
            raise InputError(f"parameter selection {spec!r}: expected last:N with N an integer") from None
        layers = sorted({int(m.group(1)) for n in names for m in [re.match(r"model\.layers\.(\d+)\.", n)] if m})
        if not layers:
            raise InputError(f"parameter selection {spec!r}: the model has no model.layers.<i> parameters; "
                             "use regex:PATTERN")
        if not 1 <= count <= len(layers):
            raise InputError(f"parameter selection {spec!r}: N must be in 1..{len(layers)} (the model's layers)")
        last = {str(i) for i in layers[-count:]}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = head is not None and embed is not None and head.weight is embed.weight
        chosen = {n for n in names if (re.match(r"model\.layers\.(\d+)\.", n) and n.split(".")[2] in last)
                  or n.startswith("model.norm.") or (n.startswith("lm_head.") and not tied)}
    elif spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as err:
            raise InputError(f"parameter selection {spec!r}: bad regular expression ({err})") from None
        chosen = {n for n in names if pattern.search(n)}
    else:
        raise InputError(f"parameter selection {spec!r}: expected all, last:N or regex:PATTERN")
    if not chosen:
        raise InputError(f"parameter selection {spec!r} selects no parameter of the student")
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


def parameter_groups(named_params: Sequence[Tuple[str, torch.Tensor]]) -> Dict[str, List[Tuple[int, int]]]:
    """The parameter groups (``group_key``) as ranges of the flattened parameter vector.

    Args:
      named_params: (name, tensor) in the order the gradient is flattened (``flat_grad_of``).

    Returns:
      Group name -> list of [start, end) ranges, in order of first appearance.
    """
    groups: Dict[str, List[Tuple[int, int]]] = {}
    offset = 0
    for name, p in named_params:
        groups.setdefault(group_key(name), []).append((offset, offset + p.numel()))
        offset += p.numel()
    return groups


def flat_grad_of(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
                 dtype=torch.float64) -> torch.Tensor:
    """The flattened gradient g = concat_j vec(grads_j), zeros where a parameter got no gradient.

    Args:
      params: the D_j-element parameters.
      grads: their gradients (None: unused by the loss), as from ``torch.autograd.grad``.
      dtype: the result's dtype.

    Returns:
      [D], D = sum_j D_j.
    """
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                      for p, g in zip(params, grads)])


# ----------------------------------------------------------------------------- streaming moments

class GradientMoments:
    """Streaming first and second moments of per-rollout gradient vectors g_i in R^D (float64).

    Welford: n += 1; d = g - mean; mean += d / n; M2 += d . (g - mean_new), so that after N
    updates M2 = sum_i |g_i - g_bar|^2 exactly (in exact arithmetic) and tr Sigma = M2 / (N - 1).
    Per-group M2 uses the same products summed over the group's ranges. Memory: the mean
    (one float64 D-vector, on ``device``) plus update temporaries; the projections are N x m.
    """

    def __init__(self, dim: int, groups: Optional[Dict[str, List[Tuple[int, int]]]] = None,
                 num_projections: int = 8, seed: int = 0, device=None):
        self.dim, self.count = int(dim), 0
        self.device = torch.device(device or "cpu")
        self.groups = groups or {"all": [(0, self.dim)]}
        self.mean = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.m2 = 0.0
        self.group_m2 = {g: 0.0 for g in self.groups}
        self.num_projections, self.seed = num_projections, seed
        self.projections: List[np.ndarray] = []

    def update(self, g: torch.Tensor) -> None:
        """Add one gradient vector g [D] (any shape with D entries; copied to float64 on ``device``)."""
        g = g.detach().reshape(-1).to(device=self.device, dtype=torch.float64)
        if g.numel() != self.dim:
            raise InputError(f"gradient has {g.numel()} entries, expected {self.dim}")
        self.count += 1
        delta = g - self.mean
        self.mean += delta / self.count
        prod = delta.mul_(g - self.mean)            # in place: two [D] temporaries besides g, not four
        self.m2 += float(prod.sum())
        sums = torch.stack([prod[a:b].sum() for ranges in self.groups.values() for a, b in ranges]).tolist()
        i = 0
        for name, ranges in self.groups.items():
            self.group_m2[name] += sum(sums[i:i + len(ranges)])
            i += len(ranges)
        if self.num_projections:
            self.projections.append(project(g, self.num_projections, self.seed))

    # --- statistics -------------------------------------------------------------------------
    def _need(self, n: int) -> None:
        if self.count < n:
            raise InputError(f"need at least {n} gradients, got {self.count}")

    def trace(self) -> float:
        """Unbiased tr Sigma = sum_i |g_i - g_bar|^2 / (N - 1)."""
        self._need(2)
        return self.m2 / (self.count - 1)

    def group_traces(self) -> Dict[str, float]:
        """Unbiased trace of each parameter group's covariance block (they sum to ``trace()``)."""
        self._need(2)
        return {g: v / (self.count - 1) for g, v in self.group_m2.items()}

    def group_mean_sq_norms(self) -> Dict[str, float]:
        """Group -> |g_bar restricted to the group|^2."""
        return {g: sum(float(self.mean[a:b] @ self.mean[a:b]) for a, b in r) for g, r in self.groups.items()}

    def group_sizes(self) -> Dict[str, int]:
        """Group -> its number of parameters."""
        return {g: sum(b - a for a, b in r) for g, r in self.groups.items()}

    def mean_sq_norm(self) -> float:
        """|g_bar|^2 (biased upward by tr Sigma / N as an estimate of |G|^2)."""
        return float(self.mean @ self.mean)

    def signal_sq_norm(self) -> float:
        """Unbiased |G|^2 = |g_bar|^2 - tr Sigma / N (may be negative when noise dominates)."""
        return self.mean_sq_norm() - self.trace() / self.count

    def snr(self) -> float:
        """|g_bar|^2 / (tr Sigma / N): squared length of the mean over its total variance."""
        return self.mean_sq_norm() / (self.trace() / self.count)

    def noise_scale(self) -> float:
        """B_simple = tr Sigma / |G|^2 with the unbiased |G|^2; NaN when that estimate is <= 0."""
        signal = self.signal_sq_norm()
        return self.trace() / signal if signal > 0 else float("nan")

    def cosine(self, reference: torch.Tensor) -> float:
        """cos(g_bar, g_ref)."""
        ref = reference.detach().reshape(-1).to(self.mean)
        denom = float(self.mean.norm() * ref.norm())
        return float(self.mean @ ref) / denom if denom > 0 else float("nan")

    def projection_matrix(self) -> np.ndarray:
        """[N, m] projections u_j . g_i of every gradient seen so far."""
        return np.stack(self.projections) if self.projections else np.zeros((0, self.num_projections))

    def projected_trace(self, rows: Optional[np.ndarray] = None) -> float:
        """Hutchinson estimate of tr Sigma: mean over directions of the sample variance of u_j . g_i."""
        p = self.projection_matrix()
        p = p if rows is None else p[rows]
        return float(p.var(axis=0, ddof=1).mean())

    def bootstrap_trace(self, num_resamples: int = 1000, seed: int = 0) -> np.ndarray:
        """Bootstrap distribution (over rollouts) of ``projected_trace``, for confidence intervals."""
        rng = np.random.default_rng(seed)
        n = self.count
        return np.array([self.projected_trace(rng.integers(0, n, n)) for _ in range(num_resamples)])


def project(g: torch.Tensor, num_directions: int, seed: int) -> np.ndarray:
    """Projections u_j . g, j < m, on directions u_j with i.i.d. N(0, 1) entries fixed by ``seed``.

    The directions are drawn block by block (2^20 coordinates) on g's device from generators
    seeded by (seed, block), so they are the same for every call (on one device type) and
    need no O(m D) storage.

    Args:
      g: [D] vector (any shape with D entries).
      num_directions: m.
      seed: fixes the directions.

    Returns:
      [m] float64 numpy array.
    """
    g = g.detach().reshape(-1).to(torch.float64)
    out = torch.zeros(num_directions, dtype=torch.float64, device=g.device)
    for block, start in enumerate(range(0, g.numel(), _PROJECTION_BLOCK)):
        part = g[start:start + _PROJECTION_BLOCK]
        gen = torch.Generator(device=g.device).manual_seed(seed * 1_000_003 + block)
        u = torch.randn(num_directions, part.numel(), generator=gen, dtype=torch.float64, device=g.device)
        out += u @ part
    return out.cpu().numpy()


# ----------------------------------------------------------------------------- the probe

@dataclasses.dataclass
class ProbeResult:
    """``summary``: one row per estimator; ``layers``: one row per (estimator, parameter group);
    ``timings``: seconds spent scoring (``"score"``, shared) and in each estimator's losses and backward passes."""

    summary: "object"          # pandas.DataFrame
    layers: "object"           # pandas.DataFrame
    moments: Dict[str, GradientMoments]
    reference: torch.Tensor
    rollouts: ro.Rollouts
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)


def _estimator_params(name: str, params: Optional[dict], num_rollouts: int) -> dict:
    """Parameters for ``name``, a registry name or a label such as ``vopd_topk(k=64)`` (defaults filled in);
    group estimators default to group_size = rollouts per prompt."""
    spec = est.get(est.base_name(name))
    chosen = dict((params or {}).get(name, {}))
    if spec.group:
        chosen.setdefault("group_size", num_rollouts)
    return spec.params(**chosen)


def _score_params(labels: Sequence[str], estimator_params: Dict[str, dict]) -> Dict[str, dict]:
    """``scoring.score``'s parameters for several labelled estimators: per registry name, the parameters with
    the largest top-k size among its labels (a top-k estimator reads the first k of the batch's top-K fields)."""
    out: Dict[str, dict] = {}
    for label in labels:
        name, params = est.base_name(label), estimator_params[label]
        if name not in out or params.get("k", 0) > out[name].get("k", 0):
            out[name] = params
    return out


METHODS = ("loop", "vmap")


def rollout_gradients(student, teacher, rollouts: ro.Rollouts, estimator_params: Dict[str, dict],
                      named_params, vocab_size=None, mask_token_ids=(), chunk_tokens=sc.DEFAULT_CHUNK_TOKENS,
                      timings: Optional[Dict[str, float]] = None, method: str = "loop",
                      chunk_size: Optional[int] = None, logits: str = "auto",
                      max_new_tokens: Optional[int] = None, per_rollout: bool = False):
    """Yield (name, g_i) for every estimator and rollout i: g_i = d v_i / d theta [D] float64, the flattened
    gradient of rollout i's surrogate v_i (``est.surrogate_loss(reduction="none")``).

    Each prompt's group of rollouts is scored once (student forward, teacher forward, every
    teacher signal the estimators need) and shared by all estimators; per group the order is
    estimator by estimator, rollout by rollout. For a group estimator (several rollouts per
    prompt) row i's value v_i already uses the group's (detached) baseline, so g_i = grad v_i is
    that rollout's term of the group estimate. ``method`` (both give the same g_i):

    * "loop": one backward of v_i through the batched graph per rollout and estimator;
    * "vmap": per-sample gradients with torch.func (``_vmap_gradients``): one vmapped
      forward per rollout and one vmapped backward per rollout and estimator, at the cost of
      a gradient-free batched student forward for the scoring. For small models: it holds
      the cotangents (B x E x T x V) and per-sample gradients (B x E x D) of a group of B
      rollouts at once, and the vmap's activations (bound them with ``chunk_size`` rollouts
      per vmap call).

    Args:
      student, teacher: the pair; ``named_params`` are the student parameters differentiated.
      rollouts: N rollouts, the same number K per prompt, a prompt's rows consecutive.
      estimator_params: estimator name, or a label such as ``vopd_topk(k=64)`` (``estimators.base_name``:
        one estimator at several parameter values), -> its full parameters (group_size = K for group estimators).
      named_params: (name, parameter) of the student, in the flattening order (``trainable_parameters``).
      vocab_size, mask_token_ids, chunk_tokens: passed to ``scoring.score``.
      timings: if given, accumulates seconds under "score" and under each estimator name.
      method: "loop" or "vmap".
      chunk_size: rollouts per vmap call (method "vmap"); None: all of a group.
      logits: method "loop" only: "auto", "materialised" or "fused" (``fused_score.choose``, per
        estimator, for a group of the planned size, ``fused_score.planned_tokens``: a fused estimator's
        v_i from hidden states, never [B, T, V] logits; estimators without a fused form are scored
        materialised whatever the choice); method "vmap" always materialises them ("fused" is refused).
      max_new_tokens: the response budget the rollouts were sampled with, which sizes a group for the
        "auto" choice (None: the generated width), so the choice never depends on where responses ended.
      per_rollout: method "loop": score each rollout alone (a group of one) instead of each prompt's
        group together. The gradients are the same (v_i depends on rollout i only), but a backward
        pass then runs through one rollout's rows instead of the group's: K times less work per
        backward for K rollouts per prompt, for K separate forwards. Not with group estimators,
        whose baseline needs the whole group.

    Returns:
      A generator of (estimator name, [D] float64 gradient).
    """
    if method not in METHODS:
        raise InputError(f"unknown gradient method {method!r}; choose 'loop' (one backward per rollout "
                         "and estimator) or 'vmap' (torch.func per-sample gradients)")
    fs.choose(logits, "opd", 0, 0)          # a known path
    if method == "vmap" and logits == "fused":
        raise InputError("the vmap gradients need materialised logits; use method='loop' with logits='fused'")
    size = _rollouts_per_prompt(rollouts)
    for name, params in estimator_params.items():
        if est.get(est.base_name(name)).group and params["group_size"] != size:
            raise InputError(f"{name}: group_size {params['group_size']} must equal the rollouts per prompt ({size})")
    timings = {} if timings is None else timings
    common = (student, teacher, estimator_params, named_params, vocab_size, mask_token_ids, chunk_tokens, timings)
    if per_rollout and any(est.get(est.base_name(name)).group for name in estimator_params):
        raise InputError("per_rollout scoring cannot serve group estimators (their baseline needs the whole group)")
    step = 1 if per_rollout and method == "loop" else size
    groups = (rollouts.select(list(range(start, start + step))) for start in range(0, rollouts.num_rollouts, step))
    if method == "vmap":
        return (item for group in groups for item in _vmap_gradients(group, *common, chunk_size=chunk_size))
    return (item for group in groups for item in _loop_gradients(group, *common, logits=logits,
                                                                 max_new_tokens=max_new_tokens))


def _loop_gradients(group, student, teacher, estimator_params, named_params, vocab_size, mask_token_ids,
                    chunk_tokens, timings, logits="auto", max_new_tokens=None):
    """One prompt group, one backward of v_i per rollout i and estimator (retain_graph).

    Estimators with a fused form that ``fused_score.choose(logits, ...)`` sends to the fused path
    share one ``fused_score.hidden_batch`` of the group (no [B, T, V] logits) and get v_i from the
    rows of rollout i alone; the others share one ``scoring.score``."""
    tensors = [p for _, p in named_params]
    num_tokens = fs.planned_tokens(group, max_new_tokens)
    fused_names = [n for n in estimator_params if fs.has_fused_form(est.base_name(n))
                   and fs.choose(logits, est.base_name(n), num_tokens, vocab_size or 0)]
    clock = time.perf_counter()
    materialised = [n for n in estimator_params if n not in fused_names]
    batch = sc.score(student, teacher, group, [est.base_name(n) for n in materialised], vocab_size, mask_token_ids,
                     chunk_tokens, params=_score_params(materialised, estimator_params)) if materialised else None
    hidden = fs.hidden_batch(student, teacher, group, vocab_size, mask_token_ids) if fused_names else None
    timings["score"] = timings.get("score", 0.0) + time.perf_counter() - clock
    size = group.num_rollouts
    for n, (name, params) in enumerate(estimator_params.items()):
        clock = time.perf_counter()
        if name in fused_names:
            rows = [fs.values(hidden.rows(slice(i, i + 1)), est.base_name(name), params)[0][0] for i in range(size)]
        else:   # sc.score validated the batch
            rows = est.surrogate_loss(est.base_name(name), batch, reduction="none", validate=False, **params)
        for i in range(size):
            last = n + 1 == len(estimator_params) and i + 1 == size
            grads = torch.autograd.grad(rows[i], tensors, retain_graph=not last, allow_unused=True)
            g = flat_grad_of(tensors, grads)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - clock
            yield name, g
            clock = time.perf_counter()


class _ResponseLogits(torch.nn.Module):
    """z_theta(s_t)[:V] at one rollout's response positions: its row of ``scoring.score``'s student
    logits (``scoring.response_logits``), as a module for ``functional_call``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, att, cols, first: int, vocab: int):                     # [L], [L], [T]
        return sc.response_logits(self.model, ids[None], att[None], cols[None], first, vocab)[0]   # [T, V]


@contextlib.contextmanager
def _vmappable_attention(model):
    """Eager attention while inside: vmap cannot run transformers' SDPA mask builder.

    ``masking_utils.sdpa_mask`` drops the mask when the padding mask is all ones
    (``_ignore_causal_mask_sdpa`` calls ``padding_mask.all()`` in an ``if``), a data-dependent
    branch that vmap refuses ("attempting to use a Tensor in some data-dependent control flow").
    The eager path builds the same causal + padding mask without that branch; its softmax runs
    in float32, so for a float64 model the vmap gradients match the SDPA loop to ~1e-7 only.
    """
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if before in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _vmap_gradients(group, student, teacher, estimator_params, named_params, vocab_size, mask_token_ids,
                    chunk_tokens, timings, chunk_size=None):
    """One prompt group's per-rollout gradients with torch.func, all estimators in one vmap.

    Every surrogate v_i (estimator e, rollout i) depends differentiably on its own logits
    z_i = f(theta, x_i) [T, V] only: anything that mixes rollouts (a group baseline) is
    detached. Hence, by the chain rule,

        g_i = d v_i / d theta = J_i^T c_i,   J_i = d z_i / d theta,
        c_i = d v_i / d z_i = d (sum_j v_j) / d z_i,

    so one backward of sum_j v_j to the logits of the batch (scored without a parameter graph)
    gives every cotangent c_i, and ``vmap`` over rollouts of ``vjp`` of the functional student
    (``functional_call``) gives J_i^T c_i for all estimators from one forward per rollout
    (the inner vmap runs the E pullbacks of that forward). v_i is computed by
    ``est.surrogate_loss(reduction="none")`` exactly as in the loop.
    """
    names = list(estimator_params)
    clock = time.perf_counter()
    with torch.no_grad():
        batch = sc.score(student, teacher, group, [est.base_name(n) for n in names], vocab_size, mask_token_ids,
                         chunk_tokens, params=_score_params(names, estimator_params))
    timings["score"] = timings.get("score", 0.0) + time.perf_counter() - clock
    z = batch.student_logits.detach().requires_grad_()
    scored = dataclasses.replace(batch, student_logits=z)
    cotangents = []
    for name, params in estimator_params.items():
        clock = time.perf_counter()
        values = est.surrogate_loss(est.base_name(name), scored, reduction="none", validate=False,  # validated
                                    **params)
        cotangents.append(torch.autograd.grad(values.sum(), z)[0])
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - clock
    cotangents = torch.stack(cotangents, 1)                                         # [B, E, T, V]

    clock = time.perf_counter()
    cols, _ = sc.response_index(group.response_mask)
    first, vocab = int(cols.min()) - 1, batch.vocab_size
    module = _ResponseLogits(student)
    weights = {"model." + n: p.detach() for n, p in named_params}
    tensors = [p for _, p in named_params]

    def one_rollout(ids, att, c, cot):                                              # cot [E, T, V]
        _, pull = vjp(lambda w: functional_call(module, w, (ids, att, c, first, vocab)), weights)
        return vmap(pull)(cot)[0]                                                   # name -> [E, *shape]

    with _vmappable_attention(student):
        grads = vmap(one_rollout, chunk_size=chunk_size)(group.input_ids, group.attention_mask, cols, cotangents)
    grads = list(grads.values())                                                    # each [B, E, *shape]
    if not bool(torch.isfinite(sum(g.sum() for g in grads))):                       # NaN / inf anywhere
        raise InputError("method='vmap' gave non-finite gradients. A known cause: a float64 model with "
                         "left-padded prompts, since transformers' eager attention (which vmap needs) takes its "
                         "softmax in float32, where the float64 mask value becomes -inf and fully masked padding "
                         "rows become NaN; use method='loop', float32, or prompts of equal length")
    share = (time.perf_counter() - clock) / len(names)
    for e, name in enumerate(names):
        timings[name] = timings.get(name, 0.0) + share
        for i in range(group.num_rollouts):
            yield name, flat_grad_of(tensors, [g[i, e] for g in grads])


def reference_gradient(student, teacher, rollouts: ro.Rollouts, name: str = "full_kl", **kwargs) -> torch.Tensor:
    """g_ref = (1/N) sum_i g_i, the mean of the per-rollout gradients of estimator ``name`` over ``rollouts``.

    Args:
      student, teacher, rollouts: as for ``rollout_gradients``.
      name: the reference estimator.
      **kwargs: ``params`` (name -> overrides) and ``rollout_gradients``'s keyword arguments.

    Returns:
      [D] float64.
    """
    named = trainable_parameters(student)
    params = {name: _estimator_params(name, kwargs.pop("params", None), _rollouts_per_prompt(rollouts))}
    grads = [g for _, g in rollout_gradients(student, teacher, rollouts, params, named, **kwargs)]
    return torch.stack(grads).mean(0)


def _rollouts_per_prompt(rollouts: ro.Rollouts) -> int:
    return int(torch.bincount(rollouts.prompt_index).max())


def probe(student, teacher, tokenizer, prompts: Sequence[str], estimators: Sequence[str], num_rollouts: int,
          max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
          reference: Union[str, torch.Tensor] = "full_kl", vocab_size: Optional[int] = None,
          mask_token_ids: Sequence[int] = (), params: Optional[dict] = None, num_projections: int = 8,
          chunk_tokens: int = sc.DEFAULT_CHUNK_TOKENS, progress: bool = False, method: str = "loop",
          logits: str = "auto", rollouts: Optional[ro.Rollouts] = None, per_rollout: bool = False) -> ProbeResult:
    """Per-estimator gradient statistics on the same student rollouts (common random numbers).

    Samples ``num_rollouts`` responses for each prompt once (seeded), then for each estimator
    streams the N = len(prompts) * num_rollouts single-rollout gradients into a
    ``GradientMoments``. Both models are put in eval mode (no dropout) and restored afterwards.

    Args:
      student, teacher, tokenizer: the pair.
      prompts: P prompts.
      estimators: distinct estimator names or labels (``vopd_topk(k=64)``: the registry name before the
        parenthesis, its parameters from ``params[label]``), all scored once per group.
      num_rollouts: K rollouts per prompt.
      max_new_tokens, temperature, seed, vocab_size: passed to ``rollouts.generate_rollouts``.
      reference: an estimator name (its mean gradient over these rollouts; reused if it is
        also probed) or a [D] vector g_ref.
      mask_token_ids, chunk_tokens: passed to ``scoring.score``.
      params: estimator name or label -> parameter overrides.
      num_projections: m random projections per gradient (``GradientMoments``); 0: none.
      progress: print each estimator's trace.
      method: "loop" or "vmap" (``rollout_gradients``).
      logits: "auto", "materialised" or "fused" (``rollout_gradients``).
      rollouts: rollouts already sampled from the student for ``prompts`` (``num_rollouts`` per prompt,
        e.g. shared by several probes of one batch); None: sampled here.
      per_rollout: score each rollout alone (``rollout_gradients``): faster for large models.

    Returns:
      ``ProbeResult``: ``summary`` (one row per estimator: trace_cov, snr, noise_scale,
      cosine_to_reference, ...), ``layers`` (per parameter group), the moments, g_ref [D]
      and the rollouts.
    """
    import pandas as pd

    if len(set(estimators)) != len(estimators) or not estimators:
        raise InputError(f"estimators must be a non-empty list of distinct names, got {list(estimators)}")
    for name in estimators:
        est.get(est.base_name(name))
    modes = (student.training, teacher.training)
    student.eval(), teacher.eval()
    try:
        if rollouts is None:
            rollouts = ro.generate_rollouts(student, tokenizer, list(prompts), num_rollouts, max_new_tokens,
                                            temperature=temperature, seed=seed, vocab_size=vocab_size)
        named = trainable_parameters(student)
        groups = parameter_groups(named)
        dim = sum(p.numel() for _, p in named)
        common = dict(vocab_size=vocab_size, mask_token_ids=mask_token_ids, chunk_tokens=chunk_tokens, method=method,
                      logits=logits, max_new_tokens=max_new_tokens, per_rollout=per_rollout)
        est_params = {name: _estimator_params(name, params, num_rollouts) for name in estimators}
        moments = {name: GradientMoments(dim, groups, num_projections, seed, device=named[0][1].device)
                   for name in estimators}
        timings: Dict[str, float] = {}
        for name, g in rollout_gradients(student, teacher, rollouts, est_params, named, timings=timings, **common):
            moments[name].update(g)
        # each estimator is charged its own loss + backward time and an equal share of the scoring
        seconds = {name: timings[name] + timings["score"] / len(estimators) for name in estimators}
        if progress:
            for name in estimators:
                print(f"[probe] {name}: {moments[name].count} rollouts, tr Sigma = {moments[name].trace():.4g}")
        ref_vec = reference if isinstance(reference, torch.Tensor) else None
        if ref_vec is None and reference in moments:
            ref_vec = moments[reference].mean.clone()
        if ref_vec is None:
            ref_vec = reference_gradient(student, teacher, rollouts, reference, **common)
    finally:
        for p in student.parameters():
            p.grad = None
        student.train(modes[0]), teacher.train(modes[1])
    ref_vec = ref_vec.detach().reshape(-1).to(torch.float64)
    summary = pd.DataFrame([_summary_row(n, moments[n], seconds[n], ref_vec, params, num_rollouts) for n in estimators])
    layers = pd.DataFrame([row for n in estimators for row in _layer_rows(n, moments[n])])
    return ProbeResult(summary, layers, moments, ref_vec, rollouts, timings)


def _summary_row(name, m: GradientMoments, seconds: float, ref: torch.Tensor, params, num_rollouts) -> dict:
    spec = est.get(est.base_name(name))
    trace = m.trace()
    ref_sq = float(ref @ ref)
    boot = m.bootstrap_trace(200, seed=0) if m.num_projections and m.count > 2 else np.array([np.nan])
    return {
        "estimator": name, "unbiased_for": spec.target(_estimator_params(name, params, num_rollouts)),
        "teacher_signal": spec.teacher_signal, "num_rollouts": m.count,
        "trace_cov": trace, "mean_grad_sq_norm": m.mean_sq_norm(), "signal_sq_norm": m.signal_sq_norm(),
        "snr": m.snr(), "noise_scale": m.noise_scale(),
        "noise_scale_ref": trace / ref_sq if ref_sq > 0 else float("nan"),
        "cosine_to_reference": m.cosine(ref),
        "rel_error_to_reference": float((m.mean - ref.to(m.mean)).norm()) / max(ref_sq ** 0.5, 1e-300),
        "trace_cov_projected": m.projected_trace() if m.num_projections else float("nan"),
        "trace_cov_projected_boot_std": float(np.std(boot)),
        "seconds": seconds, "rollouts_per_s": m.count / seconds if seconds > 0 else float("nan"),
    }


def _layer_rows(name: str, m: GradientMoments) -> List[dict]:
    traces, means, sizes = m.group_traces(), m.group_mean_sq_norms(), m.group_sizes()
    return [{"estimator": name, "group": g, "num_params": sizes[g], "trace_cov": traces[g],
             "mean_grad_sq_norm": means[g]} for g in m.groups]
