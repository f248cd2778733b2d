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

Run safety (``run``): the whole config (estimator parameters tried on a small batch,
``try_parameters``), the prompt files and the run folder's place (``check_out_dir``) are checked
before ``--out`` is created, so a refused invocation leaves nothing behind; the run folder is
locked (``run.lock``: pid, host, start; ``RunLock``) while its run lives, so a second run on it
is refused; Ctrl-C finishes the current step, checkpoints it and exits with status 130, SIGTERM
likewise with 143 (``StopOnSignal``); ``inputs.json`` records the config and the prompt files'
sha256 at every start, and a resume is refused when they changed (``check_inputs``); resume
verifies the newest checkpoint's manifest and falls back to the newest intact one
(``checkpoint.choose``); ``--resume`` on a finished run does nothing, and ``--steps`` below the
steps done is refused; a full disk while checkpointing is one line, and the run resumes exactly.

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
import math
import os
import random
import resource
import signal
import socket
import sys
import threading
import time
import typing
import warnings
from pathlib import Path
from typing import Optional

from ..errors import InputError, exit_with, quiet_interrupt_while_starting

if __name__ == "__main__":            # python -m: a Ctrl-C while torch imports is "interrupted", exit 130
    quiet_interrupt_while_starting()

import torch  # noqa: E402

from .. import estimators as est  # noqa: E402
from .. import params as prm  # noqa: E402
from .. import records  # noqa: E402
from ..batch import TokenBatch  # noqa: E402
from ..lm import fused_score as fs  # noqa: E402
from ..lm import loading, tasks  # noqa: E402
from ..lm import rollouts as ro
from ..lm.presets import PRESETS  # noqa: E402
from . import checkpoint as ckpt  # noqa: E402
from .evaluate import evaluate_shard, reverse_kl_sums  # noqa: E402

try:
    import fcntl
except ImportError:   # pragma: no cover - not on Windows: the lock falls back to the recorded pid
    fcntl = None


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


# ----------------------------------------------------------------------------- setup

