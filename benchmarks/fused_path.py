"""Fused (hidden states + lm_head, tiled) vs materialised logits: full_kl, vopd, ... and TRL 1.16.

    python -m benchmarks.fused_path --quick            # V = 151,936, d = 896, N in (512, 1024, 2048)
    python -m benchmarks.fused_path                    # N up to 4096
    python -m benchmarks.fused_path --quick --estimators opd full_kl vopd_topk opd_bstar --k 16
    python -m benchmarks.fused_path --quick --no-record --trl-path /tmp/trl_site --trl-stub-datasets

``--estimators`` picks any of ``fused.FUSED_ESTIMATORS`` (default: full_kl and vopd;
``TOPK_COMPARISON`` = opd, full_kl, vopd_topk, opd_bstar puts the top-k baseline next to the
full-vocabulary ones); ``--k`` sets the top-k size of the estimators that have one (default:
the registry's).

Each cell is one loss forward+backward from the hidden states of both models, gradients to
the student's h and W (no bias, logit scale 1, no soft-capping; float32 on CPU):

* ``materialised``: z = h_s W_s^T with autograd, the teacher's t = h_t W_t^T, logsumexp(t)
  and log p(y) under no_grad, then ``estimators.surrogate_loss(name, batch, "sum")`` on the
  TokenBatch (the registry's chunked pass over [N, V] logits);
* ``fused``: ``vopd_analysis.fused.fused_surrogate_loss(name, ..., reduction="sum")``, tiles of
  ``fused.default_chunks`` (1024 x 1024 on CPU), never an [N, V] tensor;
* ``trl``: TRL 1.16's ``_chunked_divergence_loss`` with beta = 1 (reverse KL, the full_kl
  value; TRL has no vOPD), num_items_in_batch = 1 (a sum). TRL is not a dependency: the
  column appears only if it imports. Without the ``datasets`` package (which
  ``trl.trainer.distillation_trainer`` imports, with pyarrow), ``--trl-stub-datasets`` imports
  the kernel that function calls, ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``,
  through a placeholder ``datasets`` module (only two class names are read at import), and
  calls it as ``_chunked_divergence_loss`` does on a device without Triton (every position
  projected, masked ones zeroed, summed).

Timing: ``common.time_interleaved`` (rotated order per round), time ratio = median over
rounds of time / time(materialised, same estimator) in the same round. Memory:
``common.peak_memory`` (CPU: torch.profiler memory events), the peak bytes of tensors created
during the call above what was alive before (inputs excluded), measured once per cell,
separately from the timings; it includes the gradients left behind (W_s.grad is V x d_s, the
floor of every method). Tokens are uniform ids and the mask is all ones: the cost does not
depend on which tokens were sampled.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import statistics
import sys
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from vopd_analysis import divergences as dv
from vopd_analysis import estimators as E
from vopd_analysis import fused as F
from vopd_analysis.batch import TokenBatch
from . import common

VOCAB = 151_936
HIDDEN = 896
QUICK_TOKENS = (512, 1024, 2048)
FULL_TOKENS = (512, 1024, 2048, 4096)
SEQUENCES = 8
ESTIMATORS = ("full_kl", "vopd")
TOPK_COMPARISON = ("opd", "full_kl", "vopd_topk", "opd_bstar")
REFERENCE = "materialised"
METHODS = ("materialised", "fused", "trl")


@dataclasses.dataclass
class Measurement:
    """One (N, estimator, method) cell."""

    tokens: int
    vocab: int
    hidden: int
    estimator: str
    method: str
    time_s: float          # median seconds of one forward+backward
    time_ratio: float      # median over rounds of time / time(materialised) in the same round
    mem_bytes: int         # peak working memory (inputs excluded), -1 if not measured
    mem_ratio: float       # mem_bytes / mem_bytes(materialised)
    value: float           # the loss (sum over tokens) of the last call
    value_error: float     # |value - value(materialised)| / max(1, |value(materialised)|)


# ----------------------------------------------------------------------------- TRL

def _placeholder_datasets() -> types.ModuleType:
    """A stand-in for the ``datasets`` package: the two class names ``trl.trainer.utils`` imports."""
    mod = types.ModuleType("datasets")
    mod.Dataset = type("Dataset", (), {})
    mod.IterableDataset = type("IterableDataset", (), {})
    return mod


def load_trl(path: Optional[str] = None, stub_datasets: bool = False) -> Tuple[Optional[Callable], str]:
    """(loss function or None, a line saying what was loaded or why not).

    The function has ``_chunked_divergence_loss``'s signature (student_hidden, teacher_hidden,
    student_weight, teacher_weight, mask, beta, num_items_in_batch) and returns the loss.
    """
    if path:
        sys.path.insert(0, path)
    try:
        import trl
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except Exception as err:   # ImportError, or anything a partial install raises at import
        first = f"{type(err).__name__}: {err}"
    else:
        def run(h_s, h_t, W_s, W_t, mask, beta, num_items_in_batch):
            return _chunked_divergence_loss(h_s, h_t, W_s, W_t, mask, beta, num_items_in_batch=num_items_in_batch)[0]
        return run, f"TRL {trl.__version__} `_chunked_divergence_loss`"
    if not stub_datasets:
        return None, f"TRL column skipped: `_chunked_divergence_loss` does not import ({first})"
    stubbed = importlib.util.find_spec("datasets") is None
    if stubbed:
        sys.modules["datasets"] = _placeholder_datasets()
    try:
        import trl
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    except Exception as err:
        return None, (f"TRL column skipped: `_chunked_divergence_loss` does not import ({first}), "
                      f"nor its kernel ({type(err).__name__}: {err})")
    finally:
        if stubbed:
            sys.modules.pop("datasets", None)

    def run(h_s, h_t, W_s, W_t, mask, beta, num_items_in_batch):
        # _chunked_divergence_loss on a device without Triton: every position projected, masked ones zeroed
        valid = mask.reshape(-1) != 0
        div, _ = ChunkedDivergenceFunction.apply(h_s.reshape(-1, h_s.shape[-1]), W_s, None,
                                                 h_t.reshape(-1, h_t.shape[-1]), W_t, None,
                                                 beta, 1.0, 1.0, None, 1.0, None)
        return div.masked_fill(~valid, 0).sum() / num_items_in_batch

    return run, (f"TRL {trl.__version__} `ChunkedDivergenceFunction` (the kernel of `_chunked_divergence_loss`, "
                 f"called as that function does without Triton; `_chunked_divergence_loss` itself does not import: "
                 f"{first}" + ("; imported through a placeholder `datasets` module" if stubbed else "") + ")")


# ----------------------------------------------------------------------------- problem and steps

@dataclasses.dataclass
class Problem:
    """Both models' hidden states and heads for N tokens (B = 8 sequences of T = N / 8)."""

    h_s: torch.Tensor      # [B, T, d] leaf, requires grad
    W_s: torch.Tensor      # [V, d] leaf, requires grad
    h_t: torch.Tensor      # [B, T, d] detached
    W_t: torch.Tensor      # [V, d] detached
    tokens: torch.Tensor   # [B, T]
    mask: torch.Tensor     # [B, T]

    def clear(self) -> None:
        self.h_s.grad = None
        self.W_s.grad = None

    def input_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.h_s, self.W_s, self.h_t, self.W_t))


