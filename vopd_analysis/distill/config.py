"""``vopd distill``'s configuration: ``DistillConfig`` (one field per command-line option), the checks of its
values that read no file (``check_config``, with a trial of the estimator's parameters, ``try_parameters``),
and how a saved ``config.json`` is read and compared on resume (``read_config``, ``changed_fields``,
``RESUMABLE``). Both engines (``loop.py``, ``trl_engine.py``) take this config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Optional

import torch

from .. import estimators as est
from .. import params as prm
from .. import records
from ..batch import TokenBatch
from ..errors import InputError
from ..lm import fused_score as fs
from ..lm.presets import PRESETS


def option(default=dataclasses.MISSING, help: str = "", **cli):
    """A ``DistillConfig`` field and its command-line option, declared together.

    ``command.build_parser`` makes one option per field from its metadata: ``help``; ``flag`` (default
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
    command-line option (``command.build_parser``), except ``estimator_params`` (``--param``, ``--k``)."""

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
    cache_dir: Optional[str] = option(None, "where presets keep what they build (default: each preset's own; "
                                            "the pretrained presets' dequantised models go to $VOPD_CACHE or "
                                            "~/.cache/vopd_analysis)")
    num_threads: Optional[int] = option(None, "torch threads per process on CPU (default 1)")
    engine: str = option("builtin", "the training loop: builtin (this module) or trl (TRL 1.16's DistillationTrainer "
                         "with the registry's loss, trl_engine.py; pip install 'vopd-analysis[trl]')",
                         choices=("builtin", "trl"))
    trl_args: dict = option({}, "TRL DistillationConfig fields, from --trl-arg NAME=VALUE", cli=False)
    logits: str = option("auto", "the loss's path: materialised [B, T, V] logits, fused (hidden states and lm_head "
                         "tiles, never [B, T, V]; opd, vopd, opd_bstar, full_kl, ...), or auto (fused when the "
                         "estimator has it and B x T x V >= 2^26)", choices=("auto", "materialised", "fused"))
    probe_every: int = option(0, "with --engine trl: every N steps, each --probe-estimators' gradient variance, SNR "
                              "and noise scale on the step's rollouts, logged as probe/... (0: off)")
    probe_estimators: str = option("opd,vopd,opd_bstar", "with --engine trl: the estimators the probe compares "
                                   "(comma-separated)")


DEFAULTS = dataclasses.asdict(DistillConfig())

# fields that may differ when a run is resumed
RESUMABLE = {"steps", "eval_every", "save_every", "keep_checkpoints", "out_dir", "num_threads", "num_eval",
             "cache_dir"}


def flag_of(name: str) -> str:
    """The command-line option of a ``DistillConfig`` field (``out_dir`` -> ``--out``)."""
    field = {f.name: f for f in dataclasses.fields(DistillConfig)}[name]
    return field.metadata.get("flag", "--" + name.replace("_", "-"))


def check_values(cfg: DistillConfig) -> None:
    """Refuse option values that cannot train, each in one line naming the option.

    Numbers: ``temperature`` and ``lr`` finite and > 0, ``top_p`` in (0, 1], ``weight_decay`` and
    ``grad_clip`` finite and >= 0. Integers: ``steps``, ``prompts_per_step``, ``rollouts_per_prompt``
    (and ``max_new_tokens``, ``num_threads`` when given) >= 1; ``num_eval``, ``eval_every``,
    ``save_every``, ``warmup_steps``, ``seed`` >= 0; ``keep_checkpoints`` any (<= 0 keeps all).

    Args:
      cfg: the config.
    """
    def number(name, low, strict, high=math.inf):
        v = getattr(cfg, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not (ok and (v > low if strict else v >= low) and v <= high):
            bound = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
            raise InputError(f"{flag_of(name)} must be a finite number {bound}, got {v!r}")

    def integer(name, low):
        v = getattr(cfg, name)
        if v is None and name in ("max_new_tokens", "num_threads"):
            return
        if not isinstance(v, int) or isinstance(v, bool) or (low is not None and v < low):
            raise InputError(f"{flag_of(name)} must be an integer" + (f" >= {low}" if low is not None else "")
                             + f", got {v!r}")

    for name in ("temperature", "lr"):
        number(name, 0, strict=True)
    number("top_p", 0, strict=True, high=1)
    for name in ("weight_decay", "grad_clip"):
        number(name, 0, strict=False)
    for name in ("steps", "prompts_per_step", "rollouts_per_prompt", "max_new_tokens", "num_threads"):
        integer(name, 1)
    for name in ("num_eval", "eval_every", "save_every", "warmup_steps", "seed", "probe_every"):
        integer(name, 0)
    integer("keep_checkpoints", None)


def check_config(cfg: DistillConfig, world: int) -> dict:
    """Validate the config (``check_values``, the estimator and its parameters, the preset, the
    process count) without touching any file; return the estimator's full parameter dict."""
    check_values(cfg)
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
    if cfg.prompts_per_step % world:
        raise InputError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of "
                         f"processes ({world}) so that every process gets the same share")
    if cfg.reduction not in ("sequence_mean", "token_mean"):
        raise InputError(f"reduction must be 'sequence_mean' or 'token_mean', got '{cfg.reduction}'")
    fs.choose(cfg.logits, cfg.estimator, 0, 0)   # an unknown path, or --logits fused without a fused form
    try_parameters(cfg.estimator, params, cfg.prompts_per_step // world * cfg.rollouts_per_prompt)
    return params


def try_parameters(estimator: str, params: dict, rows: int) -> None:
    """Run the estimator once on a random batch of a step's shape (``rows`` sequences, as each process
    holds, of 2 positions), so that a parameter outside its range (``rho=0``, ``rtg`` with ``gamma=-1``,
    ``gkd_jsd`` with ``beta=5``, a ``group_size`` that does not divide the batch) is refused now, by
    the estimator's own check (``estimators.py``), before ``--out`` exists, not at the first step.

    The vocabulary is the top-k size (at least 2); a ``k`` below 1 is left to ``params.cap_to_vocab``,
    whose message names the model's vocabulary.
    """
    k = params.get("k")
    if isinstance(k, int) and k < 1:
        return
    V = max(k if isinstance(k, int) else 0, 2)
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, rows, 2, V, generator=gen, dtype=torch.float64)
    tokens = torch.randint(V, (rows, 2), generator=gen)
    batch = TokenBatch(tokens=tokens, mask=torch.ones(rows, 2), student_logits=student,
                       teacher_token_logprobs=teacher.log_softmax(-1).gather(-1, tokens[..., None])[..., 0],
                       teacher_logits=teacher, teacher_logsumexp=teacher.logsumexp(-1))
    est.per_sequence(estimator, batch, **params)


