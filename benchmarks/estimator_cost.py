"""Cost of one loss forward+backward per estimator, as a ratio to ``opd``.

    python -m benchmarks.estimator_cost            # full grid (vocab up to 152k)
    python -m benchmarks.estimator_cost --quick    # a few minutes on a 2-core CPU

For each (vocabulary V, tokens per batch N) the script builds one synthetic batch and times
``surrogate_loss(name, batch).backward()`` for every estimator, interleaving the repetitions
(rotated order per round) and reporting the median over rounds of time(estimator) / time(opd)
measured in the same round. Peak memory is measured once per estimator, separately (the
profiler would distort timings).

What the numbers mean
* Student logits are a leaf ``[B, T, V]`` tensor with ``requires_grad`` (float32 on CPU,
  bfloat16 on CUDA); teacher tensors are detached. The gradient is cleared before every run.
* Each estimator reads the batch it would get in practice: ``opd`` / ``vopd`` / ``full_kl`` /
  ``gkd_jsd`` a batch with the full teacher logits and the teacher's logsumexp (a by-product
  of the teacher log-probs that ``opd`` gets precomputed too, as ``scoring.score`` provides them);
  ``vopd/own-lse`` is ``vopd`` on the same batch without the logsumexp, so the baseline
  exponentiates the teacher logits itself; ``opd+read(t)`` is ``opd`` followed by one sum over
  the teacher logits, the floor for any baseline that reads them; ``opd/autograd`` is ``opd``
  through plain autograd (gather - logsumexp) instead of the chunked pass of
  ``divergences._ChunkedTokenLogprobs``; ``opd/eager``, ``vopd/eager`` and ``opd_bstar/eager`` are
  those estimators with the fused compiled kernels off (``VOPD_COMPILE=0``, ``vopd_analysis.chunk_kernels``),
  the eager chunked pass that every estimator used before them; ``vopd_topk`` and ``topk_kl`` a batch
  with the teacher's top-k fields only (``student_topk_ids`` + ``teacher_logprobs_on_student_topk``,
  ``teacher_topk_ids`` + ``teacher_topk_logprobs``), as a top-k scorer provides them. Producing
  these fields (teacher forward, top-k selection) happens before the loss and is not timed.
* ``mem`` is the peak of the bytes held by tensors created during the forward+backward
  (temporaries, tensors saved for backward, backward temporaries, the student ``.grad``) above
  what was alive before; the batch inputs are excluded and listed separately as ``inputs``.
  On CPU it comes from ``torch.profiler`` memory events, on CUDA from
  ``torch.cuda.max_memory_allocated`` (see ``benchmarks.common.peak_memory``).
* ``floor``: the time the bytes an estimator must move take on this machine, measured in the same
  interleaved rounds as the estimators by two probes (``floor_time``): a copy of z into a
  preallocated tensor (one read + one write pass) and a fill of a newly allocated tensor of z's
  size (the gradient's one write into fresh memory, whose page faults it pays on CPU because each
  step's ``.grad`` is new memory; on this machine they cost more than the arithmetic). The bytes are whole
  [N, V] passes (``floor_passes``): opd reads z in the forward, reads z and writes the gradient in
  the backward (3 passes); a detached full-vocabulary baseline (vopd, opd_bstar) adds one read of
  the teacher logits (4), a KL with a gradient (full_kl) reads them again in the backward (5).
  O(N k) and O(N) traffic is left out. The table gives opd's floor in ms
  and each estimator's floor as a ratio to opd's measured time, beside its time ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from vopd_analysis import chunk_kernels
from vopd_analysis import divergences as dv
from vopd_analysis import estimators as E
from vopd_analysis.batch import TokenBatch

from . import common

# (label, registry name, parameters, which batch it reads)
ESTIMATORS: List[Tuple[str, str, dict, str]] = [
    ("opd", "opd", {}, "full"),
    ("opd+read(t)", "opd", {}, "full"),
    ("opd/autograd", "opd", {}, "full"),
    ("opd/eager", "opd", {}, "full"),
    ("vopd", "vopd", {}, "full"),
    ("vopd/eager", "vopd", {}, "full"),
    ("vopd/own-lse", "vopd", {}, "full_own_lse"),
    ("vopd_topk@16", "vopd_topk", {"k": 16}, "topk"),
    ("vopd_topk@64", "vopd_topk", {"k": 64}, "topk"),
    ("vopd_topk@256", "vopd_topk", {"k": 256}, "topk"),
    ("full_kl", "full_kl", {}, "full"),
    ("topk_kl@64", "topk_kl", {"k": 64}, "topk"),
    ("gkd_jsd", "gkd_jsd", {"beta": 0.5}, "full"),
    ("opd_bstar", "opd_bstar", {}, "full"),
    ("opd_bstar/eager", "opd_bstar", {}, "full"),
    ("opd_bstar_topk@16", "opd_bstar_topk", {"k": 16}, "topk"),
    ("vopd_scaled", "vopd_scaled", {"alpha": 0.5}, "full"),
    ("iw_opd", "iw_opd", {}, "full"),
    ("topk_tail_kl@16", "topk_tail_kl", {"k": 16}, "topk"),
    ("student_topk_kl@100", "student_topk_kl", {"k": 100}, "topk"),
    ("k3_clamped", "k3_clamped", {}, "full"),
    ("opd/rho=0.2", "opd", {"rho": 0.2}, "full"),
]
REFERENCE = "opd"
# opd followed by one read of the teacher logits (a sum over V): the least that any baseline
# needing the full teacher distribution adds to opd, whatever its kernel.
FLOOR = "opd+read(t)"
# opd with plain autograd (gather - logsumexp), the composite that the chunked pass replaced
AUTOGRAD = "opd/autograd"
TOPK_MAX = 256
# "<estimator>/eager": the estimator with the compiled kernels of vopd_analysis.chunk_kernels off
EAGER_SUFFIX = "/eager"
# "<estimator>/unchecked": the estimator without TokenBatch.validate (whose logits check reads every
# [N, V] field the estimator reads once more: the teacher logits for a full-vocabulary baseline)
UNCHECKED_SUFFIX = "/unchecked"
UNCHECKED: List[Tuple[str, str, dict, str]] = [
    ("opd/unchecked", "opd", {}, "full"),
    ("vopd/unchecked", "vopd", {}, "full"),
    ("opd_bstar/unchecked", "opd_bstar", {}, "full"),
]

# (V, tokens per batch); the batch is [B, T] with B = 8 sequences of T = N / 8 tokens.
FULL_VOCABS = (1024, 8192, 32768, 151936)
FULL_TOKENS = (256, 1024, 4096)
QUICK_VOCABS = (1024, 8192, 32768, 151936)
QUICK_TOKENS = (64, 256, 1024)
FULL_MAX_ELEMENTS = 1 << 28      # N * V: 1 GiB per float32 [N, V] tensor
QUICK_MAX_ELEMENTS = 1 << 24     # 64 MiB per float32 [N, V] tensor
SEQUENCES = 8


@dataclasses.dataclass
class Measurement:
    """One (V, N, estimator) cell of the table."""

    vocab: int
    tokens: int
    label: str
    floor_s: float           # median memory-traffic floor (floor_time); nan if not measured
    floor_ratio: float       # median over rounds of floor / time(opd) in the same round
    time_s: float            # median seconds of one forward+backward
    time_ratio: float        # median over rounds of time / time(opd) in the same round
    mem_bytes: int           # peak working memory of forward+backward (inputs excluded)
    mem_ratio: float         # mem_bytes / mem_bytes(opd)
    input_bytes: int         # bytes of the batch tensors this estimator reads


def make_batches(vocab: int, tokens: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, topk: int = TOPK_MAX) -> Dict[str, TokenBatch]:
    """Full-logits batches (with and without the teacher logsumexp) and a top-k batch sharing
    the same leaf student logits."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = SEQUENCES if tokens % SEQUENCES == 0 and tokens >= SEQUENCES else 1
    T = tokens // B
    z = (2.0 * torch.randn(B, T, vocab, generator=g)).to(device=device, dtype=dtype)
    t = (z.float() + torch.randn(B, T, vocab, generator=g).to(device)).to(dtype)
    with torch.no_grad():
        # y_t ~ softmax(z) by Gumbel-max, in chunks to keep the setup light
        ys = []
        for zb in z.float().split(1, dim=0):
            u = torch.rand(zb.shape, generator=g).to(device).clamp_min_(1e-20)
            ys.append((zb - u.log_().neg_().log_()).argmax(-1))
        y = torch.cat(ys)
        teacher_lse = dv.logsumexp_detached(t)
        teacher_tok = dv.logprobs_at(t, y.unsqueeze(-1), teacher_lse).squeeze(-1)
        k = min(topk, vocab)
        s_ids = torch.topk(z, k, dim=-1).indices
        t_ids = torch.topk(t, k, dim=-1).indices
        t_on_s = dv.logprobs_at(t, s_ids)
        t_on_t = dv.logprobs_at(t, t_ids)
    z = z.detach().requires_grad_(True)
    mask = torch.ones(B, T, device=device)
    own_lse = TokenBatch(tokens=y, mask=mask, student_logits=z, teacher_token_logprobs=teacher_tok,
                         teacher_logits=t.detach())
    full = dataclasses.replace(own_lse, teacher_logsumexp=teacher_lse)
    top = TokenBatch(tokens=y, mask=mask, student_logits=z, teacher_token_logprobs=teacher_tok,
                     teacher_topk_ids=t_ids, teacher_topk_logprobs=t_on_t,
                     student_topk_ids=s_ids, teacher_logprobs_on_student_topk=t_on_s)
    return {"full": full, "full_own_lse": own_lse, "topk": top}


