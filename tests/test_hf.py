"""vopd_analysis.lm.rollouts, scoring, statistics and smoke on tiny Qwen2 models saved to and loaded from disk."""

import pytest
import torch

from vopd_analysis import divergences as dv
from vopd_analysis.batch import TokenBatch
from vopd_analysis.errors import InputError
from vopd_analysis.estimators import surrogate_loss
from vopd_analysis.lm import loading, tasks
from vopd_analysis.lm import rollouts as ro
from vopd_analysis.lm import scoring as sc
from vopd_analysis.lm.smoke import SMOKE_CHARS, save_tiny_pair, tiny_qwen2
from vopd_analysis.lm.statistics import entropy_binned_score_variance

PROMPTS = ["12+3=", "7+8=", "100+1="]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair_paths(tmp_path_factory):
    """A student with 48 output rows and a teacher with 64, sharing a 42-token char tokenizer."""
    return save_tiny_pair(tmp_path_factory.mktemp("pair"), student_vocab=48, teacher_vocab=64)


@pytest.fixture(scope="module")
def pair(pair_paths):
    return loading.load_pair(*pair_paths)


@pytest.fixture(scope="module")
def rollouts(pair):
    return ro.generate_rollouts(pair.student, pair.tokenizer, PROMPTS, num_rollouts=4, max_new_tokens=8,
                                seed=0, vocab_size=pair.info.vocab_size)


# ----------------------------------------------------------------------------- loading and compatibility

def test_padded_vocabularies_are_accepted(pair):
    assert (pair.info.vocab_size, pair.info.student_output_size, pair.info.teacher_output_size) == (42, 48, 64)
    assert not any(p.requires_grad for p in pair.teacher.parameters())


def test_cross_family_pair_is_refused(pair_paths, tmp_path):
    other = tasks.build_tokenizer(SMOKE_CHARS[::-1])            # same tokens, different ids
    path = tmp_path / "other"
    tiny_qwen2(other).save_pretrained(path)
    other.save_pretrained(path)
    with pytest.raises(InputError, match=r"tokenizers differ.*Examples: '.': student id \d+, teacher id \d+"):
        loading.load_pair(pair_paths[0], str(path))


def test_model_smaller_than_tokenizer_is_refused(pair):
    small = tiny_qwen2(pair.tokenizer, vocab_size=30)
    with pytest.raises(InputError, match="30 output rows"):
        loading.check_compatible(small, pair.tokenizer, pair.teacher, pair.teacher_tokenizer)


def test_missing_path_is_a_clear_error(tmp_path, pair_paths):
    with pytest.raises(InputError, match="student model path does not exist"):
        loading.load_pair(str(tmp_path / "nope"), pair_paths[1])


# ----------------------------------------------------------------------------- rollouts

