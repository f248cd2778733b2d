"""Throughput of the gradient-variance probe: shared scoring, loop against vmap, and scoring per estimator.

    python -m benchmarks.variance_probe [--quick] [--no-record]

On a tiny Qwen2 pair (random weights, built from configs), the same rollouts are
turned into per-rollout gradients for five estimators in three ways, interleaved
in one process: ``rollout_gradients`` with all estimators at once, either with
method="loop" (one scoring per prompt group, one backward per rollout and
estimator through the batched graph) or method="vmap" (torch.func per-sample
gradients: one vmapped forward per rollout, one vmapped backward per rollout and
estimator); and the reference, one loop ``rollout_gradients`` call per estimator
(a scoring per prompt group and estimator, as a probe that handles estimators
one by one would do). Printed: rollout-gradients per second, each path's time
over the loop's (paired by round), and the largest difference between the vmap
and loop gradients.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from vopd_analysis.lm import rollouts as ro
from vopd_analysis.lm import tasks, variance
from vopd_analysis.lm.smoke import SMOKE_CHARS, tiny_qwen2

from .common import paired_ratio, record, time_interleaved

ESTIMATORS = {"opd": {}, "vopd": {}, "vopd_topk": {"k": 16}, "full_kl": {}, "topk_kl": {"k": 16}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    tokenizer = tasks.build_tokenizer(SMOKE_CHARS)
    vocab = len(tokenizer)
    hidden = 64 if args.quick else 128
    student = tiny_qwen2(tokenizer, seed=0, hidden_size=hidden, num_layers=2, max_position_embeddings=128)
    teacher = tiny_qwen2(tokenizer, seed=1, hidden_size=hidden, num_layers=3, max_position_embeddings=128)
    prompts = [f"{a}+{b}=" for a, b in [(12, 7), (3, 45), (20, 20), (9, 99)]]
    rollouts = ro.generate_rollouts(student, tokenizer, prompts, 4, 24, seed=0)
    named = variance.trainable_parameters(student)
    params = dict(ESTIMATORS)

    def gradients(method):
        return variance.rollout_gradients(student, teacher, rollouts, params, named, method=method)

    def shared(method="loop"):
        for _ in gradients(method):
            pass

    loop_grads, vmap_grads = (torch.stack([g for _, g in gradients(m)]) for m in ("loop", "vmap"))
    max_diff = float((vmap_grads - loop_grads).abs().max() / loop_grads.abs().max())

    def separate():
        for name in params:
            for _ in variance.rollout_gradients(student, teacher, rollouts, {name: params[name]}, named):
                pass

    rounds = 3 if args.quick else 7
    times = time_interleaved({"shared": shared, "vmap": lambda: shared("vmap"), "separate": separate}, device,
                             repeats=rounds)
    count = rollouts.num_rollouts * len(params)
    med = statistics.median_high
    text = "\n".join([
        f"Tiny Qwen2 pair (hidden {hidden}, vocabulary {vocab}), {rollouts.num_rollouts} rollouts "
        f"(4 prompts x 4), {len(params)} estimators, {rounds} interleaved rounds, medians.", "",
        "| path | rollout-gradients / s | time / shared loop |", "|---|---|---|",
        f"| shared scoring, loop (probe default) | {count / med(times['shared']):.0f} | 1.00 |",
        f"| shared scoring, vmap (method=\"vmap\") | {count / med(times['vmap']):.0f} | "
        f"{paired_ratio(times['vmap'], times['shared']):.2f} |",
        f"| scoring per estimator, loop (reference) | {count / med(times['separate']):.0f} | "
        f"{paired_ratio(times['separate'], times['shared']):.2f} |", "",
        f"vmap throughput / loop throughput: {1 / paired_ratio(times['vmap'], times['shared']):.2f}x; "
        f"largest |g_vmap - g_loop| / max |g_loop| = {max_diff:.1e}."])
    print(text)
    if not args.no_record:
        record("variance_probe", args.quick, text, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
