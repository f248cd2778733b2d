"""Working memory of the variance probe on a large vocabulary: the fused path against the materialised one.

    python -m benchmarks.probe_memory [--quick] [--preset gemma3] [--no-record]

One probe batch of the preset's pair (one prompt, K rollouts scored together as one group, the
gradient over the last two decoder layers and the final norm) with opd, vopd, opd_bstar and full_kl,
once with ``--logits materialised`` and once with ``--logits fused``, in one process. For each: the
peak of the bytes PyTorch's allocator holds above what was alive before the call
(``common.peak_memory``: the models are loaded before and not counted) and the wall time. Beside
them, the materialised path's estimate: a group's student logits, their gradient and the teacher's
logits, 3 K T V x 4 bytes (float32), what the fused path never builds. Both paths give the same
variance ratios (checked here to float32 round-off).
"""

from __future__ import annotations

import argparse
import time

import torch

from vopd_analysis.lm import loading, probe
from vopd_analysis.lm.presets import PRESETS

from . import common

ESTIMATORS = ["opd", "vopd", "opd_bstar", "full_kl"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 rollouts of 16 tokens instead of 8 of 32")
    parser.add_argument("--preset", default="gemma3")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    pair = loading.load_pair(*preset.sources(None, True))
    rollouts, tokens = (4, 16) if args.quick else (8, 32)
    planned = probe.plan(ESTIMATORS, pair.info.vocab_size, preset.topk)
    config = {"num_batches": 1, "num_prompts": 1, "num_rollouts": rollouts, "max_new_tokens": tokens, "seed": 0,
              "num_projections": 0, "parameters": "last:2", "per_rollout": False}
    results = {}
    for path in ("materialised", "fused"):
        cfg = {**config, "logits": path}
        out = {}

        def one():
            out["tables"] = probe.run(pair, planned, cfg, source=preset.train_prompts, progress=False)
        started = time.perf_counter()
        peak = common.peak_memory(one, torch.device("cpu"))
        results[path] = {"peak": peak, "seconds": time.perf_counter() - started, "tables": out["tables"]}
    ratios = {p: r["tables"].summary.set_index("estimator")["ratio_gmean"] for p, r in results.items()}
    agree = float((ratios["fused"] / ratios["materialised"] - 1).abs().max())
    V = pair.info.vocab_size
    estimate = 3 * rollouts * tokens * V * 4
    mib = 2 ** 20
    text = "\n".join([
        f"{args.preset}: V = {V:,}, one group of {rollouts} rollouts x {tokens} new tokens, gradient over the last 2 "
        f"layers and the final norm, estimators {', '.join(ESTIMATORS)}, CPU, {torch.get_num_threads()} threads.",
        "",
        "| path | peak working memory (MiB) | wall time (s) |",
        "|---|---|---|",
        *[f"| {p} | {r['peak'] / mib:,.0f} | {r['seconds']:.1f} |" for p, r in results.items()],
        "",
        f"Materialised logits estimate (student logits, their gradient, teacher logits: 3 K T V x 4 bytes): "
        f"{estimate / mib:,.0f} MiB. Fused / materialised peak: {results['fused']['peak'] / results['materialised']['peak']:.2f}. "
        f"Variance ratios of the two paths agree to {agree:.1e} (relative).",
    ])
    print(text)
    if not args.no_record:
        common.record("probe_memory", args.quick, text, torch.device("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
