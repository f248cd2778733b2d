"""``vopd distill``: on-policy distillation of a HF student from a teacher, one readable loop.

Each step, on every process (``accelerate launch`` gives each its share of the prompts):

1. rollouts   y ~ pi_theta(.|x), K per prompt, from the student (``hf.generate_rollouts``);
2. teacher    one forward of the teacher over the rollouts (``hf.score``), keeping only the
              teacher signal the estimator needs (sampled log-probs, top-k or full logits);
3. student    the registered estimator's surrogate loss (``estimators.surrogate_loss``),
              backward, gradients summed over processes, clipped, one AdamW step.

A non-finite loss or gradient norm skips the update (on every process) with a warning, and
no checkpoint is written at a skipped step. Evaluation on held-out prompts reports greedy
verifier accuracy (where the task has a verifier), the exact reverse KL of student samples and
the teacher's log-likelihood of them (``evaluate.py``). Metrics go
to ``metrics.jsonl`` / ``metrics.csv``; checkpoints (``checkpoint.py``) make ``--resume``
give exactly the metrics of an uninterrupted run: rollout seeds depend only on
(seed, step, process), and optimizer, scheduler and RNG states are restored. A finished
run writes ``summary.json`` (config, first and last evaluation, wall time, paths) and
``curves.png``; a run without ``summary.json`` is unfinished.

    vopd distill --preset tiny --estimator vopd --out runs/tiny-vopd   # ~2 min on 2 cores
    vopd distill --preset small --estimator vopd --out runs/small-vopd # text, 8,192-token vocabulary
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \
        -m vopd_analysis.distill.loop --preset tiny ...                # 2 CPU processes (gloo)
    accelerate launch --num_processes 8 -m vopd_analysis.distill.loop ...   # 8 GPUs

Normalisation over processes follows TRL's ``num_items_in_batch``: the loss is the mean over
all processes' items, N = the global number of unmasked tokens (``--reduction token_mean``) or of
sequences (``sequence_mean``). Each process all-reduces its local count to that N
(``global_num_items``), divides its local sum by it (``surrogate_loss(num_items_in_batch=N)``),
and the gradients are summed over processes with one all-reduce (``sum_gradients``, the DDP
result without overlapping communication, and without DDP's division by the world size):

    grad (1/N) sum_p sum_{b,t in p} values = sum_p grad [(1/N) sum_{b,t in p} values].

Averaging per-process means instead would weight a token by 1/(world * N_p), wrong whenever
processes hold different token counts. With one process N is left to the batch (the code path,
and the numbers, of a single-process run are unchanged). Models that do not fit on one device
(FSDP) are not supported yet.

Estimator parameters come from ``--param NAME=VALUE`` (repeatable) and ``--k K`` (short for
``--param k=K``), resolved against the registry by ``vopd_analysis.params``. The options are
made from ``DistillConfig``'s fields (``option``: help, flag, choices in each field's metadata).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import time
import typing
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import estimators as est
from .. import params as prm
from ..errors import InputError, exit_with
from ..lm import hf, small, tasks, tiny
from . import checkpoint as ckpt
from .evaluate import evaluate_shard, sampled_reverse_kl, sequence_reverse_kl


@dataclasses.dataclass(frozen=True)
class Preset:
    """A built-in task with its committed student/teacher pair."""

    help: str
    load_pair: Callable        # (cache_dir, verbose) -> (student path, teacher path, tokenizer)
    train_prompts: Callable    # (n, seed) -> n records {"prompt", ...}
    eval_prompts: Callable     # (n, seed) -> n held-out records
    max_new_tokens: int        # default response length


PRESETS = {
    "tiny": Preset("3-digit addition with written carries, tiny Qwen2 pair, 16-token vocabulary (graded)",
                   lambda cache_dir, verbose: tiny.load_or_train_pair(cache_dir, verbose=verbose),
                   tasks.train_prompts, tasks.eval_prompts, tasks.DEFAULT_TASK.response_tokens),
    "small": Preset(f"continue Python documentation for {small.RESPONSE_TOKENS} tokens, small Qwen2 pair, "
                    "8,192-token BPE vocabulary (no verifier: no accuracy)",
                    lambda cache_dir, verbose: small.load_or_train_pair(verbose=verbose),
                    small.train_prompts, small.eval_prompts, small.RESPONSE_TOKENS),
}


def option(default=dataclasses.MISSING, help: str = "", **cli):
    """A ``DistillConfig`` field and its command-line option, declared together.

    ``build_parser`` makes one option per field from its metadata: ``help``; ``flag`` (default
    ``--`` + the name with ``-`` for ``_``); ``choices``; ``action`` (``store_false`` for a
    ``--no-X`` flag); ``cli=False`` for a field without an option of its own. The option's type is
    the field's annotation (``Optional[int]`` -> int).

    Args:
      default: the field's default (a dict default becomes a ``default_factory``).
      help: the option's help text.
      **cli: the other metadata entries above.
    Returns:
      A ``dataclasses.field``.
    """
    metadata = {"help": help, **cli}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class DistillConfig:
    """Everything a ``vopd distill`` run depends on (saved as ``config.json``); each field is one
    command-line option (``build_parser``), except ``estimator_params`` (``--param``, ``--k``)."""

    student: Optional[str] = option(None, "student model directory or hub id (default: the preset's)")
    teacher: Optional[str] = option(None, "teacher model directory or hub id (default: the preset's)")
    preset: Optional[str] = option("tiny", "built-in task with its committed pair (no preset with --prompts "
                                   "alone): " + "; ".join(f"{name}: {p.help}" for name, p in PRESETS.items()),
                                   choices=tuple(PRESETS))
    prompts: Optional[str] = option(None, "JSONL of {\"prompt\": ..., \"answer\": ...} (answer optional); replaces "
                                    "the preset's prompts")
    eval_prompts: Optional[str] = option(None, "held-out JSONL for evaluation (default: the preset's eval split, "
                                         "or a held-out slice of --prompts)")
    num_eval: int = option(200, "held-out prompts evaluated")
    estimator: str = option("vopd", "registered estimator (vopd estimators)")
    estimator_params: dict = option({}, "the estimator's parameters, from --param NAME=VALUE and --k", cli=False)
    reduction: str = option("sequence_mean", "the loss's mean: over sequences or over unmasked tokens, "
                            "over all processes", choices=("sequence_mean", "token_mean"))
    steps: int = option(500, "optimizer steps")
    prompts_per_step: int = option(32, "prompts per step, over all processes")
    rollouts_per_prompt: int = option(4, "student samples per prompt")
    max_new_tokens: Optional[int] = option(None, "response length (default: the preset's, else 256)")
    temperature: float = option(1.0, "rollout sampling temperature")
    top_p: float = option(1.0, "rollout nucleus sampling")
    lr: float = option(3e-4, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)")
    warmup_steps: int = option(0, "linear learning-rate warm-up steps")
    grad_clip: float = option(1.0, "gradient-norm clip; 0 disables clipping")
    bf16: bool = option(True, "full float32 on GPU (default: bf16 autocast and a bf16 teacher, on GPU only)",
                        flag="--no-bf16", action="store_false")
    seed: int = option(0, "seed of rollouts, prompts and initial RNG state")
    eval_every: int = option(100, "steps between evaluations; 0 disables evaluation")
    save_every: int = option(100, "steps between checkpoints")
    keep_checkpoints: int = option(2, "checkpoints kept")
    out_dir: str = option("runs/distill", "the run's folder", flag="--out")
    cache_dir: str = option(".cache/vopd_tiny", "where the tiny preset's retrained models are cached")
    num_threads: Optional[int] = option(None, "torch threads per process on CPU (default 1)")


# fields that may differ when a run is resumed
RESUMABLE = {"steps", "eval_every", "save_every", "keep_checkpoints", "out_dir", "num_threads", "num_eval"}


# ----------------------------------------------------------------------------- setup

def check_config(cfg: DistillConfig, world: int) -> dict:
    """Validate the config; return the estimator's full parameter dict."""
    spec = est.get(cfg.estimator)
    if spec.analysis_only:
        raise InputError(f"estimator '{cfg.estimator}' needs exact tabular quantities; it cannot train a real model")
    params = dict(cfg.estimator_params)
    if spec.group:
        params.setdefault("group_size", cfg.rollouts_per_prompt)
    params = prm.resolve(cfg.estimator, params)
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise InputError(f"unknown preset '{cfg.preset}'; presets: {', '.join(PRESETS)}")
    if cfg.preset is None and (cfg.prompts is None or cfg.student is None or cfg.teacher is None):
        raise InputError("without a preset give --prompts FILE.jsonl, --student and --teacher")
    if cfg.steps < 1 or cfg.prompts_per_step < 1 or cfg.rollouts_per_prompt < 1:
        raise InputError("steps, prompts_per_step and rollouts_per_prompt must be >= 1")
    if cfg.prompts_per_step % world:
        raise InputError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of "
                         f"processes ({world}) so that every process gets the same share")
    if cfg.reduction not in ("sequence_mean", "token_mean"):
        raise InputError(f"reduction must be 'sequence_mean' or 'token_mean', got '{cfg.reduction}'")
    return params


