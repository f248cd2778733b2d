"""The TRL engine's subclasses of TRL and transformers classes, in one module that imports TRL: imported
only when ``--engine trl`` runs (by ``trl_engine.py``, after its version check).

``RegistryDistillationTrainer`` overrides two private methods of TRL 1.16's ``DistillationTrainer``,
``_generate_and_score_completions`` (timing and grading of the completions) and ``_compute_loss`` (the
registry's loss); ``OVERRIDDEN`` lists the parameters it expects of them, and
``tests/test_trl_engine.py`` checks them against the installed TRL, so that a TRL release that changes
them fails there, naming the method. The callbacks record the run's metrics rows (``RunRecorder``), skip
a non-finite update (``SkipNonFinite``), stop on Ctrl-C or SIGTERM (``StopOnRequest``), probe the
estimators' gradient variance (``VarianceProbeCallback``) and keep TRL's console to its bar (``quiet_console``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import DistillationTrainer

from .. import divergences as dv
from .. import estimators as est
from .. import params as prm
from ..errors import InputError
from ..lm import fused_score as fs
from ..lm import loading, tasks, variance
from ..lm import rollouts as ro
from ..lm import scoring as sc
from ..records import write_json_atomic
from . import checkpoint as ckpt
from .config import DistillConfig
from .evaluate import reverse_kl_sums
from .metrics import Metrics, TeacherTimer, peak_memory_mb
from .prompts import Prompts
from .runner import evaluate
from .stopping import StopOnSignal, stop_agreed

ROWS_FILE = "vopd_rows.json"          # the metrics rows saved in each Trainer checkpoint

# TRL's private methods that RegistryDistillationTrainer overrides, with the parameters it expects of them
OVERRIDDEN = {"_generate_and_score_completions": ("self", "inputs"),
              "_compute_loss": ("self", "unwrapped_student", "inputs", "num_items_in_batch")}


def check_per_row(name: str, what: str) -> None:
    """Refuse an estimator that TRL's batches cannot feed: one needing exact tabular quantities, or a
    group estimator (TRL samples one completion per dataset row, so K rollouts of a prompt are not
    kept together). ``what`` starts the message (``estimator 'x'``, ``--probe-estimators: 'x'``)."""
    spec = est.get(name)
    if spec.analysis_only:
        raise InputError(f"{what} needs exact tabular quantities; it cannot run on real models")
    if spec.group:
        raise InputError(f"{what} needs K rollouts of each prompt together, which TRL's one-completion-per-row "
                         "sampler does not keep; use --engine builtin")


def rollouts_from_inputs(inputs: dict) -> ro.Rollouts:
    """TRL's micro-batch (left-padded ``prompt_ids``/``prompt_mask``, right-padded
    ``completion_ids``/``completion_mask``) as ``rollouts.Rollouts``: the response is the completion."""
    prompt_mask, completion_mask = inputs["prompt_mask"], inputs["completion_mask"]
    n = prompt_mask.shape[0]
    return ro.Rollouts(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                       attention_mask=torch.cat([prompt_mask, completion_mask], 1).long(),
                       response_mask=torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1).long(),
                       prompt_index=torch.arange(n), prompt_width=prompt_mask.shape[1])


class RegistryDistillationTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` with the loss of a registry estimator (module docstring).

    Extra keyword arguments:
      estimator: registry name; estimator_params: its parameters (registry defaults otherwise).
      reduction: "token_mean" (TRL's) or "sequence_mean".
      vocab_size: the shared vocabulary V (default: the tokenizer's, via ``loading.shared_vocabulary``).
      records: dataset row -> prompt record, for grading completions (the ``row`` column).
      logits: "auto", "materialised" or "fused" (``fused_score.choose``).
    """

    def __init__(self, *args, estimator: str = "vopd", estimator_params: Optional[dict] = None,
                 reduction: str = "token_mean", vocab_size: Optional[int] = None,
                 records: Optional[list] = None, logits: str = "auto", **kwargs):
        check_per_row(estimator, f"estimator '{estimator}'")
        if reduction not in ("token_mean", "sequence_mean"):
            raise InputError(f"reduction must be 'token_mean' or 'sequence_mean', got '{reduction}'")
        fs.choose(logits, estimator, 0, 0)            # refuses a path the estimator does not have
        self.estimator, self.reduction, self.records, self.logits = estimator, reduction, records, logits
        self.estimator_params = prm.resolve(estimator, dict(estimator_params or {}))
        super().__init__(*args, **kwargs)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.vocab_size = vocab_size or loading.check_compatible(self.accelerator.unwrap_model(self.model),
                                                            self.processing_class, teacher,
                                                            self.processing_class).vocab_size
        self.teacher_timer = TeacherTimer(teacher)
        self.step_stats = dict.fromkeys(self.STATS, 0.0)
        self.skipped_steps = set()                     # steps whose update SkipNonFinite dropped

    # sums over the micro-batches of one optimizer step (``take_step_stats`` reduces them over processes)
    STATS = ("exact_kl", "has_exact", "sampled_kl", "sequences", "tokens", "correct", "graded", "rollout_seconds")

    def _generate_and_score_completions(self, inputs):
        t0 = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.step_stats["rollout_seconds"] += time.perf_counter() - t0
        if self.records is not None and "row" in inputs[0]:
            texts = [self.processing_class.decode(ids[m.bool()], skip_special_tokens=True)
                     for ids, m in zip(out["completion_ids"], out["completion_mask"])]
            grades = [tasks.verify(self.records[int(x["row"])], t) for x, t in zip(inputs, texts)]
            self.step_stats["correct"] += sum(g is True for g in grades)
            self.step_stats["graded"] += sum(g is not None for g in grades)
        return out

    def _divisor(self, batch, num_items_in_batch):
        """N / P for token_mean (TRL's ``num_items_in_batch``), B G for sequence_mean, None in evaluation."""
        if not self.model.training or num_items_in_batch is None:
            return None
        if self.reduction == "token_mean":
            return num_items_in_batch
        return float(batch.num_sequences * self.args.gradient_accumulation_steps)

    def _score(self, unwrapped_student, rollouts):
        """``fused_score.FusedScore`` (the ``logits`` path says fused for this batch: both backbones
        only, the teacher's through its distributed wrapper, as TRL runs it) or ``scoring.score``'s batch."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        if fs.choose(self.logits, self.estimator,
                     fs.planned_tokens(rollouts, self.args.max_completion_length), self.vocab_size):
            def teacher_hidden(model, *args):
                return self._forward_redirection(self.teacher_model, teacher, fs.response_hidden, teacher, *args)
            return fs.score(unwrapped_student, teacher, rollouts, self.estimator, self.estimator_params,
                            self.vocab_size, teacher_hidden=teacher_hidden)
        return sc.score(unwrapped_student, self.teacher_model, rollouts, [self.estimator],
                        vocab_size=self.vocab_size, params={self.estimator: self.estimator_params})

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        rollouts = rollouts_from_inputs(inputs)
        self.last_rollouts = rollouts                  # for VarianceProbeCallback
        self.teacher_model.eval()
        scored = self._score(unwrapped_student, rollouts)
        loss = fs.loss_of(scored, self.estimator, self.reduction, self._divisor(scored, num_items_in_batch),
                          self.estimator_params)
        with torch.no_grad():
            if isinstance(scored, fs.FusedScore):     # no logits to take the entropy of: logged as None
                entropy = torch.tensor(float("nan"), device=loss.device)
            else:
                entropy = (dv.entropy(scored.student_logits.detach()) * scored.mask).sum()
            if self.model.training:
                exact, sampled = reverse_kl_sums(scored)
                for key, value in (("exact_kl", 0.0 if math.isnan(exact) else exact),
                                   ("has_exact", float(not math.isnan(exact))), ("sampled_kl", sampled),
                                   ("sequences", scored.num_sequences), ("tokens", float(scored.mask.sum()))):
                    self.step_stats[key] += value
        return loss, entropy, scored.mask.sum()

    def take_step_stats(self) -> dict:
        """This step's statistics summed over processes (a collective), and reset."""
        local = torch.tensor([*self.step_stats.values(), self.teacher_timer.seconds], dtype=torch.float64)
        total = self.accelerator.reduce(local.to(self.accelerator.device), "sum").cpu().tolist()
        self.step_stats = dict.fromkeys(self.STATS, 0.0)
        self.teacher_timer.seconds = 0.0
        return dict(zip(self.STATS + ("teacher_seconds",), total))


