"""The run of ``vopd distill`` that both engines share (``run``): every check before ``--out`` is created,
the run folder claimed and locked, then the engine's training; with the held-out evaluation (``evaluate``),
the end of a run (``finish``: final model, ``metrics.csv``, ``summary.json``) and the answer for a run that
is already finished (``already_finished``).

An engine (``loop.Builtin``, ``trl_engine.Trl``) is an ``Engine``: its own checks and process group, where
its newest checkpoint is, and its training from the checked ``Prepared`` inputs.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .. import params as prm
from .. import records
from . import checkpoint as ckpt
from . import rundir
from .config import DistillConfig
from .evaluate import evaluate_shard
from .metrics import Metrics, summary_lines, write_summary
from .prompts import Prompts, default_max_new_tokens, model_paths, prompt_check


@dataclasses.dataclass
class Run:
    """What evaluation and the end of a run need of either engine's run."""

    cfg: DistillConfig
    accelerator: object
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    vocab_size: int
    params: dict
    prompts: Prompts


@dataclasses.dataclass
class Prepared:
    """Everything ``run`` checked before it claimed the run folder, for the engine's ``train``.

    Attributes:
      cfg: the resolved config (``max_new_tokens`` set, ``bf16`` the effective value).
      asked: the config as asked (``max_new_tokens`` unresolved), written to config.json.
      procs: the process group (an ``Accelerator``, or the TRL engine's stand-in before TRL's exists).
      params: the estimator's parameters (``config.check_config``).
      out_dir: the run folder (``rundir.check_out_dir``).
      paths: (student, teacher) from ``prompts.model_paths``.
      prompts: the checked ``Prompts``.
      resume: whether ``--resume`` was given; has_run: whether the folder holds a run.
      started: ``time.perf_counter()`` when the invocation began.
    """

    cfg: DistillConfig
    asked: DistillConfig
    procs: object
    params: dict
    out_dir: Path
    paths: tuple
    prompts: Prompts
    resume: bool
    has_run: bool
    started: float


class Engine:
    """A training engine, as ``run`` calls it, in this order."""

    def check(self, cfg: DistillConfig) -> dict:
        """Every check that reads no file (``config.check_config`` and the engine's own); may set ``cfg.bf16``
        to the effective value and start the process group. Returns the estimator's parameters."""
        raise NotImplementedError

    def processes(self, cfg: DistillConfig):
        """The process group (``Prepared.procs``), once ``--out`` was checked."""
        raise NotImplementedError

    def newest_checkpoint(self, out_dir: Path) -> Optional[Path]:
        """The run's newest checkpoint folder, None if it has none (for ``rundir.check_steps_left``)."""
        raise NotImplementedError

    def check_models(self, paths: tuple) -> None:
        """Checks of the model files before any prompt is read (none by default)."""

    def train(self, prepared: Prepared) -> dict:
        """Load, train and ``finish``, holding the run folder's lock; returns ``run``'s result dict."""
        raise NotImplementedError


def run(engine: Engine, cfg: DistillConfig, resume: bool = False) -> dict:
    """Check everything, lock the run folder, train with ``engine``; returns {"out_dir", "rows",
    "first_eval", "last_eval", "summary"} (summary: None off the main process).

    Everything that can be refused is refused before ``--out`` is created (config values, the
    ``--out`` path, the models' tokenizer and context, every prompt); a folder this call created
    is removed again if the run fails before it starts. ``--resume`` on a finished run returns at
    once. ``cfg`` is resolved in place (``max_new_tokens``; ``bf16`` to the effective value).

    Args:
      engine: the ``Engine``.
      cfg: the config.
      resume: continue the run in ``cfg.out_dir``.
    Returns:
      The result dict; ``stopping.Interrupted`` is raised after a Ctrl-C.
    """
    started = time.perf_counter()
    params = engine.check(cfg)
    asked = dataclasses.replace(cfg)                          # as asked: max_new_tokens unresolved
    out_dir = rundir.check_out_dir(cfg.out_dir)
    procs = engine.processes(cfg)
    if resume and (out_dir / "config.json").is_file():
        rundir.check_resumable(out_dir, asked)
        summary = rundir.finished_run(out_dir, cfg.steps)
        if summary is not None:
            return already_finished(out_dir, summary, procs)
        rundir.check_steps_left(out_dir, cfg.steps, engine.newest_checkpoint(out_dir))
    paths = model_paths(cfg, procs)
    engine.check_models(paths)
    defaulted = cfg.max_new_tokens is None
    if defaulted:
        cfg.max_new_tokens = default_max_new_tokens(cfg)
    prompts = Prompts(cfg, prompt_check(cfg, *paths, defaulted=defaulted))
    for note in prompts.notes if procs.is_main_process else []:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    claim = rundir.claim_out_dir(out_dir, procs)
    try:
        has_run = rundir.refuse_overwrite(out_dir, resume)
        return engine.train(Prepared(cfg, asked, procs, params, out_dir, paths, prompts, resume, has_run,
                                     started))
    finally:
        claim.release(started=(out_dir / "config.json").exists())


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


def cap_params(p: Prepared, vocab_size: int) -> dict:
    """The estimator's parameters with registry defaults above the vocabulary size capped to it
    (``params.cap_to_vocab``), each cap noted on the console."""
    params, capped = prm.cap_to_vocab(p.cfg.estimator, p.params, p.cfg.estimator_params, vocab_size)
    for c in capped:
        p.procs.print(f"note: {c['param']}={c['used']} (registry default {c['default']} capped at the vocabulary size)")
    return params


def already_finished(out_dir: Path, summary: dict, acc) -> dict:
    """Say that the run in ``out_dir`` is finished and return ``run``'s result from its files, touching nothing."""
    acc.print(f"{out_dir} is finished: {summary['steps_done']} steps (its summary.json); nothing to do, nothing "
              f"changed (--steps above {summary['steps_done']} continues it)")
    path = out_dir / "metrics.jsonl"
    rows = records.read_rows(path) if path.is_file() else []
    return result(str(out_dir), rows, summary if acc.is_main_process else None)


def finish(run_: Run, start: int, metrics: Metrics, started: float, extra: Optional[dict] = None) -> dict:
    """Write metrics.csv, the final model, curves.png and summary.json (with ``extra``'s entries),
    print the closing table; return ``run``'s result dict."""
    cfg, acc = run_.cfg, run_.accelerator
    metrics.write_csv()
    acc.wait_for_everyone()
    summary = None
    if acc.is_main_process:
        with ckpt.quiet_hf_progress(), ckpt.disk_full_is_input_error(cfg.out_dir, "the final model and summary"):
            run_.student.save_pretrained(Path(cfg.out_dir) / "final")
            run_.tokenizer.save_pretrained(Path(cfg.out_dir) / "final")
            summary = write_summary(run_, metrics.rows, start, time.perf_counter() - started, extra)
        for line in summary_lines(summary, Path(cfg.out_dir) / "summary.json"):
            acc.print(line)
    acc.wait_for_everyone()
    return result(cfg.out_dir, metrics.rows, summary)


def result(out_dir: str, rows: list, summary: Optional[dict]) -> dict:
    """``run``'s result dict: the run folder, its metrics rows, their first and last eval rows, the summary."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    return {"out_dir": out_dir, "rows": rows, "first_eval": evals[0] if evals else None,
            "last_eval": evals[-1] if evals else None, "summary": summary}