class Prompts:
    """Training prompts by step (deterministic in (seed, step), so resuming needs no loader state)
    and the fixed held-out evaluation set."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.records = tasks.read_jsonl(cfg.prompts) if cfg.prompts else None
        self.eval = tasks.read_jsonl(cfg.eval_prompts)[:cfg.num_eval] if cfg.eval_prompts else None
        if self.records is not None and self.eval is None:
            order = random.Random(0).sample(range(len(self.records)), len(self.records))
            n_eval = min(cfg.num_eval, len(self.records) // 10)
            self.eval = [self.records[i] for i in order[:n_eval]]
            self.records = [self.records[i] for i in order[n_eval:]]
        if self.eval is None:
            self.eval = PRESETS[cfg.preset].eval_prompts(cfg.num_eval, seed=0)

    def train(self, step: int) -> list:
        """The ``prompts_per_step`` records of step ``step`` (1-based), over all processes."""
        P = self.cfg.prompts_per_step
        if self.records is None:
            return PRESETS[self.cfg.preset].train_prompts(P, seed=self.cfg.seed * 1_000_003 + step)
        n, out = len(self.records), []
        for i in range((step - 1) * P, step * P):
            epoch, j = divmod(i, n)
            order = random.Random(f"{self.cfg.seed}-{epoch}").sample(range(n), n)
            out.append(self.records[order[j]])
        return out


def model_paths(cfg: DistillConfig, accelerator):
    """(student, teacher) paths: the config's, or the preset's (checked, or trained, on the main process first)."""
    if cfg.preset is not None and (cfg.student is None or cfg.teacher is None):
        with accelerator.main_process_first():
            student, teacher, _ = PRESETS[cfg.preset].load_pair(cfg.cache_dir, accelerator.is_main_process)
        return cfg.student or student, cfg.teacher or teacher
    return cfg.student, cfg.teacher


def check_resumable(out_dir: Path, cfg: DistillConfig) -> None:
    """Refuse to continue the run in ``out_dir`` with a config that differs from its saved one
    in a field outside ``RESUMABLE``."""
    saved = json.loads((out_dir / "config.json").read_text())
    changed = sorted(k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v)
    if changed:
        raise InputError(f"cannot resume {out_dir}: its run used different " + ", ".join(
            f"{k} ({saved.get(k)!r} there, {getattr(cfg, k)!r} now)" for k in changed))


def prepare_out_dir(out_dir: Path, cfg: DistillConfig, resume: bool, accelerator) -> Optional[Path]:
    """Refuse to overwrite a run; with ``resume``, check the config and return the latest checkpoint."""
    has_run = (out_dir / "config.json").exists() or (out_dir / "metrics.jsonl").exists()
    if has_run and not resume:
        raise InputError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    if has_run:
        check_resumable(out_dir, cfg)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").unlink(missing_ok=True)   # a continued run is unfinished until it ends
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return ckpt.latest(out_dir) if has_run else None


# ----------------------------------------------------------------------------- metrics

class Metrics:
    """Rows of metrics, appended to ``metrics.jsonl`` as they come (main process only)."""

    def __init__(self, out_dir: Path, rows: list, active: bool):
        self.path, self.rows, self.active = out_dir / "metrics.jsonl", list(rows), active
        if active:  # rewrite from the checkpoint's rows: drops steps after it, so none is repeated
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.active:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def write_csv(self) -> None:
        if self.active and self.rows:
            import pandas as pd
            pd.DataFrame(self.rows).to_csv(self.path.with_suffix(".csv"), index=False)


def peak_memory_mb(device) -> float:
    """CUDA max_memory_allocated on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TeacherTimer:
    """Wall time spent in the teacher's forward passes, measured with module hooks."""

    def __init__(self, teacher):
        self.seconds, self._start = 0.0, None
        teacher.register_forward_pre_hook(lambda *a: setattr(self, "_start", time.perf_counter()))
        teacher.register_forward_hook(lambda *a: self._stop())

    def _stop(self):
        self.seconds += time.perf_counter() - self._start


