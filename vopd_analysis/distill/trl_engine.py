"""``vopd distill --engine trl``: any registry estimator inside TRL 1.16's ``DistillationTrainer``.

TRL keeps what a multi-GPU run needs (DDP/FSDP/DeepSpeed through accelerate configs, vLLM
generation, gradient accumulation, gradient checkpointing, bf16, Trainer checkpoints and
resume, ``report_to``); this module replaces only its loss. ``RegistryDistillationTrainer``
(``trl_trainer.py``, imported only when this engine runs) overrides ``_compute_loss``: the
micro-batch TRL generated (prompt and completion ids and
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
    from vopd_analysis.distill.config import DistillConfig
    trl_engine.run(DistillConfig(preset="tiny", estimator="opd_bstar", steps=200, out_dir="runs/trl"))

or, with your own dataset and models, ``RegistryDistillationTrainer(model=..., teacher_model=...,
args=DistillationConfig(...), train_dataset=..., processing_class=..., estimator="vopd")``.

The run around the trainer is shared with the built-in engine (``runner.run``: checks, run folder, lock,
resume, summary); this module fills in its ``Engine`` (``Trl``) and never imports the built-in loop.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Optional

import torch

from .. import estimators as est
from ..errors import InputError
from ..lm import loading
from ..records import check_rows, describe, is_kind, read_json, short
from . import checkpoint as ckpt
from . import rundir, runner
from .config import DistillConfig, check_config, flag_of
from .metrics import Metrics
from .prompts import Prompts
from .runner import Prepared
from .stopping import Interrupted, StopOnSignal, interrupted_message

TESTED_TRL = ("1.16.0", "1.17.0")      # [low, high): the versions the parity tests ran on


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


def per_device_batch(cfg: DistillConfig, world: int) -> int:
    """Sequences per process and micro-batch: a step's prompts x rollouts over processes and accumulation steps."""
    accumulation = cfg.trl_args.get("gradient_accumulation_steps", 1)
    return cfg.prompts_per_step * cfg.rollouts_per_prompt // (world * accumulation)


# DistillationConfig fields that ``vopd distill`` sets from its own options (so a --trl-arg may not set them):
# name -> (the DistillConfig fields it comes from, or why it is fixed; its value for (cfg, world))
OWN_SETTINGS = {
    "output_dir": (("out_dir",), lambda cfg, world: str(Path(cfg.out_dir) / "checkpoints")),
    "max_steps": (("steps",), lambda cfg, world: cfg.steps),
    "learning_rate": (("lr",), lambda cfg, world: cfg.lr),
    "weight_decay": (("weight_decay",), lambda cfg, world: cfg.weight_decay),
    "warmup_steps": (("warmup_steps",), lambda cfg, world: cfg.warmup_steps),
    "max_grad_norm": (("grad_clip",), lambda cfg, world: cfg.grad_clip),
    "seed": (("seed",), lambda cfg, world: cfg.seed),
    "temperature": (("temperature",), lambda cfg, world: cfg.temperature),
    "top_p": (("top_p",), lambda cfg, world: cfg.top_p),
    "max_completion_length": (("max_new_tokens",), lambda cfg, world: cfg.max_new_tokens),
    "per_device_train_batch_size": (("prompts_per_step", "rollouts_per_prompt"), per_device_batch),
    "bf16": (("bf16",), lambda cfg, world: bool(cfg.bf16) and torch.cuda.is_available()),
    "save_steps": (("save_every",), lambda cfg, world: max(cfg.save_every, 1)),
    "save_total_limit": (("keep_checkpoints",),
                         lambda cfg, world: cfg.keep_checkpoints if cfg.keep_checkpoints > 0 else None),
    "beta": (("estimator",), lambda cfg, world: 1.0),                 # the registry's loss replaces TRL's
    "shuffle_dataset": ("the step's prompts are kept in order", lambda cfg, world: False),
    "remove_unused_columns": ("the records are needed for grading", lambda cfg, world: False),
}

# the option to use instead of a --trl-arg that names one of them
OWN_ARGS = {name: " and ".join(map(flag_of, source)) if isinstance(source, tuple) else f"({source})"
            for name, (source, _) in OWN_SETTINGS.items()}


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


