"""The exact engines at scale: enumeration and dynamic programming against the slow reference.

    python -m benchmarks.exact_engine [--quick] [--no-record]

Measures, in one process:
1. speed-up of the vectorised enumeration and of the DP over the per-sequence
   autograd reference (``enumeration.reference_moments``) on a small tree, every
   single-sequence estimator (the reference loop is timed on a fixed subset of
   sequences and scaled by the count: it is one autograd call per sequence);
2. wall time of all estimators at V=8, H=6 (262,144 sequences), enumeration and DP;
3. peak resident memory of enumeration as the tree grows (one subprocess per size,
   so each peak is its own), showing the streaming keeps it flat;
4. DP on Markov chains with horizons in the hundreds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from synthetic.markov import make_markov
from synthetic.tree import make_tree
from vopd_analysis import estimators as est
from vopd_analysis.tabular import analysis, dp, enumeration, targets

from .common import record


def _seconds(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def reference_seconds(tree, specs, subset: int) -> float:
    """Time of the per-sequence reference over all sequences, from a timed subset."""
    sub = make_tree(tree.vocab, tree.horizon)  # same shape; the loop cost does not depend on values
    start = time.perf_counter()
    tq = targets.tree_quantities(sub)
    for tokens in sub.sequences(0, subset):
        for spec in specs.values():
            params = {k: v for k, v in spec.items() if k != "name"}
            theta = torch.tensor(sub.student_logits, requires_grad=True)
            states = sub.state_ids(tokens[None])
            batch = sub.token_batch(tokens[None], theta[states], tq.kl_to_go, tq.next_kl_to_go)
            torch.autograd.grad(est.per_sequence(spec["name"], batch, **params).sum(), theta)
    return (time.perf_counter() - start) * tree.num_sequences / subset


def peak_rss_mib(vocab: int, horizon: int) -> float:
    """Peak resident memory (MiB) of a fresh process that runs enumeration of all estimators."""
    code = ("import resource; from synthetic.tree import make_tree; from vopd_analysis.tabular import analysis, enumeration; "
            f"enumeration.exact_moments(make_tree({vocab}, {horizon}, coupling=1.0), analysis.default_specs(4)); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = analysis.default_specs(4)
    lines = []

    small = make_tree(4, 6, coupling=1.0, seed=0)
    t_ref = reference_seconds(small, specs, subset=64 if args.quick else 256)
    t_enum = _seconds(lambda: enumeration.exact_moments(small, specs), 3)
    t_dp = _seconds(lambda: dp.dp_moments(small, specs), 3)
    lines += ["| what (all estimators, V=4, H=6, 4,096 sequences) | seconds | speed-up over the reference |",
              "|---|---|---|",
              f"| per-sequence autograd reference | {t_ref:.2f} | 1 |",
              f"| vectorised enumeration | {t_enum:.3f} | {t_ref / t_enum:.0f}x |",
              f"| dynamic programming | {t_dp:.3f} | {t_ref / t_dp:.0f}x |", ""]

    big = make_tree(8, 6, coupling=1.0, seed=0)
    t_enum_big = _seconds(lambda: enumeration.exact_moments(big, specs))
    t_dp_big = _seconds(lambda: dp.dp_moments(big, specs))
    lines += ["| all estimators, V=8, H=6 (262,144 sequences) | seconds |", "|---|---|",
              f"| vectorised enumeration | {t_enum_big:.2f} |",
              f"| dynamic programming | {t_dp_big:.2f} (enumeration / DP = {t_enum_big / t_dp_big:.1f}x) |", ""]

    sizes = [(8, 4), (8, 5)] if args.quick else [(8, 4), (8, 5), (8, 6), (8, 7)]
    lines += ["| enumeration, V=8 | sequences | peak RSS MiB |", "|---|---|---|"]
    lines += [f"| H={h} | {8 ** h:,} | {peak_rss_mib(v, h):.0f} |" for v, h in sizes] + [""]

    horizons = [100, 200] if args.quick else [100, 200, 400]
    lines += ["| DP on a Markov chain, V=8, all estimators | seconds |", "|---|---|"]
    for h in horizons:
        chain = make_markov(8, h, seed=0)
        lines.append(f"| H={h} | {_seconds(lambda: dp.dp_moments(chain, specs)):.2f} |")

    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record("exact_engine", args.quick, text, torch.device("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
