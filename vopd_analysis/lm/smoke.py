"""Random smoke-preset Qwen2 models: tests, the CPU demo (``studies/llm_variance.py --random-init``)
and benchmarks build them in seconds, with no weights downloaded.

Built by ``vopd_analysis.lm.tiny`` (``random_model``, ``save_random_pair``); what is here is only the
smoke preset: grouped-query attention (4 heads, 2 key/value heads), an MLP twice the hidden width,
untied output layer, char tokenizer (``SMOKE_CHARS``).
"""

from __future__ import annotations

from typing import Optional

from .tiny import ModelSize, random_model, save_random_pair

SMOKE_CHARS = "0123456789+= abcdefghijklmnopqrstuvwxyz"   # the smoke tokenizer: 3 specials + 39 chars = 42 ids


def smoke_preset(hidden_size: int, num_layers: int, max_position_embeddings: int) -> tuple:
    """(ModelSize, qwen2_config arguments) of the smoke preset."""
    size = ModelSize(hidden=hidden_size, layers=num_layers, heads=4, intermediate=2 * hidden_size)
    return size, {"max_positions": max_position_embeddings, "kv_heads": 2, "tie_word_embeddings": False}


def tiny_qwen2(tokenizer, seed: int = 0, vocab_size: Optional[int] = None, hidden_size: int = 32,
               num_layers: int = 2, max_position_embeddings: int = 64):
    """A randomly initialised smoke-preset ``Qwen2ForCausalLM`` of a few thousand parameters (``tiny.random_model``).

    Args:
      tokenizer: gives the vocabulary and the pad/EOS ids (e.g. ``tasks.build_tokenizer(SMOKE_CHARS)``);
        None: no pad/EOS id, ``vocab_size`` required.
      seed: the initialisation seed.
      vocab_size: output rows, if not ``len(tokenizer)``.
      hidden_size, num_layers, max_position_embeddings: the model's size.

    Returns:
      The model, float32, in eval mode.
    """
    size, config = smoke_preset(hidden_size, num_layers, max_position_embeddings)
    return random_model(size, tokenizer, seed, **{**config, "vocab_size": vocab_size})


def save_tiny_pair(directory, student_vocab: int = 0, teacher_vocab: int = 0, seed: int = 0, hidden_size: int = 32,
                   num_layers: int = 2, max_position_embeddings: int = 64):
    """Save a random smoke-preset student/teacher pair with the ``SMOKE_CHARS`` tokenizer (``tiny.save_random_pair``).

    Args:
      directory: written to: ``student/`` and ``teacher/``.
      student_vocab, teacher_vocab: output rows; 0: the tokenizer's 42 (pass larger ones to test padded rows).
      seed: the student's seed; the teacher's is ``seed + 1``.
      hidden_size, num_layers, max_position_embeddings: both models' size.

    Returns:
      (student_path, teacher_path).
    """
    size, config = smoke_preset(hidden_size, num_layers, max_position_embeddings)
    return save_random_pair(directory, seed, size, size, SMOKE_CHARS, student_vocab or None, teacher_vocab or None,
                            **config)