def _step(name: str, params: dict, batch: TokenBatch, validate: bool = True):
    def run():
        batch.student_logits.grad = None
        loss = E.surrogate_loss(name, batch, validate=validate, **params)
        loss.backward()
    return run


def _floor_step(batch: TokenBatch):
    opd = _step(REFERENCE, {}, batch)

    def run():
        opd()
        batch.teacher_logits.sum(-1)
    return run


def _eager_step(name: str, params: dict, batch: TokenBatch):
    """The estimator with the compiled kernels off for the duration of the call: the eager chunked pass."""
    inner = _step(name, params, batch)

    def run():
        with chunk_kernels.eager():
            inner()
    return run


# memory-traffic probes timed in the same rounds as the estimators (not estimators themselves)
COPY_PROBE, FRESH_PROBE = "(copy z)", "(fresh fill)"


def _probes(z: torch.Tensor) -> Dict[str, object]:
    """``COPY_PROBE``: z copied into a preallocated tensor of its size (one read + one write pass);
    ``FRESH_PROBE``: a newly allocated tensor of z's size filled once (on CPU the kernel faults in
    and zeroes its pages first, as it does for each step's new gradient)."""
    x = z.detach()
    dst = torch.empty_like(x)
    return {COPY_PROBE: lambda: dst.copy_(x), FRESH_PROBE: lambda: torch.empty_like(x).fill_(1.0)}


