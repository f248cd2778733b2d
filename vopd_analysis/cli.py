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

Estimator parameters (``vopd_analysis.params``): ``--param NAME=VALUE`` (repeatable, value read
as JSON), ``--k K`` short for ``--param k=K``; unset ones take the registry's defaults, a default
top-k size above the vocabulary V is capped at V (and the output says so). ``vopd exact`` gives
each parameter to every selected estimator that takes it, and refuses one that none takes.

Bad input prints one line ``error: ...`` naming the problem and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import InputError


def _add_tree_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tables", help="a .npz with student_logits and teacher_logits, each [S, V]")
    parser.add_argument("--horizon", type=int, required=True, help="H, the response length")
    parser.add_argument("--vocab", type=int, help="V, for a generated tree (ignored with --tables)")
    parser.add_argument("--teacher-temperature", type=float, default=1.0)
    parser.add_argument("--teacher-shape", choices=["gaussian", "zipf"], default="gaussian")
    parser.add_argument("--divergence", type=float, default=1.0, help="student-teacher gap")
    parser.add_argument("--coupling", type=float, default=0.0, help="future coupling strength kappa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markov", action="store_true",
                        help="generate a Markov chain (state = position and previous token) instead of a prefix tree")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _add_param_options(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument("--param", action="append", metavar="NAME=VALUE",
                        help=f"estimator parameter for {who}, value read as JSON (repeatable; default: the "
                             "registry's, a top-k size above V capped at V)")
    parser.add_argument("--k", type=int, help="shorthand for --param k=K (the top-k size)")


def _tree_from_args(args):
    from synthetic import markov, tree as tr
    if args.tables:
        return tr.from_npz(args.tables, args.horizon)
    if args.vocab is None:
        raise InputError("give either --tables FILE.npz or --vocab V to generate a tree")
    knobs = dict(teacher_temperature=args.teacher_temperature, teacher_shape=args.teacher_shape,
                 divergence=args.divergence, coupling=args.coupling, seed=args.seed)
    tr.check_size(args.vocab, args.horizon)
    if args.markov:
        return markov.make_markov(args.vocab, args.horizon, **knobs)
    if args.command == "mc" or getattr(args, "method", "dp") == "enumerate":
        tr.check_enumerable(args.vocab, args.horizon)
    elif tr.num_states(args.vocab, args.horizon) > tr.MAX_DP_STATES:
        raise InputError(f"a prefix tree with V={args.vocab}, H={args.horizon} has "
                         f"{tr.num_states(args.vocab, args.horizon):,} states, more than the {tr.MAX_DP_STATES:,} "
                         "the exact engines handle; use --markov for long horizons, or the Monte Carlo path")
    return tr.make_tree(args.vocab, args.horizon, **knobs)


def cmd_estimators(args) -> None:
    from .estimators import describe
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    wn = max(len(r["name"]) for r in rows)
    print(f"{'name':{wn}s} {'unbiased for':14s} {'teacher':8s} {'params':28s} description")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        print(f"{r['name']:{wn}s} {r['unbiased_for']:14s} {r['teacher_signal']:8s} {params:28s} {r['description']}")


def _given_params(args) -> dict:
    """The ``--param NAME=VALUE`` assignments with the ``--k K`` shorthand folded in."""
    from .params import parse_assignments, with_shorthand
    return with_shorthand(parse_assignments(args.param), args.k)


def cmd_exact(args) -> None:
    from .params import describe
    from .tabular.analysis import analyse
    tree = _tree_from_args(args)
    names = [n.strip() for n in args.estimators.split(",") if n.strip()] if args.estimators else None
    if names is not None and not names:
        raise InputError("--estimators is empty")
    result = analyse(tree, _given_params(args), names=names, method=args.method)
    if args.json:
        json.dump(result, sys.stdout)
        print()
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


def cmd_mc(args) -> None:
    from synthetic.tree import MAX_EXACT_SEQUENCES
    from .tabular import montecarlo as mc, targets
    from .estimators import get
    from .params import cap_to_vocab, describe, resolve
    entry = get(args.estimator)
    given = _given_params(args)
    full = resolve(entry.name, given)
    tree = _tree_from_args(args)
    params, capped = cap_to_vocab(entry.name, full, given, tree.vocab)
    if tree.num_states * tree.vocab * args.samples > 2e8:
        raise InputError(f"{args.samples} draws of {tree.num_states * tree.vocab:,} parameters do not fit in "
                         "memory; lower --samples or the tree size")
    draws = mc.sample_gradients(tree, args.estimator, args.samples, args.seed, **params)
    group = params["group_size"] if entry.group else 1
    out = {"estimator": args.estimator, "params": params, "capped": capped, "samples": args.samples,
           "sequences_per_draw": group, "trace_covariance": mc.trace_covariance(draws)}
    if tree.num_sequences <= MAX_EXACT_SEQUENCES:
        tq = targets.tree_quantities(tree)
        for label, vector in (("token", tq.grad_token), ("sequence", tq.grad_sequence)):
            test = mc.unbiasedness_test(draws, vector.numpy().ravel(), alpha=args.alpha, seed=args.seed)
            out[f"test_{label}"] = {"reject": test.reject, "inconclusive": test.inconclusive, "p_value": test.p_value,
                                    "statistic": test.statistic, "draws_needed": test.draws_needed}
    if args.json:
        print(json.dumps(out))
        return
    per_draw = f" (each a group of {group} sequences)" if entry.group else ""
    print(f"{args.estimator} ({describe(params)}): {args.samples} draws{per_draw}, "
          f"tr Cov ~ {out['trace_covariance']:.5g}")
    for c in capped:
        print(f"  note: {c['param']}={c['used']} (registry default {c['default']} capped at V={tree.vocab})")
    for label in ("token", "sequence"):
        if f"test_{label}" in out:
            t = out[f"test_{label}"]
            verdict = (f"inconclusive: need about {t['draws_needed']} draws" if t["inconclusive"] else
                       "REJECT unbiasedness" if t["reject"] else "consistent with unbiased")
            print(f"  vs {label:8s} target: p = {t['p_value']:.3g} at alpha = {args.alpha}: {verdict}")


def cmd_study(args) -> None:
    try:
        module = importlib.import_module(f"studies.{args.name}")
    except ModuleNotFoundError:
        raise InputError(f"no study named '{args.name}' (see the studies/ folder)") from None
    module.run(quick=args.quick, out_dir=args.out or ("figures" if args.quick else "figures/full"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vopd", description="OPD gradient estimators: bias, variance, baselines")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("estimators", help="list the estimator registry")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("exact", help="exact bias and variance of every estimator on a prefix tree")
    _add_tree_options(p)
    _add_param_options(p, "every selected estimator that takes it")
    p.add_argument("--estimators", help="comma-separated subset of estimators (default: every single-sequence one)")
    p.add_argument("--method", choices=["dp", "enumerate"], default="dp",
                   help="dynamic programming (default; any size that fits in memory) or enumerating all V^H sequences")
    p = sub.add_parser("mc", help="Monte Carlo draws of one estimator and the unbiasedness test")
    _add_tree_options(p)
    p.add_argument("--estimator", required=True)
    _add_param_options(p, "the estimator")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--alpha", type=float, default=0.01)
    p = sub.add_parser("study", help="run one study script")
    p.add_argument("name")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="folder for the table, manifest and figure (default: figures with --quick, "
                   "figures/full without, as python -m studies.NAME)")
    sub.add_parser("distill", help="the distillation loop (vopd distill --help)", add_help=False)
    sub.add_parser("sweep", help="distill runs for estimators x seeds in one folder (vopd sweep --help)",
                   add_help=False)
    sub.add_parser("compare", help="compare distill runs over seeds (vopd compare --help)", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] in (["distill"], ["sweep"], ["compare"]):
            module = {"distill": "loop"}.get(argv[0], argv[0])
            return importlib.import_module(f".distill.{module}", __package__).main(argv[1:]) or 0
        args = build_parser().parse_args(argv)
        {"estimators": cmd_estimators, "exact": cmd_exact, "mc": cmd_mc, "study": cmd_study}[args.command](args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
