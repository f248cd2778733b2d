"""Run every study: ``python -m studies.run_all [--quick] [--out DIR] [--only a,b] [--compare DIR]``.

Each study module exposes ``run(quick, out_dir) -> DataFrame``. The LLM studies use the
committed pairs (vopd_analysis/lm/pairs). By default the outputs go to a fresh folder,
``runs/figures-quick`` (or ``runs/figures-full``), and every table written is then compared
with the committed one of the same name (``figures`` or ``figures/full``): identical bytes,
the same rows and columns with the largest relative difference, or a different shape. The
committed outputs are rewritten only with ``--out figures`` (``--out figures/full``).
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tqdm import tqdm

from . import common

STUDIES = ["unbiasedness", "test_calibration", "variance_landscape", "baseline_quality", "topk", "sequence_bias",
           "training_dynamics", "estimator_zoo", "pair_statistics", "llm_variance", "llm_variance_small",
           "llm_variance_smollm2", "llm_variance_gemma3", "vocab_effect",
           "variance_training", "distill_tiny", "distill_bstar", "distill_engines", "distill_small", "distill_smollm2",
           "distill_tuned"]


def study(name: str):
    """The ``run`` function of studies/<name>.py; an unknown name lists the known ones."""
    if name not in STUDIES:
        raise SystemExit(f"error: unknown study '{name}'; known studies: {', '.join(STUDIES)}")
    return importlib.import_module(f"studies.{name}").run


def compare_table(new: Path, old: Path) -> str:
    """How the table ``new`` differs from the committed ``old``: "identical"; "same shape, max diff X of
    the column's scale" (max over entries of |new - old| / max |old| of that column, so round-off in a
    near-zero entry reads as round-off); "rows A -> B"; "columns differ"; or "no committed table"."""
    if not old.is_file():
        return "no committed table"
    if new.read_bytes() == old.read_bytes():
        return "identical"
    a, b = pd.read_csv(new), pd.read_csv(old)
    if list(a.columns) != list(b.columns):
        return f"columns differ ({len(b.columns)} committed, {len(a.columns)} now)"
    if len(a) != len(b):
        return f"rows {len(b)} committed -> {len(a)} now"
    num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c]) and pd.api.types.is_numeric_dtype(b[c])]
    other = [c for c in a.columns if c not in num]
    if other and not a[other].astype(str).equals(b[other].astype(str)):
        return "same shape, text columns differ"
    x, y = a[num].to_numpy(float), b[num].to_numpy(float)
    both = np.isfinite(x) & np.isfinite(y)
    if (np.isfinite(x) != np.isfinite(y)).any():
        return "same shape, non-finite entries differ"
    scale = np.nanmax(np.where(np.isfinite(y), np.abs(y), np.nan), axis=0, initial=0.0)
    rel = (np.abs(x - y) / np.maximum(scale, 1e-300))[both]
    return f"same shape, max diff {rel.max() if rel.size else 0.0:.2g} of the column's scale"


def compare(out_dir: str, committed: str) -> list:
    """(file, verdict) for every CSV in ``out_dir``, against ``committed``/<same name>."""
    return [(p.name, compare_table(p, Path(committed) / p.name)) for p in sorted(Path(out_dir).glob("*.csv"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="output folder (default: runs/figures-quick or runs/figures-full; "
                                      "--out figures rewrites the committed outputs)")
    parser.add_argument("--only", help="comma-separated study names")
    parser.add_argument("--compare", help="committed folder to compare the tables with (default: figures with "
                                          "--quick, figures/full without)")
    args = parser.parse_args()
    args.out = args.out or f"runs/figures-{'quick' if args.quick else 'full'}"
    args.compare = args.compare or common.default_out(args.quick)
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
    if Path(args.out).resolve() != Path(args.compare).resolve():
        print(f"\ntables in {args.out} against the committed ones in {args.compare}:")
        for name, verdict in compare(args.out, args.compare):
            print(f"  {name:34s} {verdict}")


if __name__ == "__main__":
    main()
