"""``vopd distill``: on-policy distillation of a HF student from a teacher, one readable loop.

Each step, on every process (``accelerate launch`` gives each its share of the prompts):

1. rollouts   y ~ pi_theta(.|x), K per prompt, from the student (``rollouts.generate_rollouts``);
2. teacher    one forward of the teacher over the rollouts (``scoring.score``), keeping only the
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

Run safety is the shared run's (``runner.run``, the same for ``--engine trl``): the whole config is checked
(``config.check_config``, the estimator's parameters tried on a small batch) with the prompt files and the
run folder's place (``rundir.check_out_dir``) before ``--out`` is created, so a refused invocation leaves
nothing behind; the run folder is locked while its run lives (``lock.RunLock``); ``inputs.json`` records
the config and the prompt files' sha256 at every start, and a resume is refused when they changed
(``rundir.check_resumable``); ``--resume`` on a finished run does nothing, and ``--steps`` below the steps
done is refused. Here: Ctrl-C finishes the current step, checkpoints it and exits with status 130, SIGTERM
likewise with 143 (``stop_at``, ``stopping.StopOnSignal``); resume verifies the newest checkpoint's
manifest and falls back to the newest intact one (``resume_checkpoint``, ``checkpoint.choose``); a full
disk while checkpointing is one line, and the run resumes exactly.

    vopd distill --preset tiny --estimator vopd --out runs/tiny-vopd   # ~2 min on 2 cores
    vopd distill --preset small --estimator vopd --out runs/small-vopd # text, 8,192-token vocabulary
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \
        -m vopd_analysis.distill.command --preset tiny ...             # 2 CPU processes (gloo)
    accelerate launch --num_processes 8 -m vopd_analysis.distill.command ...   # 8 GPUs

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
made from ``DistillConfig``'s fields (``config.py``); the command line is ``command.py``'s.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import warnings
from pathlib import Path
from typing import Optional

import torch  # noqa: E402

from ..errors import InputError
from ..lm import fused_score as fs  # noqa: E402
from ..lm import loading, tasks  # noqa: E402
from ..lm import rollouts as ro  # noqa: E402
from . import checkpoint as ckpt  # noqa: E402
from . import rundir, runner  # noqa: E402
from .config import DistillConfig, check_config  # noqa: E402
from .evaluate import reverse_kl_sums  # noqa: E402
from .metrics import Metrics, TeacherTimer, peak_memory_mb  # noqa: E402
from .runner import Prepared, evaluate, finish  # noqa: E402
from .stopping import (  # noqa: E402
    Interrupted,
    StopOnSignal,
    interrupted_message,
    stop_agreed,
)

# ----------------------------------------------------------------------------- one step

def estimator_loss(cfg: DistillConfig, batch, params: dict, num_items_in_batch: Optional[float] = None) -> torch.Tensor:
    """The registered estimator's surrogate loss; its gradient is the estimator.

    loss = (1/N) sum_b sum_t values, N = ``num_items_in_batch`` (``global_num_items``), or this
    batch's own count when None (one process).

    Args:
      cfg: the config (estimator, reduction).
      batch: this process's TokenBatch (validated by ``scoring.score``) or ``fused_score.FusedScore``.
      params: the estimator's full parameter dict.
      num_items_in_batch: the global count of sequences or unmasked tokens, or None.
    Returns:
      The scalar loss.
    """
    return fs.loss_of(batch, cfg.estimator, cfg.reduction, num_items_in_batch, params)


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
    rollouts = ro.generate_rollouts(student, run.tokenizer, [r["prompt"] for r in records], cfg.rollouts_per_prompt,
                                    cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                    seed=(cfg.seed * 1_000_003 + step) * 1009 + rank, vocab_size=run.vocab_size)
    t1 = time.perf_counter()
    run.teacher_timer.seconds = 0.0
    batch = None
    with acc.autocast():
        try:    # a TokenBatch (materialised logits) or a fused_score.FusedScore (hidden states)
            batch = fs.score_either(cfg.logits, student, run.teacher, rollouts, cfg.estimator, run.params,
                                    run.vocab_size, max_new_tokens=cfg.max_new_tokens)
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
    exact, sampled = reverse_kl_sums(batch)
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


# ----------------------------------------------------------------------------- setup

@dataclasses.dataclass
class Training(runner.Run):
    """A built-in run: the models and prompts (``runner.Run``) with the optimizer, scheduler and teacher timer."""

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


def load_models(latest: Optional[Path], paths: tuple, device):
    """The student (from checkpoint ``latest`` when resuming) and the teacher (``loading.load_pair``); a
    checkpoint's model that cannot be read is an ``InputError`` naming it.

    Args:
      latest: the checkpoint folder, or None.
      paths: (student, teacher) paths from ``model_paths``.
      device: where the models go.
    Returns:
      The ``loading.ModelPair``.
    """
    with ckpt.quiet_hf_progress():
        if latest is None:
            return loading.load_pair(paths[0], paths[1], device=device)
        try:
            return loading.load_pair(str(latest / "model"), paths[1], device=device)
        except InputError:
            raise
        except Exception as err:   # a truncated safetensors file, a broken config.json ...
            raise InputError(f"cannot load the student from checkpoint {latest / 'model'}: {ckpt.first_line(err)}; "
                             f"move {latest} aside to resume from an older checkpoint") from None


def resume_checkpoint(out_dir: Path, asked: DistillConfig, acc) -> Optional[Path]:
    """The checkpoint to continue the run in ``out_dir`` from, after its config and inputs are checked
    (``rundir.check_resumable``) and damaged checkpoints set aside (``rundir.choose_checkpoint``, on the
    main process); None if it has none (it starts over). Writes nothing but those renames.

    Args:
      out_dir: the run folder.
      asked: the config as asked (``max_new_tokens`` unresolved, as config.json holds it).
      acc: the run's ``Accelerator``.
    """
    rundir.check_resumable(out_dir, asked)
    rundir.on_main(acc, lambda: rundir.choose_checkpoint(out_dir))
    return ckpt.latest(out_dir)   # after the main process set damaged ones aside: the same on every process


def setup(p: Prepared, latest: Optional[Path]):
    """Load the models, build optimizer and scheduler, restore checkpoint ``latest`` if resuming, then
    mark the run started (``rundir.start_out_dir``: config.json).

    Args:
      p: what ``runner.run`` checked.
      latest: the checkpoint to resume from, or None.
    Returns:
      (``Training``, the step it starts after, ``Metrics``).
    """
    cfg, acc = p.cfg, p.procs
    pair = load_models(latest, p.paths, acc.device)
    if cfg.bf16:
        pair.teacher.to(torch.bfloat16)
    params = runner.cap_params(p, pair.info.vocab_size)
    pair.student.train()
    decay = [q for q in pair.student.parameters() if q.dim() >= 2]
    no_decay = [q for q in pair.student.parameters() if q.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    run = Training(cfg, acc, pair.student, pair.teacher, pair.tokenizer, pair.info.vocab_size, params, p.prompts,
                   optimizer, scheduler, TeacherTimer(pair.teacher))
    start, rows = 0, []
    if latest:
        state = ckpt.load_state(acc, latest, optimizer, scheduler)
        start, rows = state["step"], state["rows"]
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    rundir.start_out_dir(out_dir, dataclasses.asdict(p.asked), acc)
    return run, start, Metrics(out_dir, rows, acc.is_main_process)


# ----------------------------------------------------------------------------- training

def eval_postfix(row: dict) -> dict:
    """The progress bar's view of an eval row (accuracy only where the task is graded, n/a for a missing value)."""
    def cell(key):
        return "n/a" if row.get(key) is None else f"{row[key]:.3f}"

    out = {} if row["eval_accuracy"] is None else {"acc": cell("eval_accuracy")}
    return {**out, "kl": cell("eval_reverse_kl"), "teacher_lp": cell("eval_teacher_logprob")}


