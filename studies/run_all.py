"""Run every study: ``python -m studies.run_all [--quick] [--out DIR] [--only a,b] [--compare DIR]``.

Each study module exposes ``run(quick, out_dir) -> DataFrame`` and ``READS``, the studies whose
outputs it reads from the output folder; they run in ``order``, each after those it reads. The LLM
studies use the committed pairs (vopd_analysis/lm/pairs). By default the outputs go to a fresh folder,
``runs/figures-quick`` (or ``runs/figures-full``), and every table written is then compared
with the committed one of the same name (``figures`` or ``figures/full``): identical bytes,
the same rows and columns with the largest relative difference (columns that differ by float
round-off only are named as such: ``compare_table``, ``ROUND_OFF``), or a different shape. The
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

# every study, by module name: each module of studies/ but these (so a new study is one new file); the order
# they run in is ``order(STUDIES)``, from what each declares it reads
INFRASTRUCTURE = ("__init__", "cli", "common", "run_all")
STUDIES = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in INFRASTRUCTURE)


def study(name: str):
    """The ``run`` function of studies/<name>.py; an unknown name lists the known ones."""
    if name not in STUDIES:
        raise SystemExit(f"error: unknown study '{name}'; known studies: {', '.join(STUDIES)}")
    return importlib.import_module(f"studies.{name}").run


def reads(name: str) -> tuple:
    """The studies whose outputs study ``name`` reads: its module's ``READS``."""
    return tuple(importlib.import_module(f"studies.{name}").READS)


def order(names: list, reads=reads) -> list:
    """``names`` in an order where every study runs after the studies it reads (``reads(name)``; those not in
    ``names`` are left out: their outputs must already be there), otherwise as given (a stable topological
    sort: each step takes the first study whose inputs have run). A cycle raises ``SystemExit``."""
    waiting = {name: set(reads(name)) & set(names) for name in names}
    done = []
    while waiting:
        ready = next((name for name in names if name in waiting and not waiting[name] - set(done)), None)
        if ready is None:
            raise SystemExit(f"error: the studies {', '.join(waiting)} read each other's outputs in a cycle")
        done.append(ready)
        del waiting[ready]
    return done


# Round-off rule of compare_table: a pair of entries (new, committed) is round-off when both are at most
# ROUND_OFF in absolute value (float64 round-off of the studies' O(1) quantities is about 1e-16, their smallest
# real values about 1e-6), or when it is round-off by construction (UNDEFINED); a column whose differing
# entries are all round-off is reported as round-off, not as a difference.
ROUND_OFF = 1e-12
# entries that are round-off by construction, whatever their size: {(table, column): (column, value)}, the
# rows where the second column holds that value. unbiasedness.csv's cos_sequence of an estimator whose exact
# mean gradient is the zero vector (k1, claimed target "zero"): that mean is round-off, so is its direction.
UNDEFINED = {("unbiasedness.csv", "cos_sequence"): ("claimed_target", "zero")}


def compare_table(new: Path, old: Path) -> str:
    """How the table ``new`` differs from the committed ``old`` (of the same file name): "identical";
    "same shape, round-off only (in COLUMNS)"; "same shape, max diff X of the column's scale (in COLUMN)"
    (max over entries of |new - old| / max |old| of that column, the entries that are round-off left out,
    see ``ROUND_OFF``), followed by "; round-off in COLUMNS" where some columns differ by round-off only;
    "rows A -> B"; "columns differ"; "text columns differ"; "non-finite entries differ"; or "no committed
    table". Prints no warning."""
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
    if (np.isfinite(x) != np.isfinite(y)).any():
        return "same shape, non-finite entries differ"
    with np.errstate(all="ignore"):
        differs = np.isfinite(x) & (x != y)
        scale = np.max(np.where(np.isfinite(y), np.abs(y), 0.0), axis=0, initial=0.0)
        rel = np.where(differs, np.abs(x - y) / np.maximum(scale, 1e-300), 0.0)
    round_off = (np.abs(x) <= ROUND_OFF) & (np.abs(y) <= ROUND_OFF)
    for j, column in enumerate(num):
        marker = UNDEFINED.get((new.name, column))
        if marker is not None and marker[0] in b:
            round_off[:, j] |= (b[marker[0]] == marker[1]).to_numpy()
    real = differs & ~round_off
    noise = [c for j, c in enumerate(num) if differs[:, j].any() and not real[:, j].any()]
    if not real.any():
        return f"same shape, round-off only (in {', '.join(noise)})" if noise else "same shape, same values"
    worst = np.where(real, rel, 0.0)
    j = int(worst.max(axis=0).argmax())
    return (f"same shape, max diff {worst.max():.2g} of the column's scale (in {num[j]})"
            + (f"; round-off in {', '.join(noise)}" if noise else ""))


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
    runs = {name: study(name) for name in names}     # an unknown name is refused before any study runs
    timings = {}
    bar = tqdm(order(names), desc="studies", unit="study")
    for name in bar:
        bar.set_postfix_str(name)
        started = time.perf_counter()
        runs[name](quick=args.quick, out_dir=args.out)
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
