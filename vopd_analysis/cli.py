"""The ``vopd`` command.

    vopd estimators [--json]                      the registry with its metadata
    vopd exact --tables F.npz --horizon H [--param NAME=VALUE ...] [--k K] [--json]
    vopd exact --vocab V --horizon H [--coupling ...] [--markov] [--method dp|enumerate]
               [--estimators a,b] [--param NAME=VALUE ...] [--json]
    vopd mc --vocab V --horizon H --estimator NAME [--param NAME=VALUE ...] [--samples N] [--alpha A] [--json]
    vopd study NAME [--quick] [--out DIR]         one study script (python -m studies.NAME)
    vopd distill ...                              the distillation loop (vopd distill --help)
    vopd sweep --estimators opd,vopd --seeds 0,1 --out DIR ...   distill runs, estimators x seeds
    vopd compare RUN_DIR... [--reference NAME]    final evals over seeds, paired differences, curves
    vopd probe --preset NAME | --student S --teacher T --prompts F [--estimators ...] --out DIR
                                                  gradient variance per estimator on a real pair

Estimator parameters (``vopd_analysis.params``): ``--param NAME=VALUE`` (repeatable, value read
as JSON), ``--k K`` short for ``--param k=K``; unset ones take the registry's defaults, a default
top-k size above the vocabulary V is capped at V (and the output says so). ``vopd exact`` gives
each parameter to every selected estimator that takes it, and refuses one that none takes.

Bad input prints one line ``error: ...`` naming the problem and exits with status 2, argparse's
own complaints (a missing or malformed option) included. A Ctrl-C prints ``interrupted`` and exits
with status 130, also while torch is still importing (the package imports it only inside ``main``).
``--json`` output is strict JSON: a result that is not finite in float64 is written as null and its
path listed under ``non_finite`` (the text output prints a note).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys

from .errors import InputError, interrupt_exits_at_once

# [S, V] float64 arrays the exact engines hold at once: the tables and tree_quantities' about a
# dozen, and per estimator its mean gradient and that mean as a Python list for the output
# (a float object and its pointer: 4 float64's worth).
ENGINE_COPIES, COPIES_PER_ESTIMATOR = 12, 5
MC_MAX_ELEMENTS = 2e8   # float64 values of the Monte Carlo draws and the batch they come from
MC_INTERVAL = 0.95      # coverage of the printed trace-variance interval


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as ``InputError``, so they print as one line like every other."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message} (see {self.prog} --help)")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help, except where the default is None (the help
    text then says what leaving it out means)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


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
    from synthetic import markov, tree as tr
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
    from synthetic import markov, tree as tr
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


def cmd_estimators(args) -> None:
    from .estimators import describe
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    table = [("name", "unbiased for", "teacher", "params", "description")] + [
        (r["name"], r["unbiased_for"], r["teacher_signal"], ", ".join(f"{k}={v}" for k, v in r["params"].items()),
         r["description"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print(" ".join(f"{cell:{w}s}" for cell, w in zip(row, widths)) + " " + row[4])


def _given_params(args) -> dict:
    """The ``--param NAME=VALUE`` assignments with the ``--k K`` shorthand folded in."""
    from .params import parse_assignments, with_shorthand
    return with_shorthand(parse_assignments(args.param), args.k)


def cmd_exact(args) -> None:
    from .params import describe
    from .tabular.analysis import analyse, single_sequence_names
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
    from .tabular import montecarlo as mc, targets
    from .estimators import get
    from .params import cap_to_vocab, describe, resolve
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


def _study_names() -> list:
    """The studies ``vopd study`` runs: ``studies.run_all.STUDIES`` (imported only when needed)."""
    try:
        return list(importlib.import_module("studies.run_all").STUDIES)
    except ImportError as err:
        raise InputError(f"cannot list the studies: {err} (run from the repository root)") from None


class _StudyHelp(argparse.Action):
    """``vopd study --help``: the usage with the list of studies, imported only now."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = "studies: " + ", ".join(_study_names())
        parser.print_help()
        parser.exit()