def _effective_bf16(value) -> bool:
    """Whether a run asking for ``bf16=value`` gets bf16 here (only on GPU, as ``make_accelerator``)."""
    return bool(value) and torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true"


def _json_kind(annotation):
    """The JSON kind (``records.is_kind``) of a ``DistillConfig`` field annotation: ``Optional[int]`` ->
    ``(int, NoneType)``."""
    return tuple(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Union else annotation


def read_config(path: Path) -> dict:
    """A run's saved ``config.json``: a JSON object whose every field is a ``DistillConfig`` field of its
    type (a field missing, as in a config from an older version, takes its default); anything else is an
    ``InputError`` naming the file and the field."""
    kinds = {name: _json_kind(hint) for name, hint in typing.get_type_hints(DistillConfig).items()}
    return records.read_record(path, "the run's config", kinds, closed=True)


def changed_fields(before: dict, after: dict) -> list:
    """The fields outside ``RESUMABLE`` whose value in ``after`` differs from ``before`` (a field
    ``before`` lacks, saved by an older version: its default; ``bf16`` compared as the effective value on
    this machine: config.json records False for a CPU run that asked for bf16), sorted."""
    def same(key, value):
        if key == "bf16":
            return _effective_bf16(before.get(key)) == _effective_bf16(value)
        return before.get(key, DEFAULTS.get(key)) == value

    return sorted(k for k, v in after.items() if k not in RESUMABLE and not same(k, v))
