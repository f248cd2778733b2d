"""``vopd distill --engine trl``: any registry estimator inside TRL 1.16's ``DistillationTrainer``.

TRL keeps what a multi-GPU run needs (DDP/FSDP/DeepSpeed through accelerate configs, vLLM
generation, gradient accumulation, gradient checkpointing, bf16, Trainer checkpoints and
resume, ``report_to``); this module replaces only its loss. ``RegistryDistillationTrainer``
overrides ``_compute_loss``: the micro-batch TRL generated (prompt and completion ids and
masks) becomes ``rollouts.Rollouts``, ``scoring.score`` computes the student's logits and exactly the
teacher signal the registry says the estimator needs, and ``estimators.surrogate_loss`` is
the loss; or, where ``--logits`` picks the fused path (``lm.fused_score``), both backbones'
hidden states go to ``vopd_analysis.fused`` and no [B, T, V] logits exist. The student's
forward runs inside TRL's ``_forward_redirection`` (so DDP/FSDP see it) and the teacher is
called through its own wrapper.

Normalisation (TRL's convention, ``num_items_in_batch``): TRL counts N, the unmasked
completion tokens of the whole generation batch (all processes, all accumulation
micro-batches), and passes N / P to each process's loss (P processes; DDP then averages the P
gradients and the Trainer sums the accumulation steps without rescaling). With
``--reduction token_mean`` the loss of a micro-batch is its surrogate sum divided by N / P,
so the update is the gradient of

    (1/N) sum over all tokens of the generation batch of the estimator's per-token values,

the built-in loop's ``token_mean``. With ``sequence_mean`` the divisor is the per-process
sequence count of the generation batch, B * G (micro-batch size B, G accumulation steps),
giving (1/(B G P)) sum over sequences. One completion per dataset row: each step's prompts
are the built-in loop's (``Prompts.train(step)``), each repeated ``--rollouts-per-prompt``
times, in order (``shuffle_dataset=False``).

Metrics: ``RunRecorder`` writes the built-in loop's ``metrics.jsonl`` / ``metrics.csv`` rows
(one train row per optimizer step, eval rows every ``--eval-every``, the same keys) and the
same ``summary.json``; ``vopd compare`` reads both engines' runs. TRL's own log keys stay in
its ``report_to`` trackers. Options of TRL's ``DistillationConfig`` that ``vopd distill``
does not set come from ``--trl-arg NAME=VALUE`` (JSON values), e.g.
``--trl-arg gradient_accumulation_steps=4 --trl-arg use_vllm=true --trl-arg report_to=trackio``.

From Python::

    from vopd_analysis.distill import trl_engine
    from vopd_analysis.distill.loop import DistillConfig
    trl_engine.run(DistillConfig(preset="tiny", estimator="opd_bstar", steps=200, out_dir="runs/trl"))

or, with your own dataset and models, ``RegistryDistillationTrainer(model=..., teacher_model=...,
args=DistillationConfig(...), train_dataset=..., processing_class=..., estimator="vopd")``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import time
import types
import typing
import warnings
from pathlib import Path
from typing import Optional

import torch

from .. import divergences as dv
from .. import estimators as est
from .. import params as prm
from ..errors import InputError
from ..lm import fused_score as fs
from ..lm import loading, tasks
from ..lm import rollouts as ro
from ..lm import scoring as sc
from ..records import check_rows, describe, is_kind, read_json, short
from . import checkpoint as ckpt
from . import loop
from .evaluate import reverse_kl_sums

TESTED_TRL = ("1.16.0", "1.17.0")      # [low, high): the versions the parity tests ran on
ROWS_FILE = "vopd_rows.json"          # the metrics rows saved in each Trainer checkpoint


# ----------------------------------------------------------------------------- checks before any model

def check_trl() -> str:
    """The installed TRL version; an ``InputError`` if TRL is missing or outside ``TESTED_TRL``."""
    from importlib import metadata

    from packaging.version import Version
    low, high = TESTED_TRL
    try:
        version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        raise InputError(f"--engine trl needs TRL: pip install 'vopd-analysis[trl]' (trl>={low},<{high})") from None
    if not Version(low) <= Version(version) < Version(high):
        raise InputError(f"--engine trl is tested with trl>={low},<{high}, but trl {version} is installed; "
                         f"pip install 'trl>={low},<{high}'")
    return version


# DistillationConfig fields ``vopd distill`` sets from its own options (a --trl-arg may not set them)
OWN_ARGS = {"output_dir": "--out", "max_steps": "--steps", "learning_rate": "--lr", "weight_decay": "--weight-decay",
            "warmup_steps": "--warmup-steps", "max_grad_norm": "--grad-clip", "seed": "--seed",
            "temperature": "--temperature", "top_p": "--top-p", "max_completion_length": "--max-new-tokens",
            "per_device_train_batch_size": "--prompts-per-step and --rollouts-per-prompt", "bf16": "--no-bf16",
            "save_steps": "--save-every", "save_total_limit": "--keep-checkpoints", "beta": "--estimator",
            "shuffle_dataset": "(the step's prompts are kept in order)",
            "remove_unused_columns": "(the records are needed for grading)"}


def check_trl_args(trl_args: dict) -> None:
    """Every ``--trl-arg`` must name a ``DistillationConfig`` field that ``vopd distill`` does not set,
    with a value of the field's type where that is a plain one (an integer, a number, true or false, a
    string, or null where allowed); ``gradient_accumulation_steps`` must be at least 1. Values of other
    types are left to ``DistillationConfig`` itself (``trl_config``)."""
    from trl import DistillationConfig
    fields = {f.name for f in dataclasses.fields(DistillationConfig)}
    hints = typing.get_type_hints(DistillationConfig)
    for name, value in trl_args.items():
        if name in OWN_ARGS:
            raise InputError(f"--trl-arg {name}: set it with {OWN_ARGS[name]}")
        if name not in fields:
            close = [f for f in sorted(fields) if name.replace("-", "_") == f or name in f][:3]
            raise InputError(f"--trl-arg {name}: not a field of trl.DistillationConfig"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
        kind = _plain_kind(hints.get(name))
        if kind is not None and not is_kind(value, kind):
            raise InputError(f"--trl-arg {name}={short(value)}: trl.DistillationConfig's {name} must be "
                             f"{describe(kind)}")
    accumulation = trl_args.get("gradient_accumulation_steps", 1)
    if accumulation < 1:
        raise InputError(f"--trl-arg gradient_accumulation_steps must be at least 1, got {accumulation}")


def _plain_kind(annotation):
    """The JSON kind (``vopd_analysis.records.is_kind``) of a field annotation made of int, float, bool, str and None
    (``int``, ``str | None``), else None."""
    plain = (int, float, bool, str, type(None))
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return (args if len(args) > 1 else args[0]) if args and all(a in plain for a in args) else None


def check_teacher(cfg: loop.DistillConfig) -> None:
    """A teacher behind a server (an http(s) URL) gives at most sampled-token and top-k log-probs:
    refused, naming the signal the estimator needs (a local teacher gives every signal)."""
    if cfg.teacher is None or not re.match(r"^https?://", cfg.teacher):
        return
    signal = est.get(cfg.estimator).teacher_signal
    need = {"full": "the teacher's full logits", "topk": "the teacher's log-probs on the student's top-k",
            "sampled": "only sampled-token log-probs"}[signal]
    if signal == "sampled":
        raise InputError(f"--teacher {cfg.teacher}: teacher servers are not supported yet; load the teacher "
                         f"locally (estimator '{cfg.estimator}' needs {need})")
    raise InputError(f"--teacher {cfg.teacher}: estimator '{cfg.estimator}' needs {need}, which a teacher server "
                     "(sampled and teacher-top-k log-probs only) cannot give; load the teacher locally")


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


def probe_names(cfg: loop.DistillConfig) -> list:
    """The estimators of ``--probe-estimators`` (comma-separated registry names)."""
    names = [n.strip() for n in cfg.probe_estimators.split(",") if n.strip()]
    if not names:
        raise InputError("--probe-estimators names no estimator")
    for name in names:
        check_per_row(name, f"--probe-estimators: '{name}'")
    return names


def check_engine_config(cfg: loop.DistillConfig, world: int) -> dict:
    """All checks of a TRL run that read no model weights; returns the estimator's parameters.

    ``loop.check_config`` plus: TRL's version, ``--trl-arg`` names, a teacher server, group
    estimators (TRL samples one completion per row, so K rollouts of a prompt are not kept
    together), and the batch split (prompts_per_step x rollouts_per_prompt over processes and
    accumulation steps).
    """
    check_trl()
    check_trl_args(cfg.trl_args)
    params = loop.check_config(cfg, world)
    check_teacher(cfg)
    if cfg.probe_every > 0:
        probe_names(cfg)
    check_per_row(cfg.estimator, f"estimator '{cfg.estimator}'")
    rows = cfg.prompts_per_step * cfg.rollouts_per_prompt
    accum = cfg.trl_args.get("gradient_accumulation_steps", 1)
    if rows % (world * accum):
        raise InputError(f"prompts_per_step x rollouts_per_prompt ({rows}) must be divisible by processes x "
                         f"gradient_accumulation_steps ({world} x {accum})")
    return params


# ----------------------------------------------------------------------------- the trainer

def rollouts_from_inputs(inputs: dict) -> ro.Rollouts:
    """TRL's micro-batch (left-padded ``prompt_ids``/``prompt_mask``, right-padded
    ``completion_ids``/``completion_mask``) as ``rollouts.Rollouts``: the response is the completion."""
    prompt_mask, completion_mask = inputs["prompt_mask"], inputs["completion_mask"]
    n = prompt_mask.shape[0]
    return ro.Rollouts(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                       attention_mask=torch.cat([prompt_mask, completion_mask], 1).long(),
                       response_mask=torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1).long(),
                       prompt_index=torch.arange(n), prompt_width=prompt_mask.shape[1])


@functools.lru_cache(maxsize=None)
def _trainer_class():
    """``RegistryDistillationTrainer``, defined on first use so that importing this module needs no TRL."""
    from trl import DistillationTrainer

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
            self.teacher_timer = loop.TeacherTimer(teacher)
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

    return RegistryDistillationTrainer


def __getattr__(name):
    """``RegistryDistillationTrainer`` and ``VarianceProbeCallback``, made on first access (TRL imported then)."""
    makers = {"RegistryDistillationTrainer": _trainer_class, "VarianceProbeCallback": _probe_class}
    if name in makers:
        return makers[name]()
    raise AttributeError(name)


# ----------------------------------------------------------------------------- the run's records

@functools.lru_cache(maxsize=None)
def _recorder_class():
    from transformers import TrainerCallback

    class RunRecorder(TrainerCallback):
        """Writes the built-in loop's metrics rows from a ``RegistryDistillationTrainer``: a train row
        at each optimizer step (from TRL's log of it, on every process), an eval row at step 0 and
        every ``eval_every`` steps, the rows into each Trainer checkpoint (``ROWS_FILE``), then the
        checkpoint's manifest of sizes and sha256 (``checkpoint.write_manifest``), as the built-in loop's."""

        def __init__(self, cfg: loop.DistillConfig, prompts: loop.Prompts, metrics: loop.Metrics, start: int):
            self.cfg, self.prompts, self.metrics, self.start = cfg, prompts, metrics, start
            self.trainer, self.run, self.step_began = None, None, time.perf_counter()   # both set by _train

        def evaluate(self, step: int) -> None:
            if self.cfg.eval_every > 0 and self.prompts.eval:
                self.metrics.log(loop.evaluate(self.run, step))

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
                "peak_memory_mb": loop.peak_memory_mb(self.trainer.accelerator.device),
                **{k: v for k, v in logs.items() if k.startswith("probe/")}})
            if self.cfg.eval_every > 0 and (step % self.cfg.eval_every == 0 or step == self.cfg.steps):
                self.evaluate(step)
            self.step_began = time.perf_counter()

        def on_save(self, args, state, control, **kw):
            self.trainer.accelerator.wait_for_everyone()     # every process's files are in the checkpoint
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                loop.write_json_atomic(folder / ROWS_FILE, self.metrics.rows)
                ckpt.write_manifest(folder, state.global_step)     # last: a checkpoint with one is complete
                self.metrics.write_csv()

    return RunRecorder


@functools.lru_cache(maxsize=None)
def _probe_class():
    from transformers import TrainerCallback

    from ..lm import variance

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

    return VarianceProbeCallback


@functools.lru_cache(maxsize=None)
def _skip_class():
    from transformers import TrainerCallback

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

    return SkipNonFinite


@functools.lru_cache(maxsize=None)
def _stop_class():
    from transformers import TrainerCallback

    class StopOnRequest(TrainerCallback):
        """Ctrl-C or SIGTERM as in the built-in loop (``loop.StopOnSignal``): after the current optimizer
        step, every process agrees to stop (``loop.stop_agreed``), a Trainer checkpoint of that step is
        written and training ends; ``_train`` then raises ``loop.Interrupted`` (exit status 130, 143
        after SIGTERM)."""

        def __init__(self, stop: "loop.StopOnSignal"):
            self.stop, self.trainer, self.stopped_at = stop, None, None

        def on_step_end(self, args, state, control, **kw):
            if loop.stop_agreed(self.trainer.accelerator, self.stop):
                control.should_save = control.should_training_stop = True
                self.stopped_at = state.global_step

    return StopOnRequest


# ----------------------------------------------------------------------------- the run

class _Processes:
    """The process group as ``loop.on_main``/``claim_out_dir`` see an accelerator, before TRL's exists."""

    def __init__(self, state):
        self.state = state
        self.is_main_process, self.num_processes, self.device = state.is_main_process, state.num_processes, state.device

    def reduce(self, tensor, op="sum"):
        if self.num_processes > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def wait_for_everyone(self):
        self.state.wait_for_everyone()

    def main_process_first(self):
        return self.state.main_process_first()

    def print(self, *args):
        if self.is_main_process:
            print(*args, flush=True)


def trl_config(cfg: loop.DistillConfig, world: int):
    """TRL's ``DistillationConfig`` for this run: ``vopd distill``'s options (``OWN_ARGS``) plus
    ``--trl-arg``s; AdamW betas (0.9, 0.95), linear warm-up then a constant rate, one log per step,
    as the built-in loop. A value TRL refuses (``lr_scheduler_type=bogus``) or a ``report_to`` tracker that
    is not installed is an ``InputError`` naming the ``--trl-arg``; nothing is loaded."""
    from transformers.integrations import get_available_reporting_integrations
    from trl import DistillationConfig
    accum = cfg.trl_args.get("gradient_accumulation_steps", 1)
    per_device = cfg.prompts_per_step * cfg.rollouts_per_prompt // (world * accum)
    cpu = not torch.cuda.is_available()
    settings = dict(output_dir=str(Path(cfg.out_dir) / "checkpoints"), max_steps=cfg.steps, learning_rate=cfg.lr,
                    weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.grad_clip,
                    seed=cfg.seed, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_completion_length=cfg.max_new_tokens, per_device_train_batch_size=per_device,
                    bf16=bool(cfg.bf16) and not cpu, use_cpu=cpu, beta=1.0, shuffle_dataset=False,
                    remove_unused_columns=False, save_steps=max(cfg.save_every, 1),
                    save_strategy="steps" if cfg.save_every > 0 else "no",
                    save_total_limit=cfg.keep_checkpoints if cfg.keep_checkpoints > 0 else None,
                    lr_scheduler_type="constant_with_warmup", adam_beta1=0.9, adam_beta2=0.95, logging_steps=1,
                    report_to="none", gradient_checkpointing=False, disable_tqdm=False)
    settings.update(cfg.trl_args)
    try:
        args = DistillationConfig(**settings)
    except (ValueError, TypeError) as err:
        given = ", ".join(f"{k}={short(v)}" for k, v in cfg.trl_args.items())
        raise InputError(f"--trl-arg {given}: trl.DistillationConfig refuses it: {ckpt.first_line(err, 200)}") from None
    installed = get_available_reporting_integrations()
    missing = [name for name in args.report_to or [] if name not in installed]
    if missing:
        raise InputError(f"--trl-arg report_to: {', '.join(missing)} is not installed (pip install {missing[0]}); "
                         f"installed trackers: {', '.join(installed) or 'none'}")
    return args


def _quiet_console(trainer) -> None:
    """Keep TRL's progress bar but not its printed dict per logged step (the metrics files hold them)."""
    from transformers.trainer_callback import ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarOnly())