# ----------------------------------------------------------------------------- callbacks

class RunRecorder(TrainerCallback):
    """Writes the built-in loop's metrics rows from a ``RegistryDistillationTrainer``: a train row
    at each optimizer step (from TRL's log of it, on every process), an eval row at step 0 and
    every ``eval_every`` steps, the rows into each Trainer checkpoint (``ROWS_FILE``), then the
    checkpoint's manifest of sizes and sha256 (``checkpoint.write_manifest``), as the built-in loop's."""

    def __init__(self, cfg: DistillConfig, prompts: Prompts, metrics: Metrics, start: int):
        self.cfg, self.prompts, self.metrics, self.start = cfg, prompts, metrics, start
        self.trainer, self.run, self.step_began = None, None, time.perf_counter()   # both set by _train

    def evaluate(self, step: int) -> None:
        if self.cfg.eval_every > 0 and self.prompts.eval:
            self.metrics.log(evaluate(self.run, step))

    def on_train_begin(self, args, state, control, **kw):
        if self.start == 0:
            self.evaluate(0)
        self.step_began = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" not in logs or "train_runtime" in logs:
            return
        s = self.trainer.take_step_stats()
        seconds = time.perf_counter() - self.step_began
        rollout, teacher = s["rollout_seconds"] / self.trainer.accelerator.num_processes, \
            s["teacher_seconds"] / self.trainer.accelerator.num_processes
        grad_norm = logs.get("grad_norm", float("nan"))
        step = state.global_step
        self.metrics.log({
            "kind": "train", "step": step, "loss": float(logs["loss"]),
            "reverse_kl": s["exact_kl"] / s["sequences"] if s["has_exact"] else float("nan"),
            "reverse_kl_sampled": s["sampled_kl"] / s["sequences"],
            "sample_accuracy": s["correct"] / s["graded"] if s["graded"] else None,
            "grad_norm": float(grad_norm), "skipped": step in self.trainer.skipped_steps,
            "lr": float(logs.get("learning_rate", float("nan"))), "response_tokens": int(s["tokens"]),
            "tokens_per_s": s["tokens"] / seconds, "time_rollout": rollout, "time_teacher": teacher,
            "time_student": seconds - rollout - teacher,
            "peak_memory_mb": peak_memory_mb(self.trainer.accelerator.device),
            **{k: v for k, v in logs.items() if k.startswith("probe/")}})
        if self.cfg.eval_every > 0 and (step % self.cfg.eval_every == 0 or step == self.cfg.steps):
            self.evaluate(step)
        self.step_began = time.perf_counter()

    def on_save(self, args, state, control, **kw):
        self.trainer.accelerator.wait_for_everyone()     # every process's files are in the checkpoint
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json_atomic(folder / ROWS_FILE, self.metrics.rows)
            ckpt.write_manifest(folder, state.global_step)     # last: a checkpoint with one is complete
            self.metrics.write_csv()


