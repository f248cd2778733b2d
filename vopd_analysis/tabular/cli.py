"""``vopd exact`` and ``vopd mc``: their options, checks, memory model and output.

Estimator parameters (``vopd_analysis.params``): ``--param NAME=VALUE`` (repeatable, value read
as JSON), ``--k K`` short for ``--param k=K``; unset ones take the registry's defaults, a default
top-k size above the vocabulary V is capped at V (and the output says so). ``vopd exact`` gives
each parameter to every selected estimator that takes it, and refuses one that none takes.

Before any work, the environment's size is checked against what the engines can hold: ``copies``
float64 [S, V] tables (``ENGINE_COPIES`` for the engines, ``COPIES_PER_ESTIMATOR`` more per estimator
of ``vopd exact``), and for ``vopd mc`` ``MC_MAX_ELEMENTS`` float64 values of draws and batches.
``--json`` output is strict JSON: a result that is not finite in float64 is written as null and its
path listed under ``non_finite`` (the text output prints a note).
"""

from __future__ import annotations

import argparse
import json
import math

from ..cli import DefaultsFormatter, Parser, parse_command
from ..errors import InputError

# [S, V] float64 arrays the exact engines hold at once: the tables and tree_quantities' about a
# dozen, and per estimator its mean gradient and that mean as a Python list for the output
# (a float object and its pointer: 4 float64's worth).
ENGINE_COPIES, COPIES_PER_ESTIMATOR = 12, 5
MC_MAX_ELEMENTS = 2e8   # float64 values of the Monte Carlo draws and the batch they come from
MC_INTERVAL = 0.95      # coverage of the printed trace-variance interval