def _flag(name: str) -> str:
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
            raise InputError(f"{_flag(name)} must be a finite number {bound}, got {v!r}")

    def integer(name, low):
        v = getattr(cfg, name)
        if v is None and name in ("max_new_tokens", "num_threads"):
            return
        if not isinstance(v, int) or isinstance(v, bool) or (low is not None and v < low):
            raise InputError(f"{_flag(name)} must be an integer" + (f" >= {low}" if low is not None else "")
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


class Prompts:
    """Training prompts by step (deterministic in (seed, step), so resuming needs no loader state)
    and the fixed held-out evaluation set (possibly empty: then no evaluation, with a note).

    Args:
      cfg: the config (``prompts``, ``eval_prompts``, ``num_eval``, ``preset``, ``seed``).
      check: when given, every prompt read from a file (and the preset's first step and eval
        set) must pass it: an ``InputError`` naming ``file:line`` otherwise.
    """

    def __init__(self, cfg: DistillConfig, check: Optional[tasks.PromptCheck] = None):
        self.cfg, self.notes = cfg, []
        self.records = tasks.read_jsonl(cfg.prompts, check) if cfg.prompts else None
        self.eval = tasks.read_jsonl(cfg.eval_prompts, check)[:cfg.num_eval] if cfg.eval_prompts else None
        if self.records is not None and self.eval is None:
            order = random.Random(0).sample(range(len(self.records)), len(self.records))
            n_eval = min(cfg.num_eval, len(self.records) // 10)
            self.eval = [self.records[i] for i in order[:n_eval]]
            self.records = [self.records[i] for i in order[n_eval:]]
            if n_eval == 0 < cfg.num_eval:
                self.notes.append(f"{cfg.prompts} has {len(self.records)} prompt(s), too few to hold out a tenth "
                                  "for evaluation: no evaluation (give --eval-prompts FILE)")
        if self.eval is None:
            self.eval = PRESETS[cfg.preset].eval_prompts(cfg.num_eval, seed=0)
            self._check_preset(self.eval, "held-out", check)
        if self.records is None:
            self._check_preset(self.train(1), "training", check)
        if cfg.num_eval == 0 and cfg.eval_every > 0:
            self.notes.append("--num-eval 0: no evaluation")

    def _check_preset(self, records: list, split: str, check) -> None:
        """Run ``check`` on the preset's generated prompts (a user's model may not know their characters)."""
        for i, r in enumerate(records if check is not None else []):
            check(r["prompt"], f"preset '{self.cfg.preset}' {split} prompt {i}")

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
            student, teacher = PRESETS[cfg.preset].sources(cfg.cache_dir, accelerator.is_main_process)
        return cfg.student or student, cfg.teacher or teacher
    return cfg.student, cfg.teacher


def default_max_new_tokens(cfg: DistillConfig) -> int:
    """The response length when ``--max-new-tokens`` is not given: the preset's when there is a
    preset (its model or its prompts are used), else 256."""
    return PRESETS[cfg.preset].max_new_tokens if cfg.preset is not None else 256


def model_context(path: str, role: str) -> Optional[int]:
    """The ``max_position_embeddings`` of the model at ``path`` (its config only is read), or None.

    Args:
      path: a model source (``loading.parse_source``: folder, GGUF file, package, hub id).
      role: "student" or "teacher", for error messages.
    Returns:
      The context length in tokens, None if the config has none.
    """
    return getattr(loading.load_config(path, role), "max_position_embeddings", None)


def prompt_check(cfg: DistillConfig, student: str, teacher: str, defaulted: bool = False) -> tasks.PromptCheck:
    """The check every prompt must pass (``tasks.PromptCheck``): the student's tokenizer, the smaller
    of the two models' contexts; refuses a ``max_new_tokens`` that leaves no room for any prompt.

    Args:
      cfg: the config, ``max_new_tokens`` resolved.
      student, teacher: the model paths (only tokenizer and configs are read).
      defaulted: ``max_new_tokens`` was not given (the error says so).
    Returns:
      The ``PromptCheck``.
    """
    tokenizer = loading.load_tokenizer(student, "student")
    contexts = [c for c in (model_context(student, "student"), model_context(teacher, "teacher")) if c is not None]
    context = min(contexts) if contexts else None
    if context is not None and cfg.max_new_tokens >= context:
        given = f"{cfg.max_new_tokens} (the default {'without a preset' if cfg.preset is None else 'of the preset'})" \
            if defaulted else str(cfg.max_new_tokens)
        raise InputError(f"--max-new-tokens {given} does not fit the model's context of {context} tokens "
                         "(max_position_embeddings) with room for a prompt; give --max-new-tokens below "
                         f"{context} minus the longest prompt's length")
    return tasks.PromptCheck(tokenizer, context, cfg.max_new_tokens)


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


def check_resumable(out_dir: Path, cfg: DistillConfig) -> None:
    """Refuse to continue the run in ``out_dir`` when its inputs changed since it started
    (``check_inputs``) or ``cfg`` differs from its saved config in a field outside ``RESUMABLE``."""
    check_inputs(out_dir)
    saved = read_config(out_dir / "config.json")
    changed = changed_fields(saved, dataclasses.asdict(cfg))
    if changed:
        raise InputError(f"cannot resume {out_dir}: its run used different " + ", ".join(
            f"{k} ({saved.get(k)!r} there, {getattr(cfg, k)!r} now)" for k in changed))


# ----------------------------------------------------------------------------- what a run started from

INPUTS = "inputs.json"
PROMPT_FILES = ("prompts", "eval_prompts")


def record_inputs(out_dir: Path, config: dict) -> None:
    """Write ``inputs.json``: the config as ``config.json`` gets it and the size and sha256 of each prompts
    file it names, so that ``check_inputs`` can tell a hand-edited config or a rewritten prompts file."""
    files = {name: {"path": config[name], **ckpt.file_digest(Path(config[name]))} for name in PROMPT_FILES
             if config.get(name) and Path(config[name]).is_file()}
    write_json_atomic(out_dir / INPUTS, {"config": config, "files": files})


def check_inputs(out_dir: Path) -> None:
    """Refuse to resume the run in ``out_dir`` when its ``config.json`` was edited since the run (last)
    started in a field a resume cannot change, or a prompts file it trains on no longer has the sha256
    recorded then (``inputs.json``, ``record_inputs``); a run from before ``inputs.json`` is not checked,
    a prompts file that is gone is left to the prompt reader.

    Args:
      out_dir: the run folder.
    """
    path = out_dir / INPUTS
    if not path.is_file():
        return
    record = records.read_record(path, "the run's record of its inputs", {"config": dict, "files": dict},
                                 required=("config", "files"))
    saved = read_config(out_dir / "config.json")
    edited = changed_fields(record["config"], saved)
    if edited:
        raise InputError(f"cannot resume {out_dir}: its config.json was edited after the run started (" + ", ".join(
            f"{k}: {record['config'].get(k)!r} then, {saved.get(k)!r} now" for k in edited)
            + "); a run's settings cannot change on resume: put the file back, or start a new run with another --out")
    records.check_fields(record["files"], f"{path}: files", dict.fromkeys(record["files"], dict))
    for name, entry in record["files"].items():
        want = records.check_fields(entry, f"{path}: files: {name}", {"path": str, "size": int, "sha256": str},
                                    required=("path", "size", "sha256"))
        file = Path(want["path"])
        got = ckpt.file_digest(file) if file.is_file() else None
        if got is not None and got != {"size": want["size"], "sha256": want["sha256"]}:
            raise InputError(f"cannot resume {out_dir}: {_flag(name)} {file} changed since the run started "
                             f"({got['size']:,} bytes, sha256 {got['sha256'][:16]}...; it had {want['size']:,} bytes, "
                             f"sha256 {want['sha256'][:16]}...), so the run would go on with other prompts: put the "
                             "file back, or start a new run with another --out")


# ----------------------------------------------------------------------------- the run folder's place

# what a run keeps in its folder: True for a folder, False for a file
RUN_ENTRIES = {"checkpoints": True, "final": True, "config.json": False, INPUTS: False, "metrics.jsonl": False,
               "metrics.csv": False, "summary.json": False, "curves.png": False}


def check_out_dir(out_dir) -> Path:
    """Refuse an ``--out`` that cannot become (or stay) a run folder, before anything is written: empty (an
    unset shell variable), a file, below a file, not writable (``records.check_output``); a ``vopd sweep``
    folder (its runs would be hidden from ``vopd compare``); a folder where the run keeps a file or the
    reverse (``checkpoints`` replaced by a file).

    Args:
      out_dir: the run folder as given (it may not exist yet).
    Returns:
      It as a ``Path``.
    """
    out = records.check_output(out_dir, "--out", folder=True)
    if (out / "sweep.json").exists():
        raise InputError(f"--out {out} is a vopd sweep folder (it holds sweep.json); give the run a folder of its "
                         f"own, e.g. --out {out / 'my-run'}")
    for name, folder in RUN_ENTRIES.items():
        entry = out / name
        if entry.exists() and entry.is_dir() != folder:
            kind, other = ("folder", "file") if folder else ("file", "folder")
            raise InputError(f"--out {out}: {entry} is a {other} where the run keeps its {name} {kind}; move it "
                             "away (nothing was changed)")
    return out


def finished_run(out_dir: Path, steps: int) -> Optional[dict]:
    """The ``summary.json`` of a finished run in ``out_dir`` that reached ``steps``, else None; a
    damaged one is warned about and counts as unfinished (``--resume`` writes it again from the newest
    checkpoint)."""
    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = records.read_record(path, "the run's summary", {"steps_done": int}, required=("steps_done",))
    except InputError as err:
        print(f"warning: {err}; the run counts as unfinished (--resume writes it again from the newest "
              "checkpoint)", file=sys.stderr, flush=True)
        return None
    return summary if summary["steps_done"] >= steps else None


def check_steps_left(out_dir: Path, steps: int, newest: Optional[Path]) -> None:
    """Refuse ``--steps`` below the step of the run's newest checkpoint ``newest``: nothing would be
    trained, and config.json would record fewer steps than were done."""
    done = ckpt.step_of(newest) if newest is not None else 0
    if steps < done:
        raise InputError(f"--steps {steps} is below the {done} steps the run in {out_dir} has done (checkpoint "
                         f"{newest.name}); give --steps {done} or more to continue it (nothing was changed)")


def on_main(accelerator, fn):
    """Run ``fn()`` on the main process only and share its failure: if it raises ``InputError``
    every process raises (the main one its error), so no process waits forever for the others.

    Args:
      accelerator: the run's ``Accelerator``.
      fn: a callable taking no arguments.
    Returns:
      ``fn()``'s value on the main process, None on the others.
    """
    error, value = None, None
    if accelerator.is_main_process:
        try:
            value = fn()
        except InputError as err:
            error = err
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
        if float(failed) and error is None:
            raise InputError("the main process refused the run (its error says why)")
    if error is not None:
        raise error
    return value


# ----------------------------------------------------------------------------- the run folder

LOCK = "run.lock"


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


class RunLock:
    """The run folder's lock, held while its run lives: ``<out>/run.lock`` holds the holder's pid,
    host, start time and command line, under an exclusive ``fcntl.flock`` that the kernel drops when
    the process dies.

    A lock file left by a process that is gone (killed) is stale: taken over with a warning. A
    lock held by a live process is an ``InputError`` naming the folder and the pid; so is one
    recorded by another host (its pid cannot be checked from here).

    Args:
      out_dir: the folder locked.
      name: the lock file's name in it (``vopd sweep`` locks its folder with ``sweep.lock``).
      holder: what holds it, in messages ("vopd distill run").
    """

    def __init__(self, out_dir: Path, name: str = LOCK, holder: str = "vopd distill run"):
        self.out_dir, self.path, self.fd, self.holder = Path(out_dir), Path(out_dir) / name, None, holder

    def acquire(self) -> Optional[str]:
        """Take the lock.

        Returns:
          A warning line when a stale lock was taken over, else None.
        """
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flocked = self._flock(fd)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise InputError(self._busy(holder)) from None
            if not self._same_file(fd):     # removed or replaced while we waited: take the new one
                os.close(fd)
                continue
            try:
                stale = self._previous(self._holder(fd), flocked)
            except InputError:
                os.close(fd)
                raise
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self.fd = fd
            return stale
        raise InputError(f"could not lock {self.out_dir}: {self.path} keeps changing")

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock; a no-op if not held."""
        if self.fd is None:
            return
        if self._same_file(self.fd):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    @staticmethod
    def _flock(fd) -> bool:
        """``flock`` the file, non-blocking: True if locked, False where unsupported; raises
        ``BlockingIOError`` if another process holds it."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise
        except OSError:   # a filesystem without flock: the recorded pid decides
            return False
        return True

    def _same_file(self, fd) -> bool:
        """Whether ``fd`` is still the file at ``self.path`` (not removed or replaced by another process)."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(fd) -> Optional[dict]:
        """The record in the lock file ({"pid", "host", ...}), None if empty or unreadable."""
        try:
            holder = json.loads(os.pread(fd, 65536, 0).decode() or "null")
        except (ValueError, UnicodeDecodeError):
            return None
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    def _busy(self, holder: Optional[dict]) -> str:
        """The one-line refusal naming the folder and the holder's pid and host."""
        who = (f"pid {holder['pid']} on {holder.get('host')}, started {holder.get('started')}" if holder
               else "a process that has not written its pid yet")
        return (f"{self.out_dir} is in use by another {self.holder} ({who}); wait for it to end or stop it, "
                "or choose another --out")

    def _previous(self, holder: Optional[dict], flocked: bool) -> Optional[str]:
        """Judge a lock file left behind: None if there is none, a warning if it is stale, else ``InputError``."""
        if holder is None:
            return None
        host, pid = holder.get("host"), holder["pid"]
        if host != socket.gethostname():
            raise InputError(f"{self.out_dir} is locked by pid {pid} on host {host} ({self.path}); if no run is "
                             "going there, delete that file")
        if not flocked and _pid_alive(pid):
            raise InputError(self._busy(holder))
        state = "is no longer running" if not _pid_alive(pid) else "is running but does not hold the lock"
        return f"stale lock {self.path} taken over: pid {pid} ({holder.get('started')}) {state}"


@dataclasses.dataclass
class Claim:
    """This invocation's hold on the run folder (``claim_out_dir``): the lock (main process only)
    and the folders it created (the run folder and missing parents, innermost first)."""

    out_dir: Path
    lock: Optional[RunLock] = None
    created: list = dataclasses.field(default_factory=list)

    def release(self, started: bool) -> None:
        """Drop the lock; folders this invocation created are removed again if the run never
        started (they are empty then, e.g. after a refused model), so a retry is not blocked."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        for folder in self.created if not started else []:
            try:
                folder.rmdir()
            except OSError:
                break


def claim_out_dir(out_dir: Path, accelerator) -> Claim:
    """Create the run folder if needed and lock it (``RunLock``) on the main process; every process
    raises if that fails.

    Args:
      out_dir: the run folder.
      accelerator: the run's ``Accelerator``.
    Returns:
      The ``Claim`` (its lock None off the main process).
    """
    claim = Claim(out_dir)

    def take():
        claim.created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"cannot create --out {out_dir}: {err.strerror}") from None
        lock = RunLock(out_dir)
        try:
            stale = lock.acquire()
        except (InputError, OSError) as err:
            claim.release(started=False)
            raise err if isinstance(err, InputError) else InputError(f"cannot lock {out_dir}: {err}") from None
        claim.lock = lock
        if stale:
            print(f"warning: {stale}", file=sys.stderr, flush=True)

    on_main(accelerator, take)
    return claim


def choose_checkpoint(out_dir: Path, dirs: Optional[list] = None, required=()) -> Optional[Path]:
    """The checkpoint to resume from (``checkpoint.choose``), with a warning per damaged newer one
    (set aside as ``.corrupt``, naming each bad file with its expected and actual size or hash) and
    for an unverified one (no manifest: written before manifests existed). Main process only.

    Args:
      out_dir: the run folder.
      dirs, required: as ``checkpoint.choose`` (the TRL engine's Trainer checkpoints and their rows file).
    Returns:
      The checkpoint folder, or None if the run has none.
    """
    choice = ckpt.choose(out_dir, dirs, required)
    for path, problems in choice.bad:
        moved = ckpt.set_aside(path)
        print(f"warning: checkpoint {path} is damaged ({'; '.join(problems)}); set aside as {moved.name}, "
              f"resuming from {choice.path.name}", file=sys.stderr, flush=True)
    if choice.path is not None and not choice.verified:
        print(f"warning: checkpoint {choice.path} has no {ckpt.MANIFEST} (written by an older version): "
              "loading it unverified", file=sys.stderr, flush=True)
    return choice.path


def prepare_out_dir(out_dir: Path, cfg: DistillConfig, resume: bool, accelerator) -> Optional[Path]:
    """Refuse to overwrite a run; with ``resume``, check the config and return the checkpoint to
    resume from (``choose_checkpoint``). Writes nothing but the renames of damaged checkpoints;
    call it holding the folder's lock (``claim_out_dir``).

    Args:
      out_dir: the run folder.
      cfg: the config as asked (``max_new_tokens`` unresolved, as config.json holds it).
      resume: whether ``--resume`` was given.
      accelerator: the run's ``Accelerator``.
    Returns:
      The checkpoint folder, or None (a new run, or one without checkpoints: it starts over).
    """
    has_run = (out_dir / "config.json").exists() or (out_dir / "metrics.jsonl").exists()
    if has_run and not resume:
        raise InputError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    if not has_run:
        return None
    check_resumable(out_dir, cfg)
    on_main(accelerator, lambda: choose_checkpoint(out_dir))
    return ckpt.latest(out_dir)   # after the main process set damaged ones aside: the same on every process


def start_out_dir(out_dir: Path, record: dict, accelerator) -> None:
    """Mark the run as started: ``inputs.json`` (``record_inputs``) and ``config.json`` written (atomically)
    and a previous ``summary.json`` removed (a continued run is unfinished until it ends). Main process,
    after every process checked."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (out_dir / "summary.json").unlink(missing_ok=True)
        record_inputs(out_dir, record)
        write_json_atomic(out_dir / "config.json", record)


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


def setup(cfg: DistillConfig, asked: DistillConfig, acc, params: dict, paths: tuple, prompts: Prompts,
          latest: Optional[Path]):
    """Load the models, build optimizer and scheduler, restore checkpoint ``latest`` if resuming, then
    mark the run started (``start_out_dir``: config.json).

    Args:
      cfg: the resolved config (``max_new_tokens`` set, ``bf16`` the effective value).
      asked: the config as asked, written to config.json.
      acc: the ``Accelerator``.
      params: the estimator's parameters (``check_config``).
      paths: (student, teacher) from ``model_paths``.
      prompts: the checked ``Prompts``.
      latest: the checkpoint to resume from, or None.
    Returns:
      (``Run``, the step it starts after, ``Metrics``).
    """
    pair = load_models(latest, paths, acc.device)
    if cfg.bf16:
        pair.teacher.to(torch.bfloat16)
    params, capped = prm.cap_to_vocab(cfg.estimator, params, cfg.estimator_params, pair.info.vocab_size)
    for c in capped:
        acc.print(f"note: {c['param']}={c['used']} (registry default {c['default']} capped at the vocabulary size)")
    pair.student.train()
    decay = [p for p in pair.student.parameters() if p.dim() >= 2]
    no_decay = [p for p in pair.student.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    run = Run(cfg, acc, pair.student, pair.teacher, pair.tokenizer, pair.info.vocab_size, params, prompts,
              optimizer, scheduler, TeacherTimer(pair.teacher))
    start, rows = 0, []
    if latest:
        state = ckpt.load_state(acc, latest, optimizer, scheduler)
        start, rows = state["step"], state["rows"]
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    start_out_dir(out_dir, dataclasses.asdict(asked), acc)
    return run, start, Metrics(out_dir, rows, acc.is_main_process)


def eval_postfix(row: dict) -> dict:
    """The progress bar's view of an eval row (accuracy only where the task is graded, n/a for a missing value)."""
    def cell(key):
        return "n/a" if row.get(key) is None else f"{row[key]:.3f}"

    out = {} if row["eval_accuracy"] is None else {"acc": cell("eval_accuracy")}
    return {**out, "kl": cell("eval_reverse_kl"), "teacher_lp": cell("eval_teacher_logprob")}


# ----------------------------------------------------------------------------- Ctrl-C

class Interrupted(KeyboardInterrupt):
    """Raised by ``run`` after a Ctrl-C or a SIGTERM, once the last completed step is checkpointed and
    the console told how to resume; ``status`` is the exit status (``main``): 130 after SIGINT, 143
    after SIGTERM (128 + the signal's number)."""

    def __init__(self, message: str = "", status: int = 128 + signal.SIGINT):
        super().__init__(message)
        self.status = status


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop) as a request to stop between steps, for the
    ``with`` block.

    The first signal sets ``requested`` and ``signum`` (the loop finishes its step, checkpoints and
    stops) and calls ``forward(signum)`` if given (``vopd sweep`` passes it to its workers); one more
    than ``grace`` seconds later raises ``KeyboardInterrupt`` at once (one within ``grace`` is the same
    Ctrl-C forwarded by a launcher such as torchrun). Installed only in the main thread; elsewhere
    the signals keep their default behaviour.

    Args:
      grace: seconds within which a second signal counts as the first one, forwarded.
      message: what the first signal prints, after "interrupt: " (or "SIGTERM: ").
      forward: called with the signal's number on the first signal.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace: float = 2.0, message: str = "finishing the current step, then saving a checkpoint",
                 forward=None):
        self.grace, self.message, self.forward = grace, message, forward
        self.requested_at, self.signum, self._previous = None, None, {}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    @property
    def status(self) -> int:
        """The exit status a stop by this signal gets: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        """The handler: note the first request, raise on a later one past ``grace``."""
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at, self.signum = now, signum
            what = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{what}: {self.message} (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            if self.forward is not None:
                self.forward(signum)
        elif now - self.requested_at > self.grace:
            raise KeyboardInterrupt


def stop_agreed(acc, stop: StopOnSignal) -> bool:
    """Whether any process was asked to stop (one all-reduce with several processes, so that all
    stop after the same step)."""
    flag = float(stop.requested)
    if acc.num_processes > 1:
        flag = float(acc.reduce(torch.tensor(flag, device=acc.device), "sum"))
    return flag > 0


def stop_at(run_, done: int, saved: int, metrics: Metrics, stop: StopOnSignal) -> None:
    """Checkpoint step ``done`` (unless ``saved``, the newest checkpoint, is that step), print one
    line saying where and how to resume, and raise ``Interrupted``.

    Args:
      run_: the ``Run``.
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


def interrupted_message(out: Path, done: int, steps: int, where: str, num_processes: int,
                        signum: Optional[int] = None) -> str:
    """The one line a Ctrl-C (or another ``signum``, named) leaves: the step reached, ``where`` it was
    saved, how to resume."""
    how = f"vopd distill --out {out} --resume" + (
        f" (launched the same way, {num_processes} processes)" if num_processes > 1 else "")
    by = "" if signum in (None, signal.SIGINT) else f" by {signal.Signals(signum).name}"
    return f"interrupted{by} after step {done} of {steps}: {where}; continue with: {how}"


def abandoned(out_dir: Path) -> str:
    """What an immediate interrupt (a second Ctrl-C, or one during setup) left, and how to go on."""
    if not (out_dir / "config.json").is_file():
        return "the run had not started; nothing was written"
    latest = ckpt.latest(out_dir)
    return (f"stopped at once, nothing saved after {'checkpoint ' + latest.name if latest else 'the start'}; "
            f"continue with: vopd distill --out {out_dir} --resume")


# ----------------------------------------------------------------------------- running

def already_finished(out_dir: Path, summary: dict, acc) -> dict:
    """Say that the run in ``out_dir`` is finished and return ``run``'s result from its files, touching nothing."""
    acc.print(f"{out_dir} is finished: {summary['steps_done']} steps (its summary.json); nothing to do, nothing "
              f"changed (--steps above {summary['steps_done']} continues it)")
    path = out_dir / "metrics.jsonl"
    rows = records.read_rows(path) if path.is_file() else []
    evals = [r for r in rows if r.get("kind") == "eval"]
    return {"out_dir": str(out_dir), "rows": rows, "first_eval": evals[0] if evals else None,
            "last_eval": evals[-1] if evals else None, "summary": summary if acc.is_main_process else None}


def train(run_: Run, start: int, metrics: Metrics, started: float) -> dict:
    """Steps ``start + 1 .. steps`` with evaluation and checkpoints, then the final model and the
    summary; a Ctrl-C stops after the current step (``stop_at``).

    Args:
      run_: the ``Run`` from ``setup``.
      start: the step it starts after (the resumed checkpoint's, or 0).
      metrics: the ``Metrics``.
      started: ``time.perf_counter()`` when the invocation began.
    Returns:
      ``run``'s result dict.
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
    evals = [r for r in metrics.rows if r["kind"] == "eval"]
    acc.wait_for_everyone()
    return {"out_dir": cfg.out_dir, "rows": metrics.rows, "first_eval": evals[0] if evals else None,
            "last_eval": evals[-1] if evals else None, "summary": summary}


def run(cfg: DistillConfig, resume: bool = False) -> dict:
    """Check everything, lock the run folder, train; returns {"out_dir", "rows", "first_eval",
    "last_eval", "summary"} (summary: None off the main process).

    Everything that can be refused is refused before ``--out`` is created (config values, the
    ``--out`` path, the models' tokenizer and context, every prompt); a folder this call created
    is removed again if the run fails before it starts. ``--resume`` on a finished run returns at
    once. ``cfg`` is resolved in place (``max_new_tokens``; ``bf16`` to the effective value).

    Args:
      cfg: the config.
      resume: continue the run in ``cfg.out_dir``.
    Returns:
      The result dict; ``Interrupted`` is raised after a Ctrl-C.
    """
    if cfg.engine == "trl":
        from . import trl_engine
        return trl_engine.run(cfg, resume)
    if cfg.engine != "builtin":
        raise InputError(f"--engine must be builtin or trl, got '{cfg.engine}'")
    if cfg.trl_args:
        raise InputError("--trl-arg needs --engine trl")
    if cfg.probe_every:
        raise InputError("--probe-every needs --engine trl (for a probe outside training: studies.llm_variance)")
    started = time.perf_counter()
    acc = make_accelerator(cfg)
    if acc.device.type == "cpu":
        torch.set_num_threads(cfg.num_threads or 1)
    cfg.bf16 = bool(cfg.bf16) and acc.device.type == "cuda"   # what the run gets; config.json records it
    asked = dataclasses.replace(cfg)                          # as asked: max_new_tokens unresolved
    params = check_config(cfg, acc.num_processes)
    out_dir = check_out_dir(cfg.out_dir)
    if resume and (out_dir / "config.json").is_file():
        check_resumable(out_dir, asked)
        summary = finished_run(out_dir, cfg.steps)
        if summary is not None:
            return already_finished(out_dir, summary, acc)
        check_steps_left(out_dir, cfg.steps, ckpt.latest(out_dir))
    paths = model_paths(cfg, acc)
    defaulted = cfg.max_new_tokens is None
    if defaulted:
        cfg.max_new_tokens = default_max_new_tokens(cfg)
    prompts = Prompts(cfg, prompt_check(cfg, *paths, defaulted=defaulted))
    for note in prompts.notes if acc.is_main_process else []:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    claim, begun = claim_out_dir(out_dir, acc), False
    try:
        latest = prepare_out_dir(out_dir, asked, resume, acc)
        run_, start, metrics = setup(cfg, asked, acc, params, paths, prompts, latest)
        begun = True
        return train(run_, start, metrics, started)
    finally:
        claim.release(started=begun)


# ----------------------------------------------------------------------------- command line

EPILOG = """\
what the numbers mean (metrics.jsonl, one train row per step, eval rows every --eval-every):
  loss                the estimator's surrogate loss: its gradient is the estimator, its value is
                      not a divergence. For most estimators it is the batch mean of
                      sum_t [A_t + sg(R_t - c b(s_t)) log pi(y_t|s_t)] (estimators.py), and
                      log pi < 0, so it is often negative and need not approach 0 as the
                      student improves: watch the reverse KL columns, not the loss.
  reverse_kl_sampled  sum_t [log pi(y_t|s_t) - log pi_T(y_t|s_t)] over each training rollout,
                      averaged: the sampled (single-sample) sequence reverse KL, nats per
                      sequence; unbiased but noisy, and can be negative on a batch.
  reverse_kl          sum_t KL(pi(.|s_t) || pi_T(.|s_t)) over the same rollouts, exact over the
                      vocabulary at every sampled prefix, nats per sequence; NaN when the
                      estimator keeps only sampled or top-k teacher log-probs (opd, vopd_topk).
  eval_accuracy, eval_reverse_kl, eval_teacher_logprob
                      held-out: greedy accuracy (null without a verifier), the exact reverse KL
                      (nats per sequence) and the teacher's log-prob of student samples (nats
                      per token); the closing table shows the first and last.

the run folder (--out): config.json, metrics.jsonl/.csv, checkpoints/ (each with a manifest of
sizes and sha256, verified on --resume), final/, summary.json and curves.png when finished.
It is locked (run.lock) while its run lives: a second run on it is refused. Ctrl-C finishes
the current step, checkpoints it and exits with status 130 (SIGTERM: the same, status 143);
--resume continues it exactly, and is refused if config.json or a prompts file changed since the
run started (inputs.json holds their record).
"""


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
                                            "(vopd_analysis/distill/loop.py).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--trl-arg", action="append", metavar="NAME=VALUE", dest="trl_arg",
                   help="with --engine trl: a trl.DistillationConfig field, value read as JSON (repeatable), e.g. "
                        "gradient_accumulation_steps=4, use_vllm=true, report_to=trackio")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact checkpoint (a finished "
                                                       "run is left as it is)")
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
    trl_args = prm.parse_assignments(given.pop("trl_arg", []), "--trl-arg")
    if "prompts" in given and "preset" not in given:
        given["preset"] = None
    base = {}
    out = str(given.get("out_dir", DistillConfig.out_dir))
    saved = Path(out) / "config.json"
    if resume and out.strip() and saved.is_file():          # an empty --out is refused by check_out_dir
        base = read_config(saved)
    if params or "estimator_params" not in base:
        given["estimator_params"] = params
    if trl_args or "trl_args" not in base:
        given["trl_args"] = trl_args
    return DistillConfig(**{**base, **given})


def main(argv=None) -> int:
    """``vopd distill``: 0 when the run finished (or already had), 130 after a Ctrl-C and 143 after a
    SIGTERM (with one line saying how to resume, no traceback); bad input raises ``InputError`` (the
    entry points print it)."""
    args = build_parser().parse_args(argv)
    return run_command(config_from_args(args), resume=getattr(args, "resume", False))


def run_command(cfg: DistillConfig, resume: bool) -> int:
    """``run`` as a command (``vopd distill``, a ``vopd sweep`` worker): its exit status, 0 when the run
    finished; after a stop by a signal, ``Interrupted``'s status (130 or 143), and 130 with one line
    saying what was left when it came before the first step or twice."""
    try:
        result = run(cfg, resume=resume)
    except Interrupted as err:
        return err.status
    except KeyboardInterrupt:
        print(f"interrupted: {abandoned(Path(cfg.out_dir))}", file=sys.stderr, flush=True)
        return 130
    finally:
        end_process_group()
    return 0 if result else 1


def end_process_group(settle_s: float = 1.0) -> None:
    """Tear down the default process group, if a launcher started one, before the interpreter exits.

    A gloo worker thread frees each finished collective after the caller has already returned from
    waiting on it, and freeing one that holds Python tensors needs the GIL. If the interpreter is
    shutting down by then, the thread is killed inside a C++ destructor and the process aborts
    ("terminate called without an active exception", SIGABRT after a finished run); if the main
    thread is destroying the group, it joins that thread while holding the GIL and hangs. Sleeping
    ``settle_s`` releases the GIL so the workers finish and go idle; then the group is destroyed
    (local, no collective, so safe on error paths too)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        time.sleep(settle_s)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    exit_with(main)
