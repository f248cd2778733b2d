"""One distillation step per estimator on a Qwen-architecture pair with the real 151,936-token vocabulary.

    python -m benchmarks.distill_step [--quick] [--device cuda] [--no-record]

Student and teacher are Qwen2 models built from configs (random weights; no
download), small enough for a CPU, with the Qwen vocabulary. The rollouts are
fixed random token sequences, so every estimator sees the same batch and the
step is: score (student forward with grad + teacher forward + the teacher
signal the estimator needs), the estimator's loss, and the backward pass.
Rows marked "fused" take the fused path (``vopd_analysis.lm.fused_score``: backbone hidden
states, then the estimator over lm_head tiles, no [B, T, V] logits): "score" is then the two
backbones, "loss" the fused pass. Printed: milliseconds per phase, the whole step as a ratio
to ``opd`` (materialised) and, for a fused row, to the same estimator materialised (rounds
interleaved in one process, median of paired ratios), tokens/s, the loss as a fraction of the
step, and peak memory (CUDA: max_memory_allocated; CPU: the peak of tensors allocated during
the step, from torch.profiler). A second table does the same on the committed tiny pair
(vocabulary 16) at the tiny preset's batch, where ``--logits auto`` keeps the materialised path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from vopd_analysis import estimators as est
from vopd_analysis.lm import fused_score as fs
from vopd_analysis.lm import loading
from vopd_analysis.lm import rollouts as ro
from vopd_analysis.lm import scoring as sc
from vopd_analysis.lm.smoke import tiny_qwen2

from .common import paired_ratio, peak_memory, record, synchronize

QWEN_VOCAB = 151_936
ESTIMATORS = [("opd", {}), ("vopd", {}), ("vopd_topk", {"k": 16}), ("vopd_topk", {"k": 64}),
              ("vopd_topk", {"k": 256}), ("opd_bstar", {}), ("full_kl", {}), ("topk_kl", {"k": 64}), ("gkd_jsd", {})]
FUSED = ["opd", "vopd", "opd_bstar", "full_kl"]     # also timed on the fused path


def build_pair(device, dtype, hidden: int):
    """(student in train mode, teacher in eval mode): smoke-preset Qwen2 models (``tiny_qwen2``) with the
    Qwen vocabulary, the student ``hidden`` wide with 2 layers, the teacher 1.5x as wide with 3."""
    def model(width, layers, seed):
        return tiny_qwen2(None, seed, vocab_size=QWEN_VOCAB, hidden_size=width, num_layers=layers,
                          max_position_embeddings=1024).to(device=device, dtype=dtype)

    return model(hidden, 2, 0).train(), model(int(hidden * 1.5), 3, 1).eval()


def fixed_rollouts(num: int, prompt: int, response: int, device, vocab: int = QWEN_VOCAB) -> ro.Rollouts:
    """``num`` rollouts of uniformly random tokens below ``vocab`` (seed 0): ``prompt`` prompt columns,
    then ``response`` response columns, no padding; one rollout per prompt."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (num, prompt + response), generator=g).to(device)
    att = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, prompt:] = 1
    return ro.Rollouts(ids, att, resp, torch.arange(num, device=device), prompt)


def step_phases(student, teacher, rollouts, name, params, device, fused: bool = False, vocab_size=None):
    """Seconds of (score, loss, backward) for one step of estimator ``name``, materialised or fused.

    Gradient buffers are freed at the end, so every call starts without them and the peak
    memory of each call includes allocating them (the same for every estimator).
    """
    synchronize(device)
    t0 = time.perf_counter()
    if fused:
        hidden = fs.hidden_batch(student, teacher, rollouts, vocab_size)
    else:
        batch = sc.score(student, teacher, rollouts, [name], vocab_size=vocab_size, params={name: params})
    synchronize(device)
    t1 = time.perf_counter()
    if fused:
        loss = est.reduce(fs.values(hidden, name, params)[0], hidden.mask, "sequence_mean")
    else:
        loss = est.surrogate_loss(name, batch, **params)
    synchronize(device)
    t2 = time.perf_counter()
    loss.backward()
    synchronize(device)
    t3 = time.perf_counter()
    student.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, t3 - t2


def time_rows(student, teacher, rollouts, rows, rounds, device, vocab_size=None) -> tuple:
    """(phases, peaks) per row label; rows: label -> (name, params, fused). One warm-up round, then
    ``rounds`` rounds in a rotated order, then one peak-memory measurement per row."""
    def call(name, params, fused):
        return step_phases(student, teacher, rollouts, name, params, device, fused, vocab_size)

    for name, params, fused in rows.values():   # warm-up
        call(name, params, fused)
    phases = {label: [] for label in rows}
    for r in range(rounds):
        order = list(rows.items())
        order = order[r % len(order):] + order[:r % len(order)]
        for label, row in order:
            phases[label].append(call(*row))
    peaks = {label: peak_memory(lambda row=row: call(*row), device) for label, row in rows.items()}
    return phases, peaks