def make_problem(tokens: int, vocab: int, hidden: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> Problem:
    """Random heads with logits of standard deviation ~2.5; the teacher is a perturbed student."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = SEQUENCES if tokens % SEQUENCES == 0 and tokens >= SEQUENCES else 1
    T = tokens // B
    sigma = 2.5 / hidden ** 0.5
    h_s = torch.randn(B, T, hidden, generator=g)
    W_s = sigma * torch.randn(vocab, hidden, generator=g)
    h_t = h_s + 0.5 * torch.randn(B, T, hidden, generator=g)
    W_t = W_s + 0.5 * sigma * torch.randn(vocab, hidden, generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    to = dict(device=device, dtype=dtype)
    return Problem(h_s.to(**to).requires_grad_(True), W_s.to(**to).requires_grad_(True),
                   h_t.to(**to), W_t.to(**to), y.to(device), torch.ones(B, T, device=device))


def estimator_params(name: str, k: Optional[int] = None) -> dict:
    """{"k": k} for an estimator with a top-k size (when k is given), else {}."""
    return {"k": k} if k is not None and "k" in E.get(name).defaults else {}


def materialised_step(name: str, p: Problem, out: Dict[str, float], key: str,
                      params: Optional[dict] = None) -> Callable[[], None]:
    """Logits built in full, then the registry estimator (``surrogate_loss(..., 'sum')``)."""
    params = params or {}

    def run():
        p.clear()
        z = p.h_s @ p.W_s.T
        with torch.no_grad():
            t = p.h_t @ p.W_t.T
            t_lse = dv.logsumexp_detached(t)
            t_lp = dv.logprobs_at(t, p.tokens.unsqueeze(-1), t_lse).squeeze(-1)
        batch = TokenBatch(tokens=p.tokens, mask=p.mask, student_logits=z, teacher_token_logprobs=t_lp,
                           teacher_logits=t, teacher_logsumexp=t_lse)
        loss = E.surrogate_loss(name, batch, reduction="sum", **params)
        loss.backward()
        out[key] = float(loss.detach())
    return run


def fused_step(name: str, p: Problem, out: Dict[str, float], key: str,
               token_chunk: Optional[int] = None, vocab_chunk: Optional[int] = None,
               params: Optional[dict] = None) -> Callable[[], None]:
    """``fused.fused_surrogate_loss(name, ..., reduction='sum')``."""
    params = params or {}

    def run():
        p.clear()
        loss = F.fused_surrogate_loss(name, p.h_s, p.W_s, p.tokens, p.mask, p.h_t, p.W_t, reduction="sum",
                                      token_chunk=token_chunk, vocab_chunk=vocab_chunk, **params)
        loss.backward()
        out[key] = float(loss.detach())
    return run


def trl_step(trl_loss: Callable, p: Problem, out: Dict[str, float], key: str) -> Callable[[], None]:
    """TRL's chunked reverse KL (beta = 1), summed (num_items_in_batch = 1)."""
    def run():
        p.clear()
        loss = trl_loss(p.h_s, p.h_t, p.W_s, p.W_t, p.mask, 1.0, 1)
        loss.backward()
        out[key] = float(loss.detach())
    return run


def measure(tokens: int, vocab: int = VOCAB, hidden: int = HIDDEN, device: Optional[torch.device] = None,
            dtype: torch.dtype = torch.float32, repeats: int = 3, warmup: int = 1, min_sample_s: float = 0.05,
            trl_loss: Optional[Callable] = None, estimators: Sequence[str] = ESTIMATORS,
            measure_memory: bool = True, token_chunk: Optional[int] = None,
            vocab_chunk: Optional[int] = None, k: Optional[int] = None) -> List[Measurement]:
    """One row per (estimator, method) for one N: median time, ratios to materialised, peak memory.
    ``k``: the top-k size of the estimators that have one (None: the registry's default)."""
    device = torch.device(device) if device is not None else common.default_device()
    p = make_problem(tokens, vocab, hidden, device, dtype)
    values: Dict[str, float] = {}
    fns: Dict[str, Callable[[], None]] = {}
    for name in estimators:
        params = estimator_params(name, k)
        fns[f"{name}/materialised"] = materialised_step(name, p, values, f"{name}/materialised", params)
        fns[f"{name}/fused"] = fused_step(name, p, values, f"{name}/fused", token_chunk, vocab_chunk, params)
        if trl_loss is not None and name == "full_kl":
            fns[f"{name}/trl"] = trl_step(trl_loss, p, values, f"{name}/trl")
    mem: Dict[str, int] = {}
    if measure_memory:
        for key, fn in fns.items():
            p.clear()
            gc.collect()
            mem[key] = common.peak_memory(fn, device)
    times = common.time_interleaved(fns, device, repeats=repeats, warmup=warmup, min_sample_s=min_sample_s)
    p.clear()
    rows = []
    for key in fns:
        name, method = key.split("/")
        ref = f"{name}/{REFERENCE}"
        ref_value = values[ref]
        rows.append(Measurement(
            tokens=tokens, vocab=vocab, hidden=hidden, estimator=name, method=method,
            time_s=statistics.median(times[key]), time_ratio=common.paired_ratio(times[key], times[ref]),
            mem_bytes=mem.get(key, -1),
            mem_ratio=mem[key] / mem[ref] if measure_memory and mem[ref] > 0 else float("nan"),
            value=values[key], value_error=abs(values[key] - ref_value) / max(1.0, abs(ref_value))))
    del p, fns
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- output

def _mib(b: int) -> str:
    return "-" if b < 0 else f"{b / 2**20:.0f}" if b >= 100 * 2**20 else f"{b / 2**20:.1f}"


def format_table(rows: Sequence[Measurement]) -> str:
    """Markdown: one line per (N, estimator); the materialised seconds and MiB, then for fused and
    TRL their time ratio / memory ratio to it, their MiB and their relative value difference."""
    by = {(r.tokens, r.estimator, r.method): r for r in rows}
    head = ["N", "estimator", "materialised s", "materialised MiB",
            "fused time x / mem x", "fused MiB", "fused rel. value diff",
            "TRL time x / mem x", "TRL MiB", "TRL rel. value diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for n, name in dict.fromkeys((r.tokens, r.estimator) for r in rows):
        ref = by[(n, name, REFERENCE)]
        cells = [str(n), name, f"{ref.time_s:.2f}", _mib(ref.mem_bytes)]
        for method in ("fused", "trl"):
            r = by.get((n, name, method))
            cells += (["-", "-", "-"] if r is None else
                      [f"{r.time_ratio:.2f} / {r.mem_ratio:.2f}", _mib(r.mem_bytes), f"{r.value_error:.1e}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(quick: bool) -> List[int]:
    """Token counts N measured."""
    return list(QUICK_TOKENS if quick else FULL_TOKENS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_TOKENS} (else {FULL_TOKENS})")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per N (default 3)")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts N (overrides the grid)")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(F.FUSED_ESTIMATORS),
                   metavar="NAME", help=f"fused estimators to time (default {' '.join(ESTIMATORS)}; "
                                        f"e.g. {' '.join(TOPK_COMPARISON)})")
    p.add_argument("--k", type=int, default=None, help="top-k size of the top-k estimators (default: the registry's)")
    p.add_argument("--token-chunk", type=int, default=None, help="fused tile rows (default fused.default_chunks)")
    p.add_argument("--vocab-chunk", type=int, default=None, help="fused tile columns (default fused.default_chunks)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 leaves torch's setting)")
    p.add_argument("--trl-path", default=None, help="a directory to put first on sys.path to find trl")
    p.add_argument("--no-trl", action="store_true", help="leave out the TRL column (materialised and fused only)")
    p.add_argument("--trl-stub-datasets", action="store_true",
                   help="if `datasets` is missing, import TRL's kernel through a placeholder module")
    p.add_argument("--no-record", "--no-write", dest="no_record", action="store_true",
                   help="print only, do not append to RESULTS.md")
    p.add_argument("--results", default=None, help="results file (default benchmarks/RESULTS.md)")
    args = p.parse_args(argv)

    device = torch.device(args.device) if args.device else common.default_device()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trl_loss, trl_line = ((None, "TRL column left out (--no-trl)") if args.no_trl
                          else load_trl(args.trl_path, args.trl_stub_datasets))
    info = common.machine_info(device)
    chunks = (args.token_chunk or F.default_chunks(device)[0], args.vocab_chunk or F.default_chunks(device)[1])
    print(f"# fused path ({'quick' if args.quick else 'full'}) on {common.describe_machine(info)}", flush=True)
    print(trl_line, flush=True)
    rows: List[Measurement] = []
    for n in (args.tokens or grid(args.quick)):
        size_rows = measure(n, args.vocab, args.hidden, device=device, dtype=dtype, repeats=args.repeats,
                            trl_loss=trl_loss, estimators=args.estimators, token_chunk=chunks[0],
                            vocab_chunk=chunks[1], k=args.k)
        rows += size_rows
        print(f"N={n:>5}  " + "  ".join(f"{r.estimator}/{r.method} {r.time_s:.2f}s x{r.time_ratio:.2f} "
                                       f"{_mib(r.mem_bytes)}MiB" for r in size_rows), flush=True)
    table = format_table(rows)
    elem = torch.empty(0, dtype=dtype).element_size()
    head_mib = args.vocab * args.hidden * elem / 2**20
    cmd = "`python -m benchmarks.fused_path" + (" --quick" if args.quick else "") + "`"
    topk = [n for n in args.estimators if "k" in E.get(n).defaults]
    ks = ", ".join(f"{n} k = {E.get(n).params(**estimator_params(n, args.k))['k']}" for n in topk)
    text = "\n".join([
        f"{cmd}: V = {args.vocab:,}, d_s = d_t = {args.hidden}, {str(dtype).replace('torch.', '')}, "
        f"{args.repeats} interleaved rounds (median); fused tiles {chunks[0]} x {chunks[1]}; "
        f"estimators {', '.join(args.estimators)}" + (f" ({ks})" if ks else "") + ".",
        "",
        "One forward+backward of the loss (sum over tokens) from both models' hidden states, gradients to the "
        "student's h and W. `materialised` = logits h W^T built in full, then the registry estimator "
        "(reference, absolute seconds and MiB); `fused` = `vopd_analysis.fused`, tiles only; `TRL` = reverse KL "
        "(beta = 1, the full_kl value). Ratios are to materialised in the same process and round. "
        "MiB = peak bytes of tensors created during the call, inputs excluded (heads: "
        f"{2 * head_mib:.0f} MiB for both), including the gradients left behind (W_s.grad alone: "
        f"{head_mib:.0f} MiB). "
        "rel. value diff = |loss - loss(materialised)| / max(1, |loss(materialised)|).",
        f"TRL: {trl_line}.",
        "",
        table,
    ])
    print()
    print(table)
    if not args.no_record:
        path = common.append_results(text, path=args.results, info=info,
                                     title="fused_path" + (" --quick" if args.quick else ""))
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