def check_teacher(cfg: DistillConfig) -> None:
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


def probe_names(cfg: DistillConfig) -> list:
    """The estimators of ``--probe-estimators`` (comma-separated registry names)."""
    names = [n.strip() for n in cfg.probe_estimators.split(",") if n.strip()]
    if not names:
        raise InputError("--probe-estimators names no estimator")
    from .trl_trainer import check_per_row
    for name in names:
        check_per_row(name, f"--probe-estimators: '{name}'")
    return names


def check_engine_config(cfg: DistillConfig, world: int) -> dict:
    """All checks of a TRL run that read no model weights; returns the estimator's parameters.

    ``config.check_config`` plus: TRL's version, ``--trl-arg`` names, a teacher server, group
    estimators (TRL samples one completion per row, so K rollouts of a prompt are not kept
    together), and the batch split (prompts_per_step x rollouts_per_prompt over processes and
    accumulation steps).
    """
    check_trl()
    from .trl_trainer import check_per_row
    check_trl_args(cfg.trl_args)
    params = check_config(cfg, world)
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


# ----------------------------------------------------------------------------- the run

class _Processes:
    """The process group as ``rundir.on_main``/``claim_out_dir`` see an accelerator, before TRL's exists."""

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


def trl_config(cfg: DistillConfig, world: int):
    """TRL's ``DistillationConfig`` for this run: ``vopd distill``'s options (``OWN_ARGS``) plus
    ``--trl-arg``s; AdamW betas (0.9, 0.95), linear warm-up then a constant rate, one log per step,
    as the built-in loop. A value TRL refuses (``lr_scheduler_type=bogus``) or a ``report_to`` tracker that
    is not installed is an ``InputError`` naming the ``--trl-arg``; nothing is loaded."""
    from transformers.integrations import get_available_reporting_integrations
    from trl import DistillationConfig
    settings = {name: value(cfg, world) for name, (_, value) in OWN_SETTINGS.items()}
    settings.update(use_cpu=not torch.cuda.is_available(), save_strategy="steps" if cfg.save_every > 0 else "no",
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


def step_dataset(cfg: DistillConfig, prompts: Prompts):
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
    built-in loop (``rundir.choose_checkpoint``, on the main process); one without a manifest is loaded
    unverified if its rows file is there (written before manifests existed), else it is incomplete."""
    from .trl_trainer import ROWS_FILE
    rundir.on_main(procs, lambda: rundir.choose_checkpoint(out_dir, trainer_checkpoints(out_dir),
                                                           required=(ROWS_FILE,)))
    dirs = trainer_checkpoints(out_dir)
    if not dirs:
        return None, 0, []
    rows_file = dirs[-1] / ROWS_FILE
    rows = check_rows(read_json(rows_file, "the checkpoint's metrics rows", list), rows_file)
    return str(dirs[-1]), ckpt.step_of(dirs[-1]), rows


class Trl(runner.Engine):
    """The TRL engine, as ``runner.run`` calls it."""

    def check(self, cfg: DistillConfig) -> dict:
        """``check_engine_config`` for the launcher's process count (``WORLD_SIZE``)."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        params = check_engine_config(cfg, self.world)
        cfg.bf16 = bool(cfg.bf16) and torch.cuda.is_available()
        return params

    def processes(self, cfg: DistillConfig) -> "_Processes":
        """TRL's arguments (``trl_config``, which sets up the process group; nothing is loaded) and the group."""
        self.args = trl_config(cfg, self.world)
        procs = _Processes(self.args.distributed_state)
        if procs.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads or 1)
        return procs

    def newest_checkpoint(self, out_dir: Path):
        return (trainer_checkpoints(out_dir) or [None])[-1]

    def check_models(self, paths: tuple) -> None:
        self.info = loading.check_compatible_files(*paths)           # vocabularies, before any weight is read

    def train(self, p: Prepared) -> dict:
        latest, start, rows = resume_point(p.out_dir, p.procs) if p.resume else (None, 0, [])
        return _train(p, self.args, self.info, latest, start, rows)