# ----------------------------------------------------------------------------- one step

def estimator_loss(cfg: DistillConfig, batch, params: dict, num_items_in_batch: Optional[float] = None) -> torch.Tensor:
    """The registered estimator's surrogate loss; its gradient is the estimator.

    loss = (1/N) sum_b sum_t values, N = ``num_items_in_batch`` (``global_num_items``), or this
    batch's own count when None (one process).

    Args:
      cfg: the config (estimator, reduction).
      batch: this process's TokenBatch.
      params: the estimator's full parameter dict.
      num_items_in_batch: the global count of sequences or unmasked tokens, or None.
    Returns:
      The scalar loss.
    """
    return est.surrogate_loss(cfg.estimator, batch, reduction=cfg.reduction,
                              num_items_in_batch=num_items_in_batch, **params)


def local_num_items(batch, reduction: str) -> int:
    """What a mean reduction counts in this process's batch: unmasked tokens (``token_mean``) or
    sequences (``sequence_mean``); 0 without a batch (a step whose scoring failed).

    Args:
      batch: a TokenBatch, or None.
      reduction: "token_mean" or "sequence_mean".
    Returns:
      The count.
    """
    if batch is None:
        return 0
    if reduction == "token_mean":
        return int(batch.mask.sum())
    if reduction == "sequence_mean":
        return batch.num_sequences
    raise InputError(f"reduction must be 'sequence_mean' or 'token_mean', got '{reduction}'")


