"""Run every study: ``python -m studies.run_all [--quick] [--out DIR] [--only a,b]`` (default DIR: figures with
--quick, figures/full without).

Each study module exposes ``run(quick, out_dir) -> DataFrame``. The LLM studies
use the committed tiny teacher/student pair (vopd_analysis/lm/pairs/tiny).
"""

from __future__ import annotations

import argparse
import importlib
import time

from tqdm import tqdm

from . import common

STUDIES = ["unbiasedness", "test_calibration", "variance_landscape", "baseline_quality", "topk", "sequence_bias",
           "training_dynamics", "estimator_zoo", "pair_statistics", "llm_variance", "llm_variance_small",
           "vocab_effect",
           "variance_training", "distill_tiny", "distill_bstar", "distill_small"]


def study(name: str):
    """The ``run`` function of studies/<name>.py; an unknown name lists the known ones."""
    if name not in STUDIES:
        raise SystemExit(f"error: unknown study '{name}'; known studies: {', '.join(STUDIES)}")
    return importlib.import_module(f"studies.{name}").run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="output folder (default: figures with --quick, figures/full without)")
    parser.add_argument("--only", help="comma-separated study names")
    args = parser.parse_args()
    args.out = args.out or common.default_out(args.quick)
    names = args.only.split(",") if args.only else STUDIES
    runs = [(name, study(name)) for name in names]
    timings = {}
    bar = tqdm(runs, desc="studies", unit="study")
    for name, run in bar:
        bar.set_postfix_str(name)
        started = time.perf_counter()
        run(quick=args.quick, out_dir=args.out)
        timings[name] = time.perf_counter() - started
    for name, seconds in timings.items():
        print(f"{name:20s} {seconds:7.1f} s")
    print(f"{'total':20s} {sum(timings.values()):7.1f} s")


if __name__ == "__main__":
    main()