def run(cfg: DistillConfig, resume: bool = False) -> dict:
    """``runner.run`` on TRL: every check before the run folder or a model, the folder locked, the same
    metrics files and ``summary.json``; returns the same result dict, plus the ``trainer``.

    Args:
      cfg: the config (``engine`` ignored; ``trl_args`` passed to TRL).
      resume: continue from the newest Trainer checkpoint in ``--out/checkpoints``.
    """
    return runner.run(Trl(), cfg, resume)


def _train(p: Prepared, args, info, latest: Optional[str], start: int, rows: list) -> dict:
    """Load the pair, build the trainer (``trl_trainer``), train, write the final model and ``summary.json``.

    Args:
      p: what ``runner.run`` checked.
      args: TRL's ``DistillationConfig`` (``trl_config``).
      info: the pair's vocabularies (``loading.check_compatible_files``).
      latest, start, rows: the Trainer checkpoint to resume from, its step and metrics rows (``resume_point``).
    """
    from . import trl_trainer as tt
    cfg, procs = p.cfg, p.procs
    args.max_completion_length = cfg.max_new_tokens
    with ckpt.quiet_hf_progress():
        pair = loading.load_pair(*p.paths)
    if cfg.bf16:
        pair.teacher.to(torch.bfloat16)
    params = runner.cap_params(p, info.vocab_size)
    tokenizer = pair.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if info.student_output_size > info.vocab_size and not args.use_vllm:   # never sample a padded output row
        args.generation_kwargs = {**(args.generation_kwargs or {}),
                                  "suppress_tokens": list(range(info.vocab_size, info.student_output_size))}
    dataset, records = step_dataset(cfg, p.prompts)
    rundir.start_out_dir(p.out_dir, dataclasses.asdict(p.asked), procs)
    metrics = Metrics(p.out_dir, [r for r in rows if r["step"] <= start], procs.is_main_process)
    recorder = tt.RunRecorder(cfg, p.prompts, metrics, start)
    stop = StopOnSignal()
    stopper = tt.StopOnRequest(stop)
    callbacks = [recorder, stopper, tt.SkipNonFinite()]
    if cfg.probe_every > 0:
        callbacks.append(tt.VarianceProbeCallback(probe_names(cfg), every=cfg.probe_every,
                                                  params={cfg.estimator: params}))
    trainer = tt.RegistryDistillationTrainer(
        model=pair.student, teacher_model=pair.teacher, args=args, train_dataset=dataset, processing_class=tokenizer,
        estimator=cfg.estimator, estimator_params=params, reduction=cfg.reduction, vocab_size=info.vocab_size,
        records=records, logits=cfg.logits, callbacks=callbacks)
    for callback in callbacks:
        callback.trainer = trainer
    recorder.run = runner.Run(cfg, trainer.accelerator, pair.student, trainer.teacher_model, tokenizer,
                              info.vocab_size, params, p.prompts)
    tt.quiet_console(trainer)
    procs.print(f"distill (trl {check_trl()}): {cfg.estimator} {params}, {procs.num_processes} process(es) on "
                f"{procs.device}, steps {start + 1}..{cfg.steps} -> {cfg.out_dir}")
    with stop, ckpt.disk_full_is_input_error(p.out_dir, "a Trainer checkpoint"):
        trainer.train(resume_from_checkpoint=latest)
    if stopper.stopped_at is not None and stopper.stopped_at < cfg.steps:
        metrics.write_csv()
        where = f"checkpoint {Path(args.output_dir) / f'checkpoint-{stopper.stopped_at}'}"
        message = interrupted_message(p.out_dir, stopper.stopped_at, cfg.steps, where, procs.num_processes,
                                      stop.signum)
        procs.print(message)
        raise Interrupted(message, stop.status)
    result = runner.finish(recorder.run, start, metrics, p.started, extra={"engine": f"trl {check_trl()}"})
    return {**result, "trainer": trainer}


def __getattr__(name):
    """``RegistryDistillationTrainer`` and ``VarianceProbeCallback`` (``trl_trainer.py``), imported on first
    access (TRL imported then)."""
    if name in ("RegistryDistillationTrainer", "VarianceProbeCallback"):
        from . import trl_trainer
        return getattr(trl_trainer, name)
    raise AttributeError(name)