def floor_time(label: str, copy_s: float, fresh_s: float) -> float:
    """The memory-traffic floor of ``label`` from one round's probe times: its ``floor_passes`` less
    the gradient's write at the copy probe's rate (a copy = 2 passes), the gradient's write at the
    fresh-fill probe's."""
    return (floor_passes(label) - 1) * copy_s / 2 + fresh_s


def floor_passes(label: str) -> int:
    """Whole [N, V] passes (reads + writes of one logits-sized tensor) that the estimator must make:
    3 for opd (z in the forward; z and the gradient in the backward), one more read of the teacher
    for a detached full-vocabulary baseline, one more again when the KL carries a gradient."""
    name = label.split("/")[0].split("@")[0].split("+")[0]
    if label == FLOOR:
        return 4
    if name in ("full_kl", "gkd_jsd"):
        return 5
    return 3 + (E.get(name).teacher_signal == "full")


def _autograd_step(batch: TokenBatch):
    z = batch.student_logits

    def run():
        z.grad = None
        x = z.to(dv.compute_dtype(z))
        lp = x.gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, -1)
        E.score_surrogate(batch, lp, E.log_ratio(batch, lp)).mean().backward()
    return run


def measure(vocab: int, tokens: int, device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None, repeats: int = 7, warmup: int = 2,
            estimators: Sequence[Tuple[str, str, dict, str]] = ESTIMATORS,
            measure_memory: bool = True, min_sample_s: float = 0.05, floor: bool = True) -> List[Measurement]:
    """One row per estimator for one (V, N): median time, ratios to opd, peak working memory, and
    (``floor``) the memory-traffic floor from probes timed in the same rounds (``floor_time``)."""
    device = torch.device(device) if device is not None else common.default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    labels = [e[0] for e in estimators]
    if REFERENCE not in labels:
        raise ValueError(f"the estimator list must contain the reference '{REFERENCE}'")
    batches = make_batches(vocab, tokens, device, dtype)
    # k above the vocabulary (tiny smoke sizes) is clamped to V; the label keeps the nominal k
    estimators = [(label, name, {**params, "k": min(params["k"], vocab)} if "k" in params else params, kind)
                  for label, name, params, kind in estimators]
    special = {FLOOR: _floor_step, AUTOGRAD: _autograd_step}
    fns = {label: special[label](batches[kind]) if label in special
           else _eager_step(name, params, batches[kind]) if label.endswith(EAGER_SUFFIX)
           else _step(name, params, batches[kind], validate=False) if label.endswith(UNCHECKED_SUFFIX)
           else _step(name, params, batches[kind])
           for label, name, params, kind in estimators}
    mem: Dict[str, int] = {}
    if measure_memory:
        for label in labels:
            batches["full"].student_logits.grad = None
            gc.collect()
            mem[label] = common.peak_memory(fns[label], device)
    if floor:
        fns.update(_probes(batches["full"].student_logits))
    times = common.time_interleaved(fns, device, repeats=repeats, warmup=warmup, min_sample_s=min_sample_s)
    batches["full"].student_logits.grad = None
    rows = []
    for label, name, params, kind in estimators:
        floors = ([floor_time(label, c, f) for c, f in zip(times[COPY_PROBE], times[FRESH_PROBE])]
                  if floor else [float("nan")])
        rows.append(Measurement(
            vocab=vocab, tokens=tokens, label=label,
            floor_s=statistics.median(floors),
            floor_ratio=common.paired_ratio(floors, times[REFERENCE]) if floor else float("nan"),
            time_s=statistics.median(times[label]),
            time_ratio=common.paired_ratio(times[label], times[REFERENCE]),
            mem_bytes=mem.get(label, -1),
            mem_ratio=(mem[label] / mem[REFERENCE]) if measure_memory and mem[REFERENCE] > 0 else float("nan"),
            input_bytes=_input_bytes(name, batches[kind])))
    del batches, fns
    gc.collect()
    return rows