def stop_at(run_, done: int, saved: int, metrics: Metrics, stop: StopOnSignal) -> None:
    """Checkpoint step ``done`` (unless ``saved``, the newest checkpoint, is that step), print one
    line saying where and how to resume, and raise ``Interrupted``.

    Args:
      run_: the ``Training``.
      done: the last completed step (0: none).
      saved: the step of the newest checkpoint (0: none).
      metrics: the rows so far (saved in the checkpoint).
      stop: the ``StopOnSignal`` that asked (its signal sets the message and the exit status).
    """
    cfg, acc, out = run_.cfg, run_.accelerator, Path(run_.cfg.out_dir)
    path = None
    if done > saved:
        path = ckpt.save(acc, out, done, run_.student, run_.tokenizer, run_.optimizer, run_.scheduler,
                         metrics.rows, keep=cfg.keep_checkpoints)
        metrics.write_csv()
    elif done:
        path = out / "checkpoints" / f"step-{done:08d}"
    where = f"checkpoint {path}" if path else "no step done, nothing to checkpoint"
    message = interrupted_message(out, done, cfg.steps, where, acc.num_processes, stop.signum)
    acc.print(message)
    raise Interrupted(message, stop.status)


def train(run_: Training, start: int, metrics: Metrics, started: float) -> dict:
    """Steps ``start + 1 .. steps`` with evaluation and checkpoints, then the final model and the
    summary; a Ctrl-C stops after the current step (``stop_at``).

    Args:
      run_: the ``Training`` from ``setup``.
      start: the step it starts after (the resumed checkpoint's, or 0).
      metrics: the ``Metrics``.
      started: ``time.perf_counter()`` when the invocation began.
    Returns:
      ``runner.run``'s result dict.
    """
    from tqdm.auto import tqdm
    cfg, acc = run_.cfg, run_.accelerator
    if acc.is_main_process:
        n_s = sum(p.numel() for p in run_.student.parameters())
        n_t = sum(p.numel() for p in run_.teacher.parameters())
        acc.print(f"distill: {cfg.estimator} {run_.params}, student {n_s:,} params, teacher {n_t:,}, "
                  f"{acc.num_processes} process(es) on {acc.device}, steps {start + 1}..{cfg.steps} -> {cfg.out_dir}")
    do_eval = cfg.eval_every > 0 and bool(run_.prompts.eval)
    done = saved = start
    with StopOnSignal() as stop:
        if start == 0 and do_eval:
            metrics.log(evaluate(run_, 0))
        bar = tqdm(total=cfg.steps, initial=start, disable=not acc.is_main_process, desc=f"distill {cfg.estimator}")
        try:
            for step in range(start + 1, cfg.steps + 1):
                if stop_agreed(acc, stop):
                    break
                row = train_step(run_, step)
                metrics.log(row)
                if do_eval and (step % cfg.eval_every == 0 or step == cfg.steps):
                    metrics.log(evaluate(run_, step))
                    bar.set_postfix(eval_postfix(metrics.rows[-1]))
                else:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", kl=f"{row['reverse_kl_sampled']:.3f}")
                bar.update(1)
                if cfg.save_every > 0 and not row["skipped"] and (step % cfg.save_every == 0 or step == cfg.steps):
                    ckpt.save(acc, cfg.out_dir, step, run_.student, run_.tokenizer, run_.optimizer, run_.scheduler,
                              metrics.rows, keep=cfg.keep_checkpoints)
                    metrics.write_csv()
                    saved = step
                done = step
        finally:
            bar.close()
        if done < cfg.steps:
            stop_at(run_, done, saved, metrics, stop)
        return finish(run_, start, metrics, started)