def summary(rows, phases, peaks, tokens) -> dict:
    """Per row label: median seconds of each phase and of the step, the step's paired ratio to ``opd``
    and (fused rows) to the same estimator materialised, tokens/s, peak bytes and their ratio to opd."""
    med = statistics.median_high
    totals = {label: [sum(p) for p in phases[label]] for label in rows}
    out = {}
    for label, (name, params, fused) in rows.items():
        score, loss, backward = (med([p[i] for p in phases[label]]) for i in range(3))
        step = med(totals[label])
        same = label.replace(" (fused)", "")
        out[label] = {"estimator": name, "params": params, "fused": fused, "score_s": score, "loss_s": loss,
                      "backward_s": backward, "step_s": step,
                      "step_vs_opd": paired_ratio(totals[label], totals["opd"]),
                      "step_vs_materialised": paired_ratio(totals[label], totals[same]) if fused else None,
                      "tokens_per_s": tokens / step, "peak_bytes": peaks[label],
                      "peak_vs_opd": peaks[label] / peaks["opd"]}
    return out


def table(rows, phases, peaks, tokens) -> list:
    """Markdown rows: phases, step / opd, step / the same estimator materialised (fused rows), tokens/s, peaks."""
    lines = ["| estimator | score ms | loss ms | backward ms | step / opd | step / materialised | loss share of step "
             "| tokens/s | peak MiB | peak / opd |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in summary(rows, phases, peaks, tokens).items():
        versus = "" if s["step_vs_materialised"] is None else f"{s['step_vs_materialised']:.3f}"
        lines.append(f"| {label} | {1e3 * s['score_s']:.0f} | {1e3 * s['loss_s']:.1f} | {1e3 * s['backward_s']:.0f} | "
                     f"{s['step_vs_opd']:.3f} | {versus} | {s['loss_s'] / s['step_s']:.1%} | "
                     f"{s['tokens_per_s']:.0f} | {s['peak_bytes'] / 2 ** 20:.0f} | {s['peak_vs_opd']:.2f} |")
    return lines


def tiny_pair_lines(rounds: int, device) -> list:
    """The tiny preset's step: the committed pair, 32 prompts x 4 rollouts of 8 tokens, vopd and opd_bstar."""
    from vopd_analysis.lm import tasks, tiny
    s_path, t_path, _ = tiny.load_or_train_pair(verbose=False)
    pair = loading.load_pair(s_path, t_path, device=device)
    pair.student.train()
    prompts = [r["prompt"] for r in tasks.train_prompts(32, seed=1)]
    rollouts = ro.generate_rollouts(pair.student, pair.tokenizer, prompts, 4, 8, seed=0,
                                    vocab_size=pair.info.vocab_size)
    rows = {"opd": ("opd", {}, False)}
    for name in ("vopd", "opd_bstar"):
        rows[name] = (name, {}, False)
        rows[name + " (fused)"] = (name, {}, True)
    phases, peaks = time_rows(pair.student, pair.teacher, rollouts, rows, rounds, device, pair.info.vocab_size)
    tokens = int(rollouts.response_mask.sum())
    return ["", f"Committed tiny pair (vocabulary {pair.info.vocab_size}), {rollouts.num_rollouts} rollouts, "
            f"{tokens} response tokens, {rounds} interleaved rounds, medians.", "",
            *table(rows, phases, peaks, tokens)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    hidden = 896 if on_gpu else 64
    rounds = 3 if args.quick else 7
    num, prompt, response = (8, 64, 512) if on_gpu else ((2, 16, 32) if args.quick else (4, 16, 64))
    student, teacher = build_pair(device, dtype, hidden)
    rollouts = fixed_rollouts(num, prompt, response, device)
    rows = {}
    for name, params in ESTIMATORS:
        label = name + (f"@{params['k']}" if "k" in params else "")
        rows[label] = (name, params, False)
        if name in FUSED:
            rows[label + " (fused)"] = (name, params, True)
    phases, peaks = time_rows(student, teacher, rollouts, rows, rounds, device)
    lines = [f"Student Qwen2 hidden {hidden} x 2 layers, teacher hidden {int(hidden * 1.5)} x 3 layers, "
             f"vocabulary {QWEN_VOCAB:,}, {dtype}, {num} rollouts x {response} response tokens "
             f"(+{prompt} prompt), {rounds} interleaved rounds, medians.", "",
             *table(rows, phases, peaks, num * response), *tiny_pair_lines(rounds, device)]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record("distill_step", args.quick, text, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
