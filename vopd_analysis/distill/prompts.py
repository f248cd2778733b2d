"""What a ``vopd distill`` run trains on, for both engines: the model paths (the config's or the preset's,
``model_paths``), the response length (``default_max_new_tokens``), the check every prompt must pass
(``prompt_check``: the student's tokenizer and the models' context) and the prompts by step with the
held-out set (``Prompts``).
"""

from __future__ import annotations

import random
from typing import Optional

from ..errors import InputError
from ..lm import loading, tasks
from ..lm.presets import PRESETS
from .config import DistillConfig


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