def test_rollout_layout(pair, rollouts):
    N = len(PROMPTS) * 4
    assert rollouts.input_ids.shape[0] == N
    assert rollouts.prompt_index.tolist() == [i // 4 for i in range(N)]
    resp = rollouts.response_mask.bool()
    assert not resp[:, :rollouts.prompt_width].any()
    assert resp.sum(1).min() >= 1
    assert (rollouts.attention_mask.bool() | ~resp).all()      # every response token is attended
    assert int(rollouts.input_ids[resp].max()) < pair.info.vocab_size   # padded rows are never sampled
    again = ro.generate_rollouts(pair.student, pair.tokenizer, PROMPTS, 4, 8, seed=0, vocab_size=42)
    assert torch.equal(again.input_ids, rollouts.input_ids)


def test_response_mask_stops_after_eos():
    generated = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask = ro.response_mask_from_generated(generated, [1])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_prompt_too_long_is_a_clear_error(pair):
    with pytest.raises(InputError, match=r"do not fit the context.*max_position_embeddings \(64\)"):
        ro.generate_rollouts(pair.student, pair.tokenizer, ["1+1=", "9" * 60], 1, 8)


def test_generation_distribution_is_the_scored_distribution(pair):
    """The logits generate() samples from equal score()'s student logits (same positions, same slice)."""
    from transformers import GenerationConfig

    ids, att = ro.encode_prompts(pair.student, pair.tokenizer, PROMPTS, 6)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=[1],
                           output_logits=True, return_dict_in_generate=True)
    out = pair.student.generate(input_ids=ids, attention_mask=att, generation_config=cfg,
                                logits_processor=[ro.RestrictVocab(42)])
    gen_logits = torch.stack(out.logits, 1)[..., :42]
    rollouts = ro.assemble(out.sequences, att, ids.shape[1], [1], 1)
    batch = sc.score(pair.student, pair.teacher, rollouts, ["opd"], vocab_size=42)
    m = batch.mask.bool()
    torch.testing.assert_close(batch.student_logits.detach()[m], gen_logits[:, :m.shape[1]][m], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- scoring

def slow_reference(model, rollouts, V):
    """Per row, strip the padding, run the model on prompt + response alone, full log_softmax over [:V]."""
    rows = []
    for ids, att, resp in zip(rollouts.input_ids, rollouts.attention_mask, rollouts.response_mask):
        keep = att.bool()
        seq, is_resp = ids[keep], resp[keep].bool()
        with torch.no_grad():
            logits = model(input_ids=seq[None]).logits[0, :, :V]
        pos = is_resp.nonzero().flatten()
        rows.append((logits[pos - 1], seq[pos]))
    return rows


def test_score_matches_slow_reference(pair, rollouts):
    V = pair.info.vocab_size
    batch = sc.score(pair.student, pair.teacher, rollouts, ["vopd"], vocab_size=V, chunk_tokens=5)
    student_ref = slow_reference(pair.student, rollouts, V)
    teacher_ref = slow_reference(pair.teacher, rollouts, V)
    for b, ((zs, tokens), (zt, _)) in enumerate(zip(student_ref, teacher_ref)):
        n = len(tokens)
        assert batch.mask[b, :n].all() and not batch.mask[b, n:].any()
        assert torch.equal(batch.tokens[b, :n], tokens)
        lp_t = torch.log_softmax(zt, -1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(batch.teacher_token_logprobs[b, :n], lp_t, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.student_logits.detach()[b, :n], zs, atol=1e-5, rtol=1e-5)
        kl_ref = (torch.softmax(zs, -1) * (torch.log_softmax(zs, -1) - torch.log_softmax(zt, -1))).sum(-1)
        kl = dv.reverse_kl(batch.student_logits.detach()[b, :n], batch.teacher_logits[b, :n])
        torch.testing.assert_close(kl, kl_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.teacher_logsumexp[b, :n], torch.logsumexp(zt, -1), atol=1e-5, rtol=1e-5)


def test_single_rollout_scoring_equals_batched_row(pair, rollouts):
    full = sc.score(pair.student, pair.teacher, rollouts, ["opd"], vocab_size=42)
    one = sc.score(pair.student, pair.teacher, rollouts.select([5]), ["opd"], vocab_size=42)
    n = int(one.mask.sum())
    torch.testing.assert_close(one.teacher_token_logprobs[0, :n], full.teacher_token_logprobs[5, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(surrogate_loss("opd", one, "sum"), surrogate_loss("opd", full, "none")[5],
                               atol=1e-5, rtol=1e-5)


def reference_batch(pair, rollouts, V=42):
    """A TokenBatch built from the slow reference with full teacher logits (no top-k fields)."""
    s, t = slow_reference(pair.student, rollouts, V), slow_reference(pair.teacher, rollouts, V)
    T = max(len(tok) for _, tok in s)
    B = len(s)
    zs, zt = torch.zeros(B, T, V), torch.zeros(B, T, V)
    tokens, mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for b, ((a, tok), (c, _)) in enumerate(zip(s, t)):
        n = len(tok)
        zs[b, :n], zt[b, :n], tokens[b, :n], mask[b, :n] = a, c, tok, 1
    lp_t = torch.log_softmax(zt, -1).gather(-1, tokens[..., None]).squeeze(-1)
    return TokenBatch(tokens=tokens, mask=mask, student_logits=zs, teacher_token_logprobs=lp_t, teacher_logits=zt)


@pytest.mark.parametrize("name", ["opd", "vopd", "vopd_topk", "full_kl", "topk_kl"])
def test_estimator_losses_match_full_logit_reference(pair, rollouts, name):
    """Each estimator on the scored batch (top-k fields only where top-k suffices) equals the
    same estimator on a batch with the full reference teacher logits."""
    batch = sc.score(pair.student, pair.teacher, rollouts, [name], vocab_size=42)
    ref = reference_batch(pair, rollouts)
    torch.testing.assert_close(surrogate_loss(name, batch, "none").detach(), surrogate_loss(name, ref, "none"),
                               atol=1e-5, rtol=1e-5)


def test_teacher_signals_kept_only_when_needed(pair, rollouts):
    sampled = sc.score(pair.student, pair.teacher, rollouts, ["opd"], vocab_size=42)
    assert sampled.teacher_logits is None and sampled.teacher_topk_ids is None and sampled.teacher_logsumexp is None
    with pytest.raises(InputError, match="full teacher logits"):
        surrogate_loss("vopd", sampled)
    topk = sc.score(pair.student, pair.teacher, rollouts, ["vopd_topk", "topk_kl"], vocab_size=42,
                    params={"topk_kl": {"k": 8}, "vopd_topk": {"k": 4}})
    assert topk.teacher_logits is None
    assert topk.teacher_topk_ids.shape[-1] == 8 and topk.student_topk_ids.shape[-1] == 8
    with pytest.raises(InputError, match="full teacher logits"):
        surrogate_loss("full_kl", topk)
    with pytest.raises(InputError, match="top-16"):
        surrogate_loss("topk_kl", topk, k=16)
    with pytest.raises(InputError, match="k=50 is larger than the vocabulary V=42"):
        sc.score(pair.student, pair.teacher, rollouts, ["topk_kl"], vocab_size=42, params={"topk_kl": {"k": 50}})
    full = sc.score(pair.student, pair.teacher, rollouts, ["full_kl"], vocab_size=42)
    assert full.teacher_logits.shape[-1] == 42 and full.teacher_topk_ids is None


def test_masked_tokens_and_gradients(pair, rollouts):
    batch = sc.score(pair.student, pair.teacher, rollouts, ["opd"], vocab_size=42)
    common = int(batch.tokens[batch.mask.bool()].mode().values)
    masked = sc.score(pair.student, pair.teacher, rollouts, ["opd"], vocab_size=42, mask_token_ids=[common])
    assert not masked.mask[masked.tokens == common].any()
    assert masked.mask.sum() == batch.mask.sum() - (batch.mask.bool() & (batch.tokens == common)).sum()
    pair.student.zero_grad(set_to_none=True)
    surrogate_loss("opd", masked).backward()
    assert all(p.grad is not None for p in pair.student.parameters())
    assert all(p.grad is None for p in pair.teacher.parameters())
    pair.student.zero_grad(set_to_none=True)


def test_padded_token_ids_are_refused(pair, rollouts):
    bad = ro.Rollouts(rollouts.input_ids.clone(), rollouts.attention_mask, rollouts.response_mask,
                      rollouts.prompt_index, rollouts.prompt_width)
    bad.input_ids[0, -1], bad.response_mask[0, -1] = 45, 1
    with pytest.raises(InputError, match="token id 45 outside the shared vocabulary"):
        sc.score(pair.student, pair.teacher, bad, ["opd"], vocab_size=42)


def test_vocab_width_mismatch_without_vocab_size(pair, rollouts):
    with pytest.raises(InputError, match="different widths"):
        sc.score(pair.student, pair.teacher, rollouts, ["opd"])


def test_entropy_binned_score_variance_sums_the_states_of_each_bin():
    """Chunking does not change the sums; each state lands in the bin of its teacher entropy; the sums are
    the per-state ``score_variance`` values."""
    from vopd_analysis import divergences as dv
    g = torch.Generator().manual_seed(0)
    z = torch.randn(11, 6, generator=g, dtype=torch.float64)
    t = torch.randn(11, 6, generator=g, dtype=torch.float64) * torch.linspace(0.1, 6, 11, dtype=torch.float64)[:, None]
    edges = (0.0, 0.5, 1.2, float("inf"))
    whole = entropy_binned_score_variance(z, t, edges)
    for a, b in zip(entropy_binned_score_variance(z, t, edges, chunk_tokens=3), whole):
        assert a == pytest.approx(b)
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(z, -1)
    entropy = -(lp.exp() * lp).sum(-1)
    opd = dv.score_variance(lq, lp, torch.zeros(11, dtype=torch.float64))
    for b in whole:
        rows = (entropy >= b["low"]) & (entropy < b["high"])
        assert b["states"] == int(rows.sum()) and b["opd"] == pytest.approx(float(opd[rows].sum()))
    assert sum(b["states"] for b in whole) == 11 and min(b["states"] for b in whole) > 0
