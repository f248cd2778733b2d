"""What a ``vopd distill`` run records, the same for both engines: the metrics rows (``Metrics``:
``metrics.jsonl`` and ``metrics.csv``), the time in the teacher (``TeacherTimer``) and the peak memory of a
step, and at the end ``summary.json`` and ``curves.png`` (``write_summary``) with the closing console table
(``summary_lines``). Reading a run's files back is ``vopd_analysis.records``' (validated JSON and rows).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from ..records import write_json_atomic


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
    """Wall time spent in the teacher's forward passes, measured with module hooks on the teacher
    and on its backbone (the fused path calls only the backbone); nested calls count once."""

    def __init__(self, teacher):
        self.seconds, self._start, self._depth = 0.0, None, 0
        modules = [teacher] + ([teacher.base_model] if getattr(teacher, "base_model", teacher) is not teacher else [])
        for module in modules:
            module.register_forward_pre_hook(lambda *a: self._enter())
            module.register_forward_hook(lambda *a: self._exit())

    def _enter(self):
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _exit(self):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start


EVAL_KEYS = ("step", "eval_accuracy", "eval_reverse_kl", "eval_teacher_logprob")
UNITS = {"eval_accuracy": "fraction of held-out prompts answered correctly (greedy decoding); null without a verifier",
         "eval_reverse_kl": "nats per sequence: exact per-token reverse KL summed over one student sample",
         "eval_teacher_logprob": "nats per token: the teacher's mean log-prob of the student sample's tokens",
         "wall_seconds": "seconds of this invocation (a resumed run's earlier part not included)",
         "train_seconds": "seconds in rollouts, teacher and student over all steps done"}


def write_summary(run, rows: list, resumed_from: int, wall_seconds: float, extra: Optional[dict] = None) -> dict:
    """Write the run's ``curves.png`` and ``summary.json`` (main process only), with the entries of
    ``extra`` added (the TRL engine's ``engine``); return the summary."""
    from .compare import plot_run, run_label
    cfg, out = run.cfg, Path(run.cfg.out_dir)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [{k: r.get(k) for k in EVAL_KEYS} for r in rows if r["kind"] == "eval"]
    label = run_label(cfg.estimator, cfg.estimator_params, cfg.engine)
    plot_run(rows, out / "curves.png", title=f"{label}, seed {cfg.seed}")
    summary = {"label": label, "estimator": cfg.estimator, "estimator_params": run.params, "seed": cfg.seed,
               "steps_done": train[-1]["step"] if train else 0, "skipped_steps": sum(r["skipped"] for r in train),
               "resumed_from_step": resumed_from, "first_eval": evals[0] if evals else None,
               "last_eval": evals[-1] if evals else None, "wall_seconds": wall_seconds,
               "train_seconds": sum(r["time_rollout"] + r["time_teacher"] + r["time_student"] for r in train),
               "units": UNITS, "metrics_jsonl": str(out / "metrics.jsonl"), "metrics_csv": str(out / "metrics.csv"),
               "curves_png": str(out / "curves.png"), "final_model": str(out / "final"),
               "config": dataclasses.asdict(cfg), **(extra or {})}
    write_json_atomic(out / "summary.json", summary)
    return summary


TABLE = (("eval_accuracy", "greedy accuracy", ".3f", "fraction of held-out prompts answered correctly"),
         ("eval_reverse_kl", "reverse KL", ".4g", "nats per sequence (exact per-token KL summed over a student sample)"),
         ("eval_teacher_logprob", "teacher log-prob", ".4g", "nats per token (the teacher's, of student samples)"))


def summary_lines(summary: dict, path: Path) -> list:
    """The run's closing console lines: a table of the first and last held-out evaluation with
    units (accuracy only where the prompts can be graded), then where the run folder, its metrics,
    summary and curves are.

    Args:
      summary: the dict of ``write_summary``.
      path: where ``summary.json`` was written.
    Returns:
      The lines.
    """
    lines = [f"done: {summary['label']} seed {summary['seed']}, {summary['steps_done']} steps "
             f"({summary['skipped_steps']} skipped), {summary['wall_seconds']:.1f} s"]
    first, last = summary["first_eval"], summary["last_eval"]
    if first:
        lines.append(f"{'held-out eval':18s} {'step ' + str(first['step']):>10s} {'step ' + str(last['step']):>10s}  unit")
        for key, name, fmt, unit in TABLE:
            cells = ["n/a" if e.get(key) is None else format(e[key], fmt) for e in (first, last)]
            if key != "eval_accuracy" or cells != ["n/a", "n/a"]:   # no accuracy row without a verifier
                lines.append(f"  {name:16s} {cells[0]:>10s} {cells[1]:>10s}  {unit}")
    else:
        lines.append("no held-out evaluation (--eval-every 0, --num-eval 0 or too few prompts)")
    return lines + [f"run:     {Path(summary['metrics_jsonl']).parent}",
                    f"metrics: {summary['metrics_jsonl']}, {summary['metrics_csv']}", f"summary: {path}",
                    f"curves:  {summary['curves_png']}"]
