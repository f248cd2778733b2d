"""The ``vopd`` command.

    vopd estimators [--json]                      the registry with its metadata
    vopd exact --tables F.npz --horizon H [--k K] [--json]
    vopd exact --vocab V --horizon H [--coupling ...] [--markov] [--method dp|enumerate] [--k K] [--json]
    vopd mc --vocab V --horizon H --estimator NAME [--samples N] [--alpha A] [--json]
    vopd study NAME [--quick] [--out DIR]         one study script (python -m studies.NAME)
    vopd distill ...                              the distillation loop (vopd distill --help)
    vopd sweep --estimators opd,vopd --seeds 0,1 --out DIR ...   distill runs, estimators x seeds
    vopd compare RUN_DIR... [--reference NAME]    final evals over seeds, paired differences, curves

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
    print(f"{'name':14s} {'unbiased for':14s} {'teacher':8s} {'params':28s} description")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        print(f"{r['name']:14s} {r['unbiased_for']:14s} {r['teacher_signal']:8s} {params:28s} {r['description']}")


def cmd_exact(args) -> None:
    from .tabular.analysis import analyse
    tree = _tree_from_args(args)
    names = args.estimators.split(",") if args.estimators else None
    if names:
        from .estimators import get
        for name in names:
            get(name)
    result = analyse(tree, k=args.k, names=names, method=args.method)
    if args.json:
        json.dump(result, sys.stdout)
        print()
        return
    print(f"V={tree.vocab} H={tree.horizon} k={args.k}  sequence reverse KL J = {result['sequence_kl']:.6g}  "
          f"|grad J| = {result['grad_sequence_norm']:.4g}  |g_tok| = {result['grad_token_norm']:.4g}")
    print(f"{'estimator':14s} {'unbiased for':14s} {'tr Cov':>12s} {'|bias| tok':>12s} {'|bias| seq':>12s}")
    for name, row in result["estimators"].items():
        print(f"{name:14s} {row['unbiased_for']:14s} {row['total_variance']:12.5g} "
              f"{row['bias_token']:12.3g} {row['bias_sequence']:12.3g}")


def cmd_mc(args) -> None:
    from synthetic.tree import MAX_EXACT_SEQUENCES
    from .tabular import montecarlo as mc, targets
    from .estimators import get
    tree = _tree_from_args(args)
    entry = get(args.estimator)
    params = {"k": args.k} if "k" in entry.defaults else {}
    if tree.num_states * tree.vocab * args.samples > 2e8:
        raise InputError(f"{args.samples} draws of {tree.num_states * tree.vocab:,} parameters do not fit in "
                         "memory; lower --samples or the tree size")
    draws = mc.sample_gradients(tree, args.estimator, args.samples, args.seed, **params)
    out = {"estimator": args.estimator, "samples": args.samples, "trace_covariance": mc.trace_covariance(draws)}
    if tree.num_sequences <= MAX_EXACT_SEQUENCES:
        tq = targets.tree_quantities(tree)
        for label, vector in (("token", tq.grad_token), ("sequence", tq.grad_sequence)):
            test = mc.unbiasedness_test(draws, vector.numpy().ravel(), alpha=args.alpha, seed=args.seed)
            out[f"test_{label}"] = {"reject": test.reject, "inconclusive": test.inconclusive, "p_value": test.p_value,
                                    "statistic": test.statistic, "draws_needed": test.draws_needed}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{args.estimator}: {args.samples} draws, tr Cov ~ {out['trace_covariance']:.5g}")
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
    p.add_argument("--k", type=int, default=2, help="k for the top-k estimators")
    p.add_argument("--estimators", help="comma-separated subset of estimators")
    p.add_argument("--method", choices=["dp", "enumerate"], default="dp",
                   help="dynamic programming (default; any size that fits in memory) or enumerating all V^H sequences")
    p = sub.add_parser("mc", help="Monte Carlo draws of one estimator and the unbiasedness test")
    _add_tree_options(p)
    p.add_argument("--estimator", required=True)
    p.add_argument("--k", type=int, default=2)
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
