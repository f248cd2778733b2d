"""A tiny Llama GGUF file for tests (a helper, not a test module).

``write_tiny_llama_gguf(path)`` writes a randomly initialised 2-layer ``LlamaForCausalLM`` to ``path``
as a float32 GGUF file, the way llama.cpp's ``convert_hf_to_gguf.py`` would: ``<arch>.*``
hyperparameters, a GPT-2 style byte-level BPE tokenizer (the 256 byte characters, a few merges and
``<|endoftext|>``) and the tensors under llama.cpp's names. It returns the model it wrote, so a test
can compare what transformers reads back (``from_pretrained(folder, gguf_file=name)``) with it.

Why the q/k permutation: transformers' Llama rotates the two halves of each head
(``rotate_half``: dims i and i + d/2 form a rotary pair), llama.cpp rotates adjacent dims (2i, 2i + 1).
llama.cpp's converter therefore reorders the rows of ``q_proj`` and ``k_proj`` within each head
(``permute`` below) and transformers undoes it on load
(``LlamaTensorProcessor._reverse_permute_weights``). Writing the rows unpermuted would load a
different model; with the permutation the round trip is exact (float32, no quantisation).
"""

from __future__ import annotations

import numpy as np
import torch

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]
EOS = "<|endoftext|>"


def byte_level_vocab():
    """(tokens, merges): GPT-2's 256 byte characters, then one token per merge, then ``<|endoftext|>``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens = list(bytes_to_unicode().values()) + ["".join(m) for m in MERGES] + [EOS]
    return tokens, [f"{a} {b}" for a, b in MERGES]


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, the two halves interleaved (the inverse of
    transformers' ``_reverse_permute_weights``)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_llama_gguf(path, seed: int = 0, arch: str = "llama", tie: bool = True, layers: int = 2):
    """Write a random tiny Llama to ``path`` (a ``.gguf`` file) and return it (eval mode, float32).

    Args:
      path: the file to write.
      seed: the weights' seed.
      arch: ``general.architecture`` and the metadata prefix; another name (not one transformers reads
        from GGUF) writes a file transformers refuses.
      tie: tied input / output embeddings (no ``output.weight`` tensor) or not.
      layers: decoder layers.
    """
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = byte_level_vocab()
    eos = tokens.index(EOS)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
                         bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)

    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
    if not tie:
        names["lm_head"] = "output"
    for i in range(layers):
        for hf, ours in (("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
                         ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                         ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{ours}"
    state = model.state_dict()
    for hf, ours in names.items():
        weights = state[f"{hf}.weight"].detach().numpy().astype(np.float32)
        if ours.endswith("attn_q"):
            weights = permute(weights, heads)
        elif ours.endswith("attn_k"):
            weights = permute(weights, kv_heads)
        writer.add_tensor(f"{ours}.weight", np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