def _input_bytes(name: str, batch: TokenBatch) -> int:
    """Bytes of the batch fields the estimator reads (tokens, mask, student, and its teacher signal)."""
    fields = ["tokens", "mask", "student_logits", "teacher_token_logprobs"]
    signal = E.get(name).teacher_signal
    if signal == "full":
        fields += ["teacher_logits", "teacher_logsumexp"]
    elif name == "vopd_topk":
        fields += ["student_topk_ids", "teacher_logprobs_on_student_topk"]
    elif name == "topk_kl":
        fields += ["teacher_topk_ids", "teacher_topk_logprobs"]
    total = 0
    for f in fields:
        v = getattr(batch, f)
        if v is not None:
            total += v.numel() * v.element_size()
    return total


def grid(quick: bool) -> List[Tuple[int, int]]:
    """The (V, N) cells measured: every vocabulary and token count with V N under the mode's cap."""
    vocabs, toks, cap = ((QUICK_VOCABS, QUICK_TOKENS, QUICK_MAX_ELEMENTS) if quick
                         else (FULL_VOCABS, FULL_TOKENS, FULL_MAX_ELEMENTS))
    return [(v, n) for v in vocabs for n in toks if v * n <= cap]


# ----------------------------------------------------------------------------- output

def _mb(b: int) -> str:
    return f"{b / 2**20:.1f}"