def _add_tree_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tables", help="a .npz (np.savez) with student_logits and teacher_logits, each [S, V] "
                        "in prefix-tree order (default: generate an environment from --vocab and the knobs)")
    parser.add_argument("--horizon", type=int, required=True, help="H, the response length (required)")
    parser.add_argument("--vocab", type=int, help="V, for a generated environment (required without --tables, "
                        "ignored with it)")
    parser.add_argument("--teacher-temperature", type=float, default=1.0,
                        help="divides the generated teacher logits (positive; below 1: sharper)")
    parser.add_argument("--teacher-shape", choices=["gaussian", "zipf"], default="gaussian",
                        help="the generated teacher's base logits")
    parser.add_argument("--divergence", type=float, default=1.0, help="student-teacher gap delta")
    parser.add_argument("--coupling", type=float, default=0.0, help="future coupling strength kappa")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed (non-negative) of the generated tables, the draws and the test's directions")
    parser.add_argument("--markov", action="store_true",
                        help="generate a Markov chain (state = position and previous token) instead of a prefix tree")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _add_param_options(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument("--param", action="append", metavar="NAME=VALUE",
                        help=f"estimator parameter for {who}, value read as JSON (repeatable; default: the "
                             "registry's, a top-k size above V capped at V)")
    parser.add_argument("--k", type=int, help="shorthand for --param k=K (the top-k size; default: the registry's)")


def _check_knobs(args) -> None:
    """Option values argparse's types let through: the seed, and the real-valued knobs (finite)."""
    if args.seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {args.seed}")
    if not 0 < args.teacher_temperature < math.inf:
        raise InputError(f"--teacher-temperature must be a positive finite number, got {args.teacher_temperature}")
    for option in ("divergence", "coupling"):
        if not math.isfinite(getattr(args, option)):
            raise InputError(f"--{option} must be a finite number, got {getattr(args, option)}")


def _environment_size(args) -> tuple:
    """(S, V) of the environment ``args`` generate, after the checks that need no tables: V >= 2,
    H >= 1, and for a prefix tree the limits of enumeration (``vopd mc``, ``--method enumerate``)
    or of the DP, without computing V^H when it is huge."""
    from synthetic import markov
    from synthetic import tree as tr
    V, H = args.vocab, args.horizon
    tr.check_size(V, H)
    if args.markov:
        return markov.markov_num_states(V, H), V
    if args.command == "mc" or getattr(args, "method", "dp") == "enumerate":
        tr.check_enumerable(V, H)
    elif tr.power_exceeds(V, H, tr.MAX_DP_STATES * V) or tr.num_states(V, H) > tr.MAX_DP_STATES:
        count = f"{tr.num_states(V, H):,}" if not tr.power_exceeds(V, H, 1 << 62) else \
            f"about 10^{H * math.log10(V) - math.log10(V - 1):,.0f}"
        raise InputError(f"a prefix tree with V={V}, H={H} has {count} states, more than the {tr.MAX_DP_STATES:,} "
                         "the exact engines handle; use --markov for long horizons, or the Monte Carlo path")
    return tr.num_states(V, H), V


def _tree_from_args(args, copies: float = ENGINE_COPIES):
    """The environment of ``--tables`` or of the generator options, refused (``InputError``, with the
    estimate) when ``copies`` float64 [S, V] tables would not fit in memory."""
    from synthetic import markov
    from synthetic import tree as tr
    _check_knobs(args)
    what = f"vopd {args.command}"
    if args.tables:
        if args.markov:
            raise InputError("--markov generates a chain; --tables gives prefix-tree tables: use one of them")
        env = tr.from_npz(args.tables, args.horizon)
        tr.check_memory(env.num_states, env.vocab, copies, what)
        return env
    if args.vocab is None:
        raise InputError("give either --tables FILE.npz or --vocab V to generate a tree")
    states, vocab = _environment_size(args)
    tr.check_memory(states, vocab, copies, what)
    knobs = dict(teacher_temperature=args.teacher_temperature, teacher_shape=args.teacher_shape,
                 divergence=args.divergence, coupling=args.coupling, seed=args.seed)
    if args.markov:
        return markov.make_markov(args.vocab, args.horizon, **knobs)
    return tr.make_tree(args.vocab, args.horizon, **knobs)


def _non_finite_paths(value, path: str = ""):
    """The paths (``a.b[3]``) of the floats in a JSON-like value that are NaN or infinite."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite_paths(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _non_finite_paths(item, f"{path}[{i}]")


def _nulled(value):
    """A copy of a JSON-like value with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _nulled(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulled(item) for item in value]
    return value


def _strict_json(obj: dict) -> str:
    """``obj`` as strict JSON (no NaN or Infinity tokens): where a float is not finite it becomes null and
    ``obj["non_finite"]`` lists the paths (a list's entries collapsed to ``name[]``)."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError:
        paths = _collapsed(_non_finite_paths(obj))
        return json.dumps({**_nulled(obj), "non_finite": paths}, allow_nan=False)


def _collapsed(paths) -> list:
    """``a.b[3]``, ``a.b[7]`` -> ``a.b[]``: one entry per field, in order of appearance."""
    out = {}
    for path in paths:
        out.setdefault(path.split("[")[0] + ("[]" if "[" in path else ""), None)
    return list(out)


def _note_non_finite(result: dict) -> None:
    """Print a note naming the results that are not finite in float64 (text output)."""
    paths = _collapsed(_non_finite_paths(result))
    if paths:
        print("note: not finite in float64 (null in --json): " + ", ".join(paths))


def _given_params(args) -> dict:
    """The ``--param NAME=VALUE`` assignments with the ``--k K`` shorthand folded in."""
    from ..params import parse_assignments, with_shorthand
    return with_shorthand(parse_assignments(args.param), args.k)


def cmd_exact(args) -> None:
    from ..params import describe
    from .analysis import analyse, single_sequence_names
    names = [n.strip() for n in args.estimators.split(",") if n.strip()] if args.estimators is not None else None
    if names is not None and not names:
        raise InputError("--estimators is empty")
    count = len(single_sequence_names(names))
    tree = _tree_from_args(args, ENGINE_COPIES + COPIES_PER_ESTIMATOR * count)
    result = analyse(tree, _given_params(args), names=names, method=args.method)
    if args.json:
        print(_strict_json(result))
        return
    print(f"V={tree.vocab} H={tree.horizon}  sequence reverse KL J = {result['sequence_kl']:.6g}  "
          f"|grad J| = {result['grad_sequence_norm']:.4g}  |g_tok| = {result['grad_token_norm']:.4g}")
    if result["capped"]:
        print(f"note: registry default k above V capped at V={tree.vocab}: "
              + ", ".join(f"{c['estimator']} ({c['param']}={c['default']})" for c in result["capped"]))
    for name, why in result["skipped"].items():
        print(f"note: {name} left out: {why}")
    rows = [(name, describe(row["params"]), row) for name, row in result["estimators"].items()]
    wn = max([len("estimator")] + [len(n) for n, _, _ in rows])
    wp = max([len("params")] + [len(p) for _, p, _ in rows])
    print(f"{'estimator':{wn}s} {'params':{wp}s} {'unbiased for':14s} {'tr Cov':>12s} {'|bias| tok':>12s} "
          f"{'|bias| seq':>12s}")
    for name, params, row in rows:
        print(f"{name:{wn}s} {params:{wp}s} {row['unbiased_for']:14s} {row['total_variance']:12.5g} "
              f"{row['bias_token']:12.3g} {row['bias_sequence']:12.3g}")
    _note_non_finite(result)


def _check_mc_options(args) -> None:
    """``--samples`` at least 3 (the variance needs 2, the unbiasedness test 3) and 0 < ``--alpha`` < 1."""
    if args.samples < 3:
        raise InputError(f"--samples must be at least 3 (the variance and the unbiasedness test need them), "
                         f"got {args.samples}")
    if not 0.0 < args.alpha < 1.0:
        raise InputError(f"--alpha, the test's level, must satisfy 0 < alpha < 1, got {args.alpha}")


def _check_mc_size(tree, samples: int, group: int) -> None:
    """Refuse draws that do not fit: ``samples`` [S V] gradients plus the [n K, H, V] batch they come from."""
    elements = samples * (tree.num_states * tree.vocab + 4 * group * tree.horizon * tree.vocab)
    if elements > MC_MAX_ELEMENTS:
        raise InputError(f"{samples} draws of {tree.num_states * tree.vocab:,} parameters"
                         + (f" (each a group of {group} sequences)" if group > 1 else "")
                         + f" need about {elements * 8 / 2**30:,.1f} GiB, more than the {MC_MAX_ELEMENTS * 8 / 2**30:.1f} "
                         "GiB allowed; lower --samples or the tree size")


def cmd_mc(args) -> None:
    from synthetic.markov import MarkovChain
    from synthetic.tree import MAX_EXACT_SEQUENCES

    from ..estimators import get
    from ..params import cap_to_vocab, describe, resolve
    from . import montecarlo as mc
    from . import targets
    _check_mc_options(args)
    entry = get(args.estimator)
    given = _given_params(args)
    full = resolve(entry.name, given)
    tree = _tree_from_args(args)
    params, capped = cap_to_vocab(entry.name, full, given, tree.vocab)
    group = params["group_size"] if entry.group else 1
    if entry.group and not (isinstance(group, int) and group >= 2):
        raise InputError(f"estimator '{entry.name}' needs group_size >= 2 rollouts per draw, got {group!r}")
    _check_mc_size(tree, args.samples, group)
    draws = mc.sample_gradients(tree, args.estimator, args.samples, args.seed, **params)
    low, high = mc.trace_covariance_interval(draws, MC_INTERVAL)
    out = {"estimator": args.estimator, "params": params, "capped": capped, "samples": args.samples,
           "sequences_per_draw": group, "trace_covariance": mc.trace_covariance(draws),
           "trace_covariance_interval": {"low": low, "high": high, "confidence": MC_INTERVAL,
                                         "method": "normal over the per-draw |g_i - mean|^2"}}
    if isinstance(tree, MarkovChain) or tree.num_sequences <= MAX_EXACT_SEQUENCES:
        tq = targets.tree_quantities(tree)
        for label, vector in (("token", tq.grad_token), ("sequence", tq.grad_sequence)):
            test = mc.unbiasedness_test(draws, vector.numpy().ravel(), alpha=args.alpha, seed=args.seed)
            out[f"test_{label}"] = {"reject": test.reject, "inconclusive": test.inconclusive, "p_value": test.p_value,
                                    "statistic": test.statistic, "draws_needed": test.draws_needed}
    if args.json:
        print(_strict_json(out))
        return
    per_draw = f" (each a group of {group} sequences)" if entry.group else ""
    print(f"{args.estimator} ({describe(params)}): {args.samples} draws{per_draw}, "
          f"tr Cov ~ {out['trace_covariance']:.5g} ({MC_INTERVAL:.0%} normal interval {low:.5g} to {high:.5g})")
    for c in capped:
        print(f"  note: {c['param']}={c['used']} (registry default {c['default']} capped at V={tree.vocab})")
    for label in ("token", "sequence"):
        if f"test_{label}" in out:
            t = out[f"test_{label}"]
            verdict = (f"inconclusive: need about {t['draws_needed']} draws" if t["inconclusive"] else
                       "REJECT unbiasedness" if t["reject"] else "consistent with unbiased")
            print(f"  vs {label:8s} target: p = {t['p_value']:.3g} at alpha = {args.alpha}: {verdict}")


def build_exact_parser() -> Parser:
    parser = Parser(prog="vopd exact", formatter_class=DefaultsFormatter)
    parser.set_defaults(command="exact")
    _add_tree_options(parser)
    _add_param_options(parser, "every selected estimator that takes it")
    parser.add_argument("--estimators",
                        help="comma-separated subset of estimators (default: every single-sequence one)")
    parser.add_argument("--method", choices=["dp", "enumerate"], default="dp",
                        help="dynamic programming (any size that fits in memory) or enumerating all V^H sequences")
    return parser


def build_mc_parser() -> Parser:
    parser = Parser(prog="vopd mc", formatter_class=DefaultsFormatter,
                    description="Draw --samples gradients of one estimator from sequences sampled from the "
                    "student, print their trace variance tr Cov with a 95% normal (CLT) interval over the per-draw "
                    "squared deviations |g_i - mean|^2 (cheap, one pass; too narrow for heavy-tailed draws), and "
                    "test unbiasedness against the exact token and sequence targets "
                    "(vopd_analysis.tabular.montecarlo.unbiasedness_test).")
    parser.set_defaults(command="mc")
    _add_tree_options(parser)
    parser.add_argument("--estimator", required=True, help="a registered estimator (vopd estimators; required)")
    _add_param_options(parser, "the estimator")
    parser.add_argument("--samples", type=int, default=2000,
                        help="number of draws (at least 3); a group estimator's draw is one group of group_size "
                             "sequences")
    parser.add_argument("--alpha", type=float, default=0.01, help="level of the unbiasedness test, 0 < alpha < 1")
    return parser


def main_exact(argv=None) -> int:
    """``vopd exact``: exact bias and variance of every selected estimator on one environment."""
    cmd_exact(parse_command(build_exact_parser(), argv or []))
    return 0


def main_mc(argv=None) -> int:
    """``vopd mc``: Monte Carlo draws of one estimator and the unbiasedness test."""
    cmd_mc(parse_command(build_mc_parser(), argv or []))
    return 0
