"""The fused scorer (vopd_analysis/lm/fused_score.py) against sc.score + the registry on real (tiny) models."""

import pytest
import torch

from vopd_analysis import estimators as est
from vopd_analysis.errors import InputError
from vopd_analysis.lm import fused_score as fs
from vopd_analysis.lm import loading, tasks, tiny
from vopd_analysis.lm import rollouts as ro
from vopd_analysis.lm import scoring as sc
from vopd_analysis.lm.smoke import save_tiny_pair


@pytest.fixture(scope="module")
def pair64(one_thread):
    student, teacher, _ = tiny.load_or_train_pair(verbose=False)
    return loading.load_pair(student, teacher, dtype=torch.float64)


def cut(rollouts, lengths, pad_id):
    """The rollouts with response b cut to lengths[b] (right padding after it)."""
    W = rollouts.prompt_width
    for row, length in enumerate(lengths):
        rollouts.response_mask[row, W + length:] = 0
        rollouts.attention_mask[row, W + length:] = 0
        rollouts.input_ids[row, W + length:] = pad_id
    return rollouts


@pytest.fixture(scope="module")
def rollouts(pair64):
    prompts = [r["prompt"] for r in tasks.train_prompts(3, seed=11)]
    out = ro.generate_rollouts(pair64.student, pair64.tokenizer, prompts, 2, 8, seed=5, vocab_size=16)
    return cut(out, (8, 3, 8, 5, 1, 6), pair64.tokenizer.pad_token_id)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_hidden_states_times_head_are_the_models_logits(pair64, rollouts):
    cols, _ = sc.response_index(rollouts.response_mask)
    first = int(cols.min()) - 1
    for model in (pair64.student, pair64.teacher):
        head = fs.output_head(model)
        assert head.scale == 1.0 and head.softcap is None
        h = fs.response_hidden(model, rollouts.input_ids, rollouts.attention_mask, cols, first)
        want = sc.response_logits(model, rollouts.input_ids, rollouts.attention_mask, cols, first)
        assert (h @ head.weight.T - want).abs().max() < 1e-12


@pytest.mark.parametrize("name", sorted(fs.fused_names()))
def test_values_and_gradients_equal_the_materialised_path(pair64, rollouts, name):
    """float64, masked positions (responses of lengths 1..8) and a masked token id."""
    params = {"k": 5} if "k" in est.get(name).params() else {}          # top-k ones: k <= V = 16
    mask_ids = [int(rollouts.input_ids[0, rollouts.prompt_width + 1])]

    def fused_score():
        return fs.score(pair64.student, pair64.teacher, rollouts, name, params, vocab_size=16, mask_token_ids=mask_ids)

    def batch():
        return sc.score(pair64.student, pair64.teacher, rollouts, [name], vocab_size=16, mask_token_ids=mask_ids,
                        params={name: params})

    scored, reference = fused_score(), batch()
    assert torch.equal(scored.mask, reference.mask) and int(reference.mask.sum()) < int(rollouts.response_mask.sum())
    assert (scored.values - est.per_sequence(name, reference, **params)).abs().max() < 1e-10
    for reduction in ("token_mean", "sequence_mean"):
        got = grads(pair64.student, fused_score().loss(reduction))
        want = grads(pair64.student, est.surrogate_loss(name, batch(), reduction=reduction, **params))
        assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-10


def test_metrics_equal_the_evaluation_functions(pair64, rollouts):
    from vopd_analysis.distill.evaluate import sampled_reverse_kl, sequence_reverse_kl
    scored = fs.score(pair64.student, pair64.teacher, rollouts, "vopd", vocab_size=16)
    batch = sc.score(pair64.student, pair64.teacher, rollouts, ["vopd"], vocab_size=16)
    assert (scored.sampled_reverse_kl() - sampled_reverse_kl(batch)).abs().max() < 1e-10
    assert (scored.sequence_reverse_kl() - sequence_reverse_kl(batch)).abs().max() < 1e-10


def test_padded_heads(tmp_path, one_thread):
    """Output layers with 48 and 50 rows over a 42-token vocabulary: the first 42 rows are the logits."""
    s_path, t_path = save_tiny_pair(tmp_path, student_vocab=48, teacher_vocab=50)
    pair = loading.load_pair(s_path, t_path, dtype=torch.float64)
    V = pair.info.vocab_size
    rollouts = ro.generate_rollouts(pair.student, pair.tokenizer, ["ab", "abc"], 2, 6, seed=0, vocab_size=V)
    for name in ("vopd", "opd_bstar", "full_kl"):
        scored = fs.score(pair.student, pair.teacher, rollouts, name, vocab_size=V)
        batch = sc.score(pair.student, pair.teacher, rollouts, [name], vocab_size=V)
        assert (scored.values - est.per_sequence(name, batch)).abs().max() < 1e-10


def test_choose():
    big = fs.AUTO_MIN_ELEMENTS
    assert fs.choose("auto", "vopd", big // 1024, 1024) and not fs.choose("auto", "vopd", big // 1024 - 1, 1024)
    assert not fs.choose("auto", "k3", 10 ** 6, 10 ** 6)            # no fused form: materialised
    assert fs.choose("fused", "opd", 1, 1) and not fs.choose("materialised", "opd", 10 ** 6, 10 ** 6)
    with pytest.raises(InputError, match="estimator 'k3' has no fused form"):
        fs.choose("fused", "k3", 1, 1)
    with pytest.raises(InputError, match="--logits must be one of auto, materialised, fused"):
        fs.choose("fast", "opd", 1, 1)


def test_probe_gradients_fused_equal_materialised(pair64, rollouts):
    """Per-rollout gradients of the variance probe: fused equal materialised (float64 1e-10); "auto"
    on a small batch materialises; under "fused" an estimator without a fused form is materialised."""
    from vopd_analysis.lm import variance
    named = variance.trainable_parameters(pair64.student)
    fusable = {n: est.get(n).params() for n in ("opd", "vopd", "opd_bstar")}

    def gradients(params, logits):
        return list(variance.rollout_gradients(pair64.student, pair64.teacher, rollouts, params, named,
                                               vocab_size=16, logits=logits))

    got, want = gradients(fusable, "fused"), gradients(fusable, "materialised")
    assert [n for n, _ in got] == [n for n, _ in want] and len(got) == 3 * rollouts.num_rollouts
    assert max(float((a - b).abs().max()) for (_, a), (_, b) in zip(got, want)) < 1e-10
    assert max(float((a - b).abs().max()) for (_, a), (_, b) in zip(gradients(fusable, "auto"), want)) == 0.0
    mixed = {**fusable, "k3": est.get("k3").params()}
    got, want = gradients(mixed, "fused"), gradients(mixed, "materialised")
    assert [n for n, _ in got] == [n for n, _ in want]
    assert max(float((a - b).abs().max()) for (_, a), (_, b) in zip(got, want)) < 1e-10