class VarianceProbeCallback(TrainerCallback):
    """Every ``every`` optimizer steps, before the update: each estimator's gradient statistics
    on the step's last micro-batch of rollouts (the same rollouts for all, common random
    numbers), per process, logged with the step's metrics as ``probe/<estimator>/<statistic>``.

    For each estimator and rollout i, g_i = grad of rollout i's surrogate (``variance.
    rollout_gradients``, one backward each); over the B rollouts: ``trace_cov`` = tr Sigma
    (unbiased), ``snr`` = |g_bar|^2 / (tr Sigma / B), ``noise_scale`` = tr Sigma / |G|^2 with
    the unbiased |G|^2 (NaN when that is <= 0), ``cosine`` to ``reference``'s mean gradient.
    The training gradient is saved and restored around the probe. Needs the whole student on
    each process (one device, or DDP: under ``no_sync``); FSDP / ZeRO-3 shards are refused.

    Args:
      trainer: the ``RegistryDistillationTrainer`` (set after construction if None).
      estimators: registry names probed; every ``every`` steps; ``reference``: an estimator name.
    """

    def __init__(self, estimators=("opd", "vopd", "opd_bstar"), every: int = 50, reference: str = "full_kl",
                 trainer=None, params: Optional[dict] = None):
        if every < 1:
            raise InputError(f"the probe's interval must be >= 1 step, got {every}")
        names = list(dict.fromkeys([*estimators, reference]))
        for name in names:
            check_per_row(name, f"probed estimator '{name}'")
        self.estimators, self.every, self.reference, self.trainer = list(estimators), every, reference, trainer
        self.params = {name: prm.resolve(name, dict((params or {}).get(name, {}))) for name in names}

    def on_train_begin(self, args, state, control, **kw):
        if self.trainer.is_fsdp_enabled or self.trainer.is_deepspeed_enabled:
            raise InputError("the variance probe needs the whole student on each process; "
                             "it does not run under FSDP or DeepSpeed")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if (state.global_step + 1) % self.every:
            return
        tr = self.trainer
        student = tr.accelerator.unwrap_model(tr.model)
        named = variance.trainable_parameters(student)
        saved = [None if p.grad is None else p.grad.detach().clone() for _, p in named]
        moments = {name: variance.GradientMoments(sum(p.numel() for _, p in named), num_projections=0,
                                                  device=named[0][1].device) for name in self.params}
        sync = tr.model.no_sync() if hasattr(tr.model, "no_sync") else contextlib.nullcontext()
        with sync:
            for name, g in variance.rollout_gradients(student, tr.teacher_model, tr.last_rollouts, self.params,
                                                      named, vocab_size=tr.vocab_size):
                moments[name].update(g)
        for (_, p), grad in zip(named, saved):
            p.grad = grad
        ref = moments[self.reference].mean
        for name in self.estimators:
            m = moments[name]
            for key, value in (("trace_cov", m.trace()), ("snr", m.snr()), ("noise_scale", m.noise_scale()),
                               ("cosine", m.cosine(ref))):
                tr._metrics["train"][f"probe/{name}/{key}"].append(float(value))