class Builtin(runner.Engine):
    """The built-in engine, as ``runner.run`` calls it (``vopd distill --engine builtin``, the default)."""

    def check(self, cfg: DistillConfig) -> dict:
        """Refuse the TRL engine's options, make the ``Accelerator`` (``make_accelerator``), then
        ``config.check_config`` for its process count."""
        if cfg.trl_args:
            raise InputError("--trl-arg needs --engine trl")
        if cfg.probe_every:
            raise InputError("--probe-every needs --engine trl (for a probe outside training: studies.llm_variance)")
        self.acc = make_accelerator(cfg)
        if self.acc.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads or 1)
        cfg.bf16 = bool(cfg.bf16) and self.acc.device.type == "cuda"   # what the run gets; config.json records it
        return check_config(cfg, self.acc.num_processes)

    def processes(self, cfg: DistillConfig):
        return self.acc

    def newest_checkpoint(self, out_dir: Path) -> Optional[Path]:
        return ckpt.latest(out_dir)

    def train(self, p: Prepared) -> dict:
        latest = resume_checkpoint(p.out_dir, p.asked, p.procs) if p.has_run else None
        run_, start, metrics = setup(p, latest)
        return train(run_, start, metrics, p.started)



if __name__ == "__main__":   # the entry point moved: say where instead of exiting silently
    import sys
    sys.stderr.write("error: vopd_analysis.distill.loop is the built-in engine, not a command; run vopd distill ... "
                     "or python -m vopd_analysis.distill.command ... (also under accelerate launch -m)\n")
    sys.exit(2)