def global_num_items(batch, reduction: str, num_processes: int, device=None) -> Optional[float]:
    """N = sum over processes of ``local_num_items`` (one all-reduce), the ``num_items_in_batch``
    every process divides its local sum by; None with one process (the batch's own count, the
    single-process code path unchanged). A collective: every process must call it, also one
    without a batch.

    Args:
      batch: this process's TokenBatch, or None.
      reduction: "token_mean" or "sequence_mean".
      num_processes: the world size.
      device: where the count is reduced (the accelerator's device: NCCL needs CUDA tensors).
    Returns:
      N as a float, or None for one process.
    """
    if num_processes == 1:
        return None
    count = torch.tensor(float(local_num_items(batch, reduction)), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(count)
    return float(count)


def sum_gradients(params, num_processes: int) -> None:
    """g <- sum over processes of g, in place, one all-reduce of the flattened gradients.

    Each process's loss is its local sum over the global N (``global_num_items``), so the sum
    is the gradient of the global mean. No-op for one process.

    Args:
      params: the parameters whose ``.grad`` to reduce (those with a gradient, the same on every process).
      num_processes: the world size.
    """
    if num_processes == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    for g, total in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(total)


def train_step(run, step: int) -> dict:
    """One on-policy step; returns its metrics row (reduced over processes)."""
    cfg, acc, student = run.cfg, run.accelerator, run.student
    rank, world = acc.process_index, acc.num_processes
    records = run.prompts.train(step)[rank::world]
    t0 = time.perf_counter()
    rollouts = hf.generate_rollouts(student, run.tokenizer, [r["prompt"] for r in records], cfg.rollouts_per_prompt,
                                    cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                    seed=(cfg.seed * 1_000_003 + step) * 1009 + rank, vocab_size=run.vocab_size)
    t1 = time.perf_counter()
    run.teacher_timer.seconds = 0.0
    batch = None
    with acc.autocast():
        try:
            batch = hf.score(student, run.teacher, rollouts, [cfg.estimator], vocab_size=run.vocab_size,
                             params={cfg.estimator: run.params})
        except InputError as err:   # NaN/inf logits are caught by TokenBatch.validate
            if "NaN or inf" not in str(err):
                raise
        num_items = global_num_items(batch, cfg.reduction, world, acc.device)   # on every process
        if batch is not None:
            loss = estimator_loss(cfg, batch, run.params, num_items_in_batch=num_items)
        else:
            loss = torch.tensor(float("nan"), device=acc.device)
    finite = acc.reduce(torch.tensor(float(torch.isfinite(loss.detach()).all()), device=acc.device), "sum")
    grad_norm = float("nan")
    skipped = bool(finite < world)
    run.optimizer.zero_grad(set_to_none=True)
    if not skipped:
        loss.backward()
        sum_gradients(run.params_list, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params_list, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        skipped = not torch.isfinite(torch.tensor(grad_norm))
        if not skipped:
            run.optimizer.step()
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    if skipped and acc.is_main_process:
        warnings.warn(f"step {step}: non-finite loss or gradient norm; the update was skipped", RuntimeWarning)
    return step_row(run, step, batch, rollouts, records, loss, grad_norm, skipped, (t0, t1, t2))


def step_row(run, step, batch, rollouts, records, loss, grad_norm, skipped, times) -> dict:
    """Reduce this step's statistics over processes into one metrics row."""
    acc = run.accelerator
    t0, t1, t2 = times
    with torch.no_grad():
        exact = sequence_reverse_kl(batch).sum() if batch is not None and batch.teacher_logits is not None else float("nan")
        sampled = sampled_reverse_kl(batch).sum() if batch is not None else float("nan")
    grades = [tasks.verify(records[int(i)], text) for i, text in zip(rollouts.prompt_index, rollouts.responses(run.tokenizer))]
    local = torch.tensor([float(loss.detach()), float(exact), float(sampled), rollouts.num_rollouts,
                          float(rollouts.response_mask.sum()), sum(g is True for g in grades),
                          sum(g is not None for g in grades)], dtype=torch.float64, device=acc.device)
    s = acc.reduce(local, "sum").tolist()
    seconds = t2 - t0
    teacher = run.teacher_timer.seconds
    # each process's loss is its local sum over the global N, so their sum is the global mean
    return {"kind": "train", "step": step, "loss": s[0], "reverse_kl": s[1] / s[3],
            "reverse_kl_sampled": s[2] / s[3], "sample_accuracy": s[5] / s[6] if s[6] else None,
            "grad_norm": grad_norm, "skipped": skipped, "lr": run.scheduler.get_last_lr()[0],
            "response_tokens": int(s[4]), "tokens_per_s": s[4] / seconds, "time_rollout": t1 - t0,
            "time_teacher": teacher, "time_student": t2 - t1 - teacher, "peak_memory_mb": peak_memory_mb(acc.device)}


def evaluate(run, step: int) -> dict:
    """Held-out greedy accuracy (None if nothing could be graded), exact reverse KL and the teacher's
    mean log-prob per sampled token, over all processes' shares of the eval set."""
    acc = run.accelerator
    shard = run.prompts.eval[acc.process_index::acc.num_processes]
    with acc.autocast():
        local = evaluate_shard(run.student, run.teacher, run.tokenizer, shard, run.cfg.max_new_tokens,
                               seed=(run.cfg.seed * 1_000_003 + step) * 1009 + 7919 * (acc.process_index + 1),
                               vocab_size=run.vocab_size)
    s = acc.reduce(local.to(acc.device), "sum").tolist()
    return {"kind": "eval", "step": step, "eval_accuracy": s[0] / s[1] if s[1] else None,
            "eval_reverse_kl": s[2] / s[3] if s[3] else None, "eval_teacher_logprob": s[4] / s[5] if s[5] else None}


# ----------------------------------------------------------------------------- the summary

EVAL_KEYS = ("step", "eval_accuracy", "eval_reverse_kl", "eval_teacher_logprob")
UNITS = {"eval_accuracy": "fraction of held-out prompts answered correctly (greedy decoding); null without a verifier",
         "eval_reverse_kl": "nats per sequence: exact per-token reverse KL summed over one student sample",
         "eval_teacher_logprob": "nats per token: the teacher's mean log-prob of the student sample's tokens",
         "wall_seconds": "seconds of this invocation (a resumed run's earlier part not included)",
         "train_seconds": "seconds in rollouts, teacher and student over all steps done"}


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and ``os.replace``: a reader sees the old file
    or the complete new one, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_summary(run, rows: list, resumed_from: int, wall_seconds: float) -> dict:
    """Write the run's ``curves.png`` and ``summary.json`` (main process only); return the summary."""
    from .compare import plot_run, run_label
    cfg, out = run.cfg, Path(run.cfg.out_dir)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [{k: r.get(k) for k in EVAL_KEYS} for r in rows if r["kind"] == "eval"]
    label = run_label(cfg.estimator, cfg.estimator_params)
    plot_run(rows, out / "curves.png", title=f"{label}, seed {cfg.seed}")
    summary = {"label": label, "estimator": cfg.estimator, "estimator_params": run.params, "seed": cfg.seed,
               "steps_done": train[-1]["step"] if train else 0, "skipped_steps": sum(r["skipped"] for r in train),
               "resumed_from_step": resumed_from, "first_eval": evals[0] if evals else None,
               "last_eval": evals[-1] if evals else None, "wall_seconds": wall_seconds,
               "train_seconds": sum(r["time_rollout"] + r["time_teacher"] + r["time_student"] for r in train),
               "units": UNITS, "metrics_jsonl": str(out / "metrics.jsonl"), "metrics_csv": str(out / "metrics.csv"),
               "curves_png": str(out / "curves.png"), "final_model": str(out / "final"),
               "config": dataclasses.asdict(cfg)}
    write_json_atomic(out / "summary.json", summary)
    return summary


def summary_lines(summary: dict, path: Path) -> list:
    """The run's closing console lines: what it reached, in which units, and where its files are."""
    def value(e, key, fmt):
        return "n/a" if e.get(key) is None else format(e[key], fmt)

    def change(key, fmt):
        return f"{value(first, key, fmt)} -> {value(last, key, fmt)}"

    lines = [f"done: {summary['label']} seed {summary['seed']}, {summary['steps_done']} steps "
             f"({summary['skipped_steps']} skipped), {summary['wall_seconds']:.1f} s"]
    first, last = summary["first_eval"], summary["last_eval"]
    if first:
        graded = first.get("eval_accuracy") is not None or last.get("eval_accuracy") is not None
        lines.append(f"eval (held-out) step {first['step']} -> {last['step']}: "
                     + (f"greedy accuracy {change('eval_accuracy', '.3f')}, " if graded else "")
                     + f"reverse KL {change('eval_reverse_kl', '.4g')} nats per sequence, "
                     f"teacher log-prob {change('eval_teacher_logprob', '.4g')} nats per token")
    return lines + [f"metrics: {summary['metrics_jsonl']}, {summary['metrics_csv']}", f"summary: {path}",
                    f"curves:  {summary['curves_png']}"]


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Run:
    cfg: DistillConfig
    accelerator: object
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    vocab_size: int
    params: dict
    prompts: Prompts
    optimizer: torch.optim.Optimizer
    scheduler: object
    teacher_timer: TeacherTimer

    @property
    def params_list(self):
        return [p for p in self.student.parameters() if p.requires_grad]


def make_accelerator(cfg: DistillConfig):
    """An ``Accelerator``; several processes on a machine without GPUs use gloo on the CPU.

    ``accelerate launch --cpu --num_processes N`` starts a single process unless MPI is
    configured; ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun``)
    starts N, which on a CPU-only machine need ``cpu=True`` to form a gloo group.
    """
    from accelerate import Accelerator
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = world > 1 and not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
    acc = Accelerator(cpu=cpu, mixed_precision="bf16" if cfg.bf16 and torch.cuda.is_available() and not cpu else "no")
    if world == 1 and "MASTER_PORT" in os.environ and acc.num_processes == 1:
        warnings.warn("launched with several processes requested but running as one: `accelerate launch --cpu` "
                      "starts only one process without MPI; use `accelerate launch --multi_gpu --num_processes N` "
                      "(gloo on CPU-only machines) or `torchrun --nproc_per_node N`", RuntimeWarning)
    return acc


def setup(cfg: DistillConfig, resume: bool):
    """Build the accelerator, models, optimizer and scheduler; restore a checkpoint if resuming."""
    acc = make_accelerator(cfg)
    on_gpu = acc.device.type == "cuda"
    if acc.device.type == "cpu":
        torch.set_num_threads(cfg.num_threads or 1)
    params = check_config(cfg, acc.num_processes)
    out_dir = Path(cfg.out_dir)
    latest = prepare_out_dir(out_dir, cfg, resume, acc)
    student_path, teacher_path = model_paths(cfg, acc)
    pair = hf.load_pair(str(latest / "model") if latest else student_path, teacher_path, device=acc.device)
    if cfg.bf16 and on_gpu:
        pair.teacher.to(torch.bfloat16)
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = PRESETS[cfg.preset].max_new_tokens if cfg.prompts is None else 256
    params, capped = prm.cap_to_vocab(cfg.estimator, params, cfg.estimator_params, pair.info.vocab_size)
    for c in capped:
        acc.print(f"note: {c['param']}={c['used']} (registry default {c['default']} capped at the vocabulary size)")
    pair.student.train()
    decay = [p for p in pair.student.parameters() if p.dim() >= 2]
    no_decay = [p for p in pair.student.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    run = Run(cfg, acc, pair.student, pair.teacher, pair.tokenizer, pair.info.vocab_size, params, Prompts(cfg),
              optimizer, scheduler, TeacherTimer(pair.teacher))
    start, rows = 0, []
    if latest:
        state = ckpt.load_state(acc, latest, optimizer, scheduler)
        start, rows = state["step"], state["rows"]
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    return run, start, Metrics(out_dir, rows, acc.is_main_process)


def eval_postfix(row: dict) -> dict:
    """The progress bar's view of an eval row (accuracy only where the task is graded)."""
    out = {} if row["eval_accuracy"] is None else {"acc": f"{row['eval_accuracy']:.3f}"}
    return {**out, "kl": f"{row['eval_reverse_kl']:.3f}", "teacher_lp": f"{row['eval_teacher_logprob']:.3f}"}


def run(cfg: DistillConfig, resume: bool = False) -> dict:
    """Train; returns {"out_dir", "rows", "first_eval", "last_eval", "summary"} (summary: None off
    the main process)."""
    from tqdm.auto import tqdm
    started = time.perf_counter()
    run_, start, metrics = setup(cfg, resume)
    acc = run_.accelerator
    if acc.is_main_process:
        n_s = sum(p.numel() for p in run_.student.parameters())
        n_t = sum(p.numel() for p in run_.teacher.parameters())
        acc.print(f"distill: {cfg.estimator} {run_.params}, student {n_s:,} params, teacher {n_t:,}, "
                  f"{acc.num_processes} process(es) on {acc.device}, steps {start + 1}..{cfg.steps} -> {cfg.out_dir}")
    if start == 0 and cfg.eval_every > 0:
        metrics.log(evaluate(run_, 0))
    bar = tqdm(total=cfg.steps, initial=start, disable=not acc.is_main_process, desc=f"distill {cfg.estimator}")
    for step in range(start + 1, cfg.steps + 1):
        row = train_step(run_, step)
        metrics.log(row)
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics.log(evaluate(run_, step))
            bar.set_postfix(eval_postfix(metrics.rows[-1]))
        else:
            bar.set_postfix(loss=f"{row['loss']:.3f}", kl=f"{row['reverse_kl_sampled']:.3f}")
        bar.update(1)
        if cfg.save_every > 0 and not row["skipped"] and (step % cfg.save_every == 0 or step == cfg.steps):
            ckpt.save(acc, cfg.out_dir, step, run_.student, run_.tokenizer, run_.optimizer, run_.scheduler,
                      metrics.rows, keep=cfg.keep_checkpoints)
            metrics.write_csv()
    bar.close()
    metrics.write_csv()
    acc.wait_for_everyone()
    summary = None
    if acc.is_main_process:
        run_.student.save_pretrained(Path(cfg.out_dir) / "final")
        run_.tokenizer.save_pretrained(Path(cfg.out_dir) / "final")
        summary = write_summary(run_, metrics.rows, start, time.perf_counter() - started)
        for line in summary_lines(summary, Path(cfg.out_dir) / "summary.json"):
            acc.print(line)
    evals = [r for r in metrics.rows if r["kind"] == "eval"]
    acc.wait_for_everyone()
    return {"out_dir": cfg.out_dir, "rows": metrics.rows, "first_eval": evals[0] if evals else None,
            "last_eval": evals[-1] if evals else None, "summary": summary}


# ----------------------------------------------------------------------------- command line

def _option_type(annotation):
    """The argparse ``type`` of a field annotation: ``Optional[X]`` -> X."""
    args = [t for t in typing.get_args(annotation) if t is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The ``vopd distill`` parser: one option per ``DistillConfig`` field, made from its metadata
    (``option``), then ``--k``, ``--param`` (the estimator's parameters) and ``--resume``.

    Options not given are absent from the namespace (``argument_default=SUPPRESS``), so that
    ``config_from_args`` can tell them from defaults (with ``--resume`` they come from the saved run).

    Args:
      add_help: add ``-h/--help`` (False when ``vopd sweep`` uses it as a parent).
    Returns:
      The parser.
    """
    p = argparse.ArgumentParser(prog="vopd distill", argument_default=argparse.SUPPRESS, add_help=add_help,
                                description="On-policy distillation with any registered estimator "
                                            "(vopd_analysis/distill/loop.py).")
    hints = typing.get_type_hints(DistillConfig)
    for f in dataclasses.fields(DistillConfig):
        meta = dict(f.metadata)
        if not meta.pop("cli", True):
            continue
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        text = meta.pop("help", "")
        if meta.get("action") != "store_false":
            text += "" if "default" in text else f" (default: {f.default})"
            kind = _option_type(hints[f.name])
            if kind is not str:
                meta["type"] = kind
        p.add_argument(flag, dest=f.name, help=text.replace("%", "%%"), **meta)
    p.add_argument("--k", type=int, help="shorthand for --param k=K (the top-k size of vopd_topk / topk_kl)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="estimator parameter, value read as JSON (repeatable); unset ones take the "
                        "registry's defaults (vopd estimators)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return p


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """A config from the given options; with --resume, unspecified options come from the saved run.

    ``--param`` and ``--k`` become ``estimator_params`` (``params.parse_assignments``,
    ``params.with_shorthand``); they are checked against the estimator in ``check_config``.
    ``--prompts`` without ``--preset`` means no preset.

    Args:
      args: a namespace from ``build_parser`` (only the options given).
    Returns:
      The ``DistillConfig``.
    """
    given = dict(vars(args))
    resume = given.pop("resume", False)
    params = prm.with_shorthand(prm.parse_assignments(given.pop("param", [])), given.pop("k", None))
    if "prompts" in given and "preset" not in given:
        given["preset"] = None
    base = {}
    saved = Path(given.get("out_dir", DistillConfig.out_dir)) / "config.json"
    if resume and saved.is_file():
        base = json.loads(saved.read_text())
    if params or "estimator_params" not in base:
        given["estimator_params"] = params
    return DistillConfig(**{**base, **given})


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = run(config_from_args(args), resume=getattr(args, "resume", False))
    return 0 if result else 1


if __name__ == "__main__":
    exit_with(main)