class SkipNonFinite(TrainerCallback):
    """A non-finite gradient skips the update, as in the built-in loop: before the optimizer step,
    every gradient is dropped (``p.grad = None``: AdamW leaves such a parameter and its moments
    untouched) and the step is recorded in ``trainer.skipped_steps``, with a warning. The
    gradients are the all-reduced ones (DDP), so every process decides alike; under DeepSpeed
    the engine keeps the gradients and this does nothing. The learning-rate schedule still
    advances (the built-in loop holds it)."""

    def __init__(self):
        self.trainer = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        tr = self.trainer
        if tr.is_deepspeed_enabled:
            return
        grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            return
        for p in tr.model.parameters():
            p.grad = None
        tr.skipped_steps.add(state.global_step + 1)
        if state.is_world_process_zero:
            warnings.warn(f"step {state.global_step + 1}: non-finite loss or gradient; the update was skipped",
                          RuntimeWarning)


class StopOnRequest(TrainerCallback):
    """Ctrl-C or SIGTERM as in the built-in loop (``stopping.StopOnSignal``): after the current optimizer
    step, every process agrees to stop (``stopping.stop_agreed``), a Trainer checkpoint of that step is
    written and training ends; ``trl_engine`` then raises ``stopping.Interrupted`` (exit status 130, 143
    after SIGTERM)."""

    def __init__(self, stop: StopOnSignal):
        self.stop, self.trainer, self.stopped_at = stop, None, None

    def on_step_end(self, args, state, control, **kw):
        if stop_agreed(self.trainer.accelerator, self.stop):
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step


class BarOnly(ProgressCallback):
    """TRL's progress bar without its printed dict per logged step (the metrics files hold them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def quiet_console(trainer) -> None:
    """Keep TRL's progress bar but not its printed dict per logged step (the metrics files hold them)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarOnly())