def format_table(rows: Sequence[Measurement]) -> str:
    """A Markdown table: one line per (V, N), one cell per estimator (time x / mem x (floor x)),
    plus the absolute opd time, its floor (ms) and working memory. floor x = the estimator's
    memory-traffic floor over opd's measured time: no kernel can push its time ratio below it."""
    labels = list(dict.fromkeys(r.label for r in rows))
    sizes = list(dict.fromkeys((r.vocab, r.tokens) for r in rows))
    by = {(r.vocab, r.tokens, r.label): r for r in rows}
    head = ["V", "tokens", "opd ms", "opd floor ms", "opd MiB"] + [l for l in labels if l != REFERENCE]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for v, n in sizes:
        ref = by[(v, n, REFERENCE)]
        cells = [str(v), str(n), f"{1e3 * ref.time_s:.1f}", f"{1e3 * ref.floor_s:.2f}", _mb(ref.mem_bytes)]
        for l in labels:
            if l == REFERENCE:
                continue
            r = by.get((v, n, l))
            cells.append("-" if r is None else
                         f"{r.time_ratio:.2f} / {r.mem_ratio:.2f} ({r.floor_ratio:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# time ratio to opd (issue 25), at V >= TARGET_MIN_VOCAB; memory ratio at most MEM_TARGET there
TARGETS = {"vopd": 1.05, "opd_bstar": 1.10, "vopd_topk@16": 1.03, "vopd_topk@64": 1.03,
           "vopd_topk@256": 1.03, "opd_bstar_topk@16": 1.03}
TARGET_MIN_VOCAB = 8192
MEM_TARGET = 1.005           # 1.00x as printed


def check_targets(rows: Sequence[Measurement]) -> List[str]:
    """Lines naming every (V, N, estimator) at V >= TARGET_MIN_VOCAB whose time or memory ratio
    misses its target."""
    misses = []
    for r in rows:
        lim = TARGETS.get(r.label)
        if lim is None or r.vocab < TARGET_MIN_VOCAB:
            continue
        for what, x, lim in (("time", r.time_ratio, lim), ("mem", r.mem_ratio, MEM_TARGET)):
            if x > lim:
                misses.append(f"{r.label} V={r.vocab} N={r.tokens}: {what} {x:.3f}x > {lim}x")
    return misses


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("VOPD_COMPILE", "1")     # the compiled kernels on, also on the CPU; X/eager turns them off
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grid, a few minutes on a laptop CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per size (default 7)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: with OpenMP spin-waiting, a CPU shared with other "
                        "processes makes multi-threaded timings swing by orders of magnitude)")
    p.add_argument("--unchecked", action="store_true",
                   help="add opd, vopd and opd_bstar without TokenBatch.validate (columns X/unchecked)")
    p.add_argument("--sizes", nargs="+", default=None, metavar="VxN",
                   help="only these (vocabulary x tokens) cells, e.g. 8192x256 (default: the grid)")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    p.add_argument("--results", default=None, help="results file (default benchmarks/RESULTS.md)")
    args = p.parse_args(argv)

    device = torch.device(args.device) if args.device else common.default_device()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or 7
    info = common.machine_info(device)
    print(f"# estimator cost ({'quick' if args.quick else 'full'}) on {common.describe_machine(info)}",
          flush=True)
    rows: List[Measurement] = []
    sizes = ([tuple(int(x) for x in c.lower().split("x")) for c in args.sizes] if args.sizes
             else grid(args.quick))
    estimators = ESTIMATORS + (UNCHECKED if args.unchecked else [])
    for v, n in sizes:
        size_rows = measure(v, n, device=device, repeats=repeats, estimators=estimators)
        rows += size_rows
        ref = size_rows[0]
        print(f"V={v:>6} N={n:>5}  opd {1e3 * ref.time_s:8.1f} ms (floor {1e3 * ref.floor_s:.1f}) "
              f"{_mb(ref.mem_bytes):>8} MiB  " +
              "  ".join(f"{r.label} {r.time_ratio:.2f}/{r.mem_ratio:.2f}" for r in size_rows[1:]), flush=True)
    table = format_table(rows)
    misses = check_targets(rows)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    text = "\n".join([
        f"`python -m benchmarks.estimator_cost{' --quick' if args.quick else ''}"
        f"{' --unchecked' if args.unchecked else ''}{' --sizes ' + ' '.join(args.sizes) if args.sizes else ''}` "
        f"(student logits {dtype}, {repeats} interleaved rounds, median).",
        "",
        "Each cell: time ratio / peak-working-memory ratio to `opd` in the same process. "
        "Working memory = peak bytes of tensors created during forward+backward (incl. the student grad), "
        "inputs excluded; on CPU from `torch.profiler` memory events.",
        "`vopd_topk` and `topk_kl` read a top-k batch (no full teacher logits); the full-logit estimators "
        "also get the teacher logsumexp that the scorer computes with the teacher log-probs, except "
        "`vopd/own-lse`, which computes it. `opd+read(t)` = opd plus one sum over the teacher logits: "
        "the least any full-vocabulary baseline can add. `opd/autograd` = opd through plain autograd "
        "(gather - logsumexp) instead of the chunked pass. `X/eager` = estimator X with the compiled "
        "kernels off (`VOPD_COMPILE=0`): the eager chunked pass, as before them." +
        (" `X/unchecked` = estimator X without `TokenBatch.validate`, whose logits check reads the teacher "
         "logits once more for a full-vocabulary baseline (compare vopd/unchecked with opd/unchecked)."
         if args.unchecked else ""),
        "In parentheses: the estimator's memory-traffic floor as a ratio to opd's time (median over rounds): "
        "the whole [N, V] passes it must make (opd 3: z read in the forward, z read and the gradient written "
        "in the backward; a detached full-vocabulary baseline 4, full_kl 5), timed by two probes in the same "
        "rounds: a copy of z into a preallocated tensor (2 passes) and a fill of a newly allocated tensor of "
        "z's size (the gradient's write into fresh memory, page faults included). `opd floor ms` is opd's floor.",
        "",
        table,
        "",
        f"Targets at V >= {TARGET_MIN_VOCAB} (time: vopd <= 1.05x, opd_bstar <= 1.10x, vopd_topk and "
        "opd_bstar_topk <= 1.03x; memory 1.00x): " +
        ("all met." if not misses else "missed:\n" + "\n".join(f"- {m}" for m in misses)),
    ])
    print()
    print(table)
    print()
    print(text.splitlines()[-1] if not misses else "\n".join(["targets missed:"] + misses))
    if not args.no_write:
        path = common.append_results(text, path=args.results, info=info,
                                     title=f"estimator_cost{' --quick' if args.quick else ''}")
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
