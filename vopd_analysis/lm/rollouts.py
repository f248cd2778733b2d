"""Sampling rollouts from a Hugging Face causal LM: prompts in, ``Rollouts`` out.

    encode_prompts (left padding, context check) -> generate_rollouts (student samples) -> Rollouts

Vocabulary. Model output layers are often padded beyond the tokenizer (Qwen2.5-0.5B has
151936 rows, Qwen2.5-7B 152064, both tokenizers 151665 real tokens): ``RestrictVocab`` forbids
the padded ids, so samples come from softmax(z[:V]) over the shared real vocabulary V.

Layout. With a left-padded prompt of width P, column ``c`` of ``input_ids`` holds token c; the
response follows the prompt, right-padded after its first EOS (``response_mask_from_generated``).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

from ..errors import InputError


@dataclasses.dataclass
class Rollouts:
    """Sampled sequences, one row per rollout; rows [i*K, (i+1)*K) belong to prompt i.

    ``input_ids``/``attention_mask`` [N, L]: left-padded prompt (width ``prompt_width``)
    followed by the response, right-padded after EOS. ``response_mask`` [N, L] is 1 on the
    generated tokens up to and including the first EOS. ``prompt_index`` [N].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_index: torch.Tensor
    prompt_width: int

    @property
    def num_rollouts(self) -> int:
        """N, the number of rows."""
        return self.input_ids.shape[0]

    def select(self, rows) -> "Rollouts":
        """The rollouts in ``rows`` (a list, slice or index tensor), trailing all-padding columns
        dropped (never the prompt's); ``prompt_index`` keeps the original prompt numbers."""
        rows = torch.as_tensor(rows) if not isinstance(rows, slice) else rows
        ids, att, resp = self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows]
        used = att.bool().any(0).nonzero()
        end = int(used.max()) + 1 if used.numel() else ids.shape[1]
        end = max(end, self.prompt_width)
        return Rollouts(ids[:, :end], att[:, :end], resp[:, :end], self.prompt_index[rows], self.prompt_width)

    def responses(self, tokenizer) -> List[str]:
        """The N decoded responses, special tokens (EOS) dropped."""
        out = []
        for ids, m in zip(self.input_ids, self.response_mask):
            out.append(tokenizer.decode(ids[m.bool()], skip_special_tokens=True))
        return out


def response_mask_from_generated(generated: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """m_t = 1[no EOS among generated[:, :t]]: 1 on the generated tokens up to and including the
    first EOS, 0 after it.

    Args:
      generated: [N, T_gen] token ids after the prompt.
      eos_token_ids: the ids that end a response.

    Returns:
      [N, T_gen] long.
    """
    is_eos = torch.isin(generated, torch.as_tensor(list(eos_token_ids), device=generated.device))
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


def eos_ids(model, tokenizer) -> List[int]:
    """The ids that end a response: the model's generation config's EOS, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("neither the model's generation config nor the tokenizer defines an EOS token")
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class RestrictVocab:
    """Logits processor: forbid ids >= V (padded rows), so samples come from softmax(z[:V])."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids, scores):
        scores[:, self.vocab_size:] = -float("inf")
        return scores


def encode_prompts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int):
    """Tokenize prompts with left padding (the pad token defaults to EOS), checking they fit.

    A prompt fits if its length <= max_position_embeddings - max_new_tokens; one that does
    not, or that encodes to zero tokens, is an ``InputError``.

    Args:
      model: gives ``config.max_position_embeddings`` (if it has one).
      tokenizer: set to left padding.
      prompts: P strings.
      max_new_tokens: the response budget the context must leave.

    Returns:
      (input_ids, attention_mask), each [P, W] long, W the longest prompt.
    """
    if isinstance(prompts, str) or not prompts:
        raise InputError("prompts must be a non-empty list of strings")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        budget = context - max_new_tokens
        lengths = enc["attention_mask"].sum(1)
        too_long = (lengths > budget).nonzero().flatten().tolist()
        if too_long:
            i = too_long[0]
            raise InputError(
                f"{len(too_long)} prompt(s) do not fit the context: prompt {i} has {int(lengths[i])} tokens, "
                f"but max_position_embeddings ({context}) - max_new_tokens ({max_new_tokens}) = {budget}")
    if int(enc["attention_mask"].sum(1).min()) == 0:
        raise InputError("a prompt encodes to zero tokens")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: Sequence[str], num_rollouts: int, max_new_tokens: int,
                      temperature: float = 1.0, top_p: float = 1.0, seed: Optional[int] = None,
                      vocab_size: Optional[int] = None) -> Rollouts:
    """Sample ``num_rollouts`` responses per prompt from ``model``.

    Sampling is from softmax(z[:V] / temperature), nucleus-truncated at ``top_p``; only
    temperature = top_p = 1 is on-policy (the estimators assume samples from pi itself).

    Args:
      model: the sampling (student) model; restored to its training mode afterwards.
      tokenizer: its tokenizer.
      prompts: P prompt strings.
      num_rollouts: K responses per prompt.
      max_new_tokens: the most tokens per response (EOS included).
      temperature, top_p: the sampling distribution (1, 1: on-policy).
      seed: makes the draw reproducible without touching the global RNG state; None: the
        global RNG.
      vocab_size: V; ids >= V (padded output rows) are never sampled. None: no restriction.

    Returns:
      ``Rollouts`` of N = P K rows, rows [iK, (i+1)K) from prompt i.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if num_rollouts < 1 or max_new_tokens < 1:
        raise InputError(f"need num_rollouts >= 1 and max_new_tokens >= 1, got {num_rollouts}, {max_new_tokens}")
    device = next(model.parameters()).device
    ids, att = encode_prompts(model, tokenizer, prompts, max_new_tokens)
    ids, att = ids.repeat_interleave(num_rollouts, 0).to(device), att.repeat_interleave(num_rollouts, 0).to(device)
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                              max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=eos, repetition_penalty=1.0)
    processors = LogitsProcessorList([RestrictVocab(vocab_size)] if vocab_size else [])
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        sequences = model.generate(input_ids=ids, attention_mask=att, generation_config=config,
                                   logits_processor=processors)
    model.train(was_training)
    return assemble(sequences, att, ids.shape[1], eos, num_rollouts)


def assemble(sequences, prompt_attention, width, eos, num_rollouts) -> Rollouts:
    """Build ``Rollouts`` from generate's output: masks for the prompt and the response up to EOS."""
    response = response_mask_from_generated(sequences[:, width:], eos)
    pad_ids = torch.where(response.bool(), sequences[:, width:], torch.zeros_like(response))
    input_ids = torch.cat([sequences[:, :width], pad_ids], 1)
    attention = torch.cat([prompt_attention, response], 1)
    response_mask = torch.cat([torch.zeros_like(prompt_attention), response], 1)
    prompt_index = torch.arange(sequences.shape[0], device=sequences.device) // num_rollouts
    return Rollouts(input_ids, attention, response_mask, prompt_index, width)