def cmd_study(args) -> None:
    names = _study_names()
    if args.name not in names:
        raise InputError(f"no study named '{args.name}'; known studies: {', '.join(names)}")
    module = importlib.import_module(f"studies.{args.name}")
    module.run(quick=args.quick, out_dir=args.out or ("figures" if args.quick else "figures/full"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vopd", description="OPD gradient estimators: bias, variance, baselines")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("estimators", help="list the estimator registry")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("exact", help="exact bias and variance of every estimator on a prefix tree",
                       formatter_class=_DefaultsFormatter)
    _add_tree_options(p)
    _add_param_options(p, "every selected estimator that takes it")
    p.add_argument("--estimators", help="comma-separated subset of estimators (default: every single-sequence one)")
    p.add_argument("--method", choices=["dp", "enumerate"], default="dp",
                   help="dynamic programming (any size that fits in memory) or enumerating all V^H sequences")
    p = sub.add_parser("mc", help="Monte Carlo draws of one estimator and the unbiasedness test",
                       formatter_class=_DefaultsFormatter,
                       description="Draw --samples gradients of one estimator from sequences sampled from the "
                       "student, print their trace variance tr Cov with a 95% normal (CLT) interval over the per-draw "
                       "squared deviations |g_i - mean|^2 (cheap, one pass; too narrow for heavy-tailed draws), and "
                       "test unbiasedness against the exact token and sequence targets "
                       "(vopd_analysis.tabular.montecarlo.unbiasedness_test).")
    _add_tree_options(p)
    p.add_argument("--estimator", required=True, help="a registered estimator (vopd estimators; required)")
    _add_param_options(p, "the estimator")
    p.add_argument("--samples", type=int, default=2000,
                   help="number of draws (at least 3); a group estimator's draw is one group of group_size sequences")
    p.add_argument("--alpha", type=float, default=0.01, help="level of the unbiasedness test, 0 < alpha < 1")
    p = sub.add_parser("study", help="run one study script", add_help=False)
    p.add_argument("-h", "--help", action=_StudyHelp, help="show this help message and the studies, and exit")
    p.add_argument("name", help="the study (listed below)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="folder for the table, manifest and figure (default: figures with --quick, "
                   "figures/full without, as python -m studies.NAME)")
    sub.add_parser("distill", help="the distillation loop (vopd distill --help)", add_help=False)
    sub.add_parser("sweep", help="distill runs for estimators x seeds in one folder (vopd sweep --help)",
                   add_help=False)
    sub.add_parser("compare", help="compare distill runs over seeds (vopd compare --help)", add_help=False)
    sub.add_parser("probe", help="gradient variance of estimators on a real pair (vopd probe --help)", add_help=False)
    return parser


def _silence_broken_pipe() -> int:
    """After stdout's reader went away (``vopd estimators | head -3``): point stdout at /dev/null so
    that the interpreter's final flush cannot raise again, and return 141 (128 + SIGPIPE), the
    status of a process killed by the broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # stdout without a file descriptor (captured)
        pass
    return 141


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] in (["distill"], ["sweep"], ["compare"], ["probe"]):
            name = {"distill": ".distill.command", "sweep": ".distill.sweep", "compare": ".distill.compare",
                    "probe": ".lm.probe"}[argv[0]]
            with interrupt_exits_at_once():          # torch imports for seconds: a Ctrl-C then ends it at once
                module = importlib.import_module(name, __package__)
            return module.main(argv[1:]) or 0
        args = build_parser().parse_args(argv)
        {"estimators": cmd_estimators, "exact": cmd_exact, "mc": cmd_mc, "study": cmd_study}[args.command](args)
        sys.stdout.flush()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _silence_broken_pipe()
    except KeyboardInterrupt as err:   # a run saves its checkpoint and says how to resume before this
        print("interrupted", file=sys.stderr)
        return getattr(err, "status", 130)   # 143 after a SIGTERM (distill.stopping.Interrupted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
