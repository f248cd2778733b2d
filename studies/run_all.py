"""Run every study: ``python -m studies.run_all [--quick] [--out figures] [--only a,b]``.

Each study module exposes ``run(quick, out_dir) -> DataFrame``. The LLM studies
(llm_variance, distill_tiny) are included when they exist and expose that
interface; otherwise they are skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import time

from tqdm import tqdm

TABULAR = ["unbiasedness", "variance_landscape", "baseline_quality", "topk", "sequence_bias", "training_dynamics"]
OPTIONAL = ["llm_variance", "distill_tiny"]


def available(names) -> list:
    """(name, run) for each study whose module exists and has run(quick, out_dir)."""
    found = []
    for name in names:
        if importlib.util.find_spec(f"studies.{name}") is None:
            print(f"note: studies/{name}.py is missing; skipped")
            continue
        run = getattr(importlib.import_module(f"studies.{name}"), "run", None)
        params = inspect.signature(run).parameters if callable(run) else {}
        if not {"quick", "out_dir"} <= set(params):
            print(f"note: studies.{name} has no run(quick, out_dir); skipped")
            continue
        found.append((name, run))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="figures")
    parser.add_argument("--only", help="comma-separated study names")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else TABULAR + OPTIONAL
    timings = {}
    bar = tqdm(available(names), desc="studies", unit="study")
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