def step_dataset(cfg: loop.DistillConfig, prompts: loop.Prompts):
    """The training rows in order: step s's prompts (``Prompts.train(s)``), each ``rollouts_per_prompt``
    times; columns ``prompt`` and ``row`` (index into the returned records, for grading)."""
    from datasets import Dataset
    records, rows = [], []
    for step in range(1, cfg.steps + 1):
        for record in prompts.train(step):
            for _ in range(cfg.rollouts_per_prompt):
                rows.append({"prompt": record["prompt"], "row": len(records)})
            records.append(record)
    return Dataset.from_list(rows), records


def trainer_checkpoints(out_dir: Path) -> list:
    """The Trainer checkpoints ``out_dir/checkpoints/checkpoint-N`` of a run, oldest first ([] if none)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(dirs, key=ckpt.step_of)


def resume_point(out_dir: Path, procs) -> tuple:
    """(the Trainer checkpoint to resume from or None, its step, its metrics rows): the newest one that
    passes its manifest, newer damaged ones set aside with a warning naming each bad file, as the
    built-in loop (``loop.choose_checkpoint``, on the main process); one without a manifest is loaded
    unverified if its rows file is there (written before manifests existed), else it is incomplete."""
    loop.on_main(procs, lambda: loop.choose_checkpoint(out_dir, trainer_checkpoints(out_dir), required=(ROWS_FILE,)))
    dirs = trainer_checkpoints(out_dir)
    if not dirs:
        return None, 0, []
    rows_file = dirs[-1] / ROWS_FILE
    rows = check_rows(read_json(rows_file, "the checkpoint's metrics rows", list), rows_file)
    return str(dirs[-1]), ckpt.step_of(dirs[-1]), rows


def run(cfg: loop.DistillConfig, resume: bool = False) -> dict:
    """``loop.run``'s contract on TRL: every check before the run folder or a model, the folder
    locked, the same metrics files and ``summary.json``; returns the same result dict.

    Args:
      cfg: the config (``engine`` ignored; ``trl_args`` passed to TRL).
      resume: continue from the newest Trainer checkpoint in ``--out/checkpoints``.
    """
    started = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    params = check_engine_config(cfg, world)
    cfg.bf16 = bool(cfg.bf16) and torch.cuda.is_available()
    asked = dataclasses.replace(cfg)
    out_dir = loop.check_out_dir(cfg.out_dir)
    args = trl_config(cfg, world)                      # sets up the process group; loads nothing
    procs = _Processes(args.distributed_state)
    if resume and (out_dir / "config.json").is_file():
        loop.check_resumable(out_dir, asked)
        summary = loop.finished_run(out_dir, cfg.steps)
        if summary is not None:
            return loop.already_finished(out_dir, summary, procs)
        loop.check_steps_left(out_dir, cfg.steps, (trainer_checkpoints(out_dir) or [None])[-1])
    if procs.device.type == "cpu":
        torch.set_num_threads(cfg.num_threads or 1)
    paths = loop.model_paths(cfg, procs)
    info = loading.check_compatible_files(*paths)           # vocabularies, before any weight is read
    defaulted = cfg.max_new_tokens is None
    if defaulted:
        cfg.max_new_tokens = loop.default_max_new_tokens(cfg)
        args.max_completion_length = cfg.max_new_tokens
    prompts = loop.Prompts(cfg, loop.prompt_check(cfg, *paths, defaulted=defaulted))
    for note in prompts.notes if procs.is_main_process else []:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    claim, begun = loop.claim_out_dir(out_dir, procs), False
    try:
        has_run = (out_dir / "config.json").exists() or (out_dir / "metrics.jsonl").exists()
        if has_run and not resume:
            raise InputError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
        latest, start, rows = resume_point(out_dir, procs) if resume else (None, 0, [])
        result = _train(cfg, asked, args, procs, params, paths, info, prompts, latest, start, rows, started)
        begun = True
        return result
    finally:
        claim.release(started=begun or (out_dir / "config.json").exists())


def _train(cfg, asked, args, procs, params, paths, info, prompts, latest, start, rows, started) -> dict:
    """Load the pair, build the trainer, train, write the final model and ``summary.json``."""
    with ckpt.quiet_hf_progress():
        pair = loading.load_pair(*paths)
    if cfg.bf16:
        pair.teacher.to(torch.bfloat16)
    params, capped = prm.cap_to_vocab(cfg.estimator, params, cfg.estimator_params, info.vocab_size)
    for c in capped:
        procs.print(f"note: {c['param']}={c['used']} (registry default {c['default']} capped at the vocabulary size)")
    tokenizer = pair.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if info.student_output_size > info.vocab_size and not args.use_vllm:   # never sample a padded output row
        args.generation_kwargs = {**(args.generation_kwargs or {}),
                                  "suppress_tokens": list(range(info.vocab_size, info.student_output_size))}
    dataset, records = step_dataset(cfg, prompts)
    out_dir = Path(cfg.out_dir)
    loop.start_out_dir(out_dir, dataclasses.asdict(asked), procs)
    metrics = loop.Metrics(out_dir, [r for r in rows if r["step"] <= start], procs.is_main_process)
    recorder = _recorder_class()(cfg, prompts, metrics, start)
    stop = loop.StopOnSignal()
    stopper = _stop_class()(stop)
    callbacks = [recorder, stopper, _skip_class()()]
    if cfg.probe_every > 0:
        callbacks.append(_probe_class()(probe_names(cfg), every=cfg.probe_every,
                                        params={cfg.estimator: params}))
    trainer = _trainer_class()(model=pair.student, teacher_model=pair.teacher, args=args, train_dataset=dataset,
                               processing_class=tokenizer, estimator=cfg.estimator, estimator_params=params,
                               reduction=cfg.reduction, vocab_size=info.vocab_size, records=records, logits=cfg.logits,
                               callbacks=callbacks)
    for callback in callbacks:
        callback.trainer = trainer
    recorder.run = loop.Run(cfg, trainer.accelerator, pair.student, trainer.teacher_model, tokenizer, info.vocab_size,
                            params, prompts, optimizer=None, scheduler=None, teacher_timer=trainer.teacher_timer)
    _quiet_console(trainer)
    procs.print(f"distill (trl {check_trl()}): {cfg.estimator} {params}, {procs.num_processes} process(es) on "
                f"{procs.device}, steps {start + 1}..{cfg.steps} -> {cfg.out_dir}")
    with stop, ckpt.disk_full_is_input_error(out_dir, "a Trainer checkpoint"):
        trainer.train(resume_from_checkpoint=latest)
    if stopper.stopped_at is not None and stopper.stopped_at < cfg.steps:
        metrics.write_csv()
        where = f"checkpoint {Path(args.output_dir) / f'checkpoint-{stopper.stopped_at}'}"
        message = loop.interrupted_message(out_dir, stopper.stopped_at, cfg.steps, where, procs.num_processes,
                                           stop.signum)
        procs.print(message)
        raise loop.Interrupted(message, stop.status)
    result = loop.finish(recorder.run, start, metrics, started, extra={"engine": f"trl {check_trl()}"})
    return {**result, "trainer": trainer}
