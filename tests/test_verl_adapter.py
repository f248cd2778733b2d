"""verl adapter: verl's own policy loss with the adapter's advantages has our surrogates' gradient."""

import importlib

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
from verl.workers.config import ActorConfig  # noqa: E402

from vopd_analysis import TokenBatch, surrogate_loss  # noqa: E402
from vopd_analysis import divergences as dv  # noqa: E402
from vopd_analysis.distill import verl_adapter  # noqa: E402

D = torch.float64


def make_batch(B=3, T=5, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=D)
    t = torch.randn(B, T, V, generator=g, dtype=D)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=D)
    mask[0, 3:] = 0  # right padding
    mask[2, 1:] = 0
    return TokenBatch(y, mask, z, dv.token_logprobs(t, y), teacher_logits=t)


def our_grad(name, batch):
    z = batch.student_logits.detach().clone().requires_grad_(True)
    surrogate_loss(name, TokenBatch(**{**batch.__dict__, "student_logits": z}), reduction="token_mean").backward()
    return z.grad


def verl_grad(batch, advantages):
    """Gradient in the student logits of verl's "vanilla" PPO loss, ratio = 1, token-mean."""
    z = batch.student_logits.detach().clone().requires_grad_(True)
    log_prob = dv.token_logprobs(z, batch.tokens)
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=1, ppo_micro_batch_size_per_gpu=1)
    loss, _ = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob=log_prob.detach(), log_prob=log_prob, advantages=advantages,
        response_mask=batch.mask.bool(), loss_agg_mode="token-mean", config=config)
    loss.backward()
    return z.grad


def adapter_advantages(name, batch):
    return verl_adapter.token_advantages(name, batch.student_logits, batch.teacher_logits, batch.tokens, batch.mask)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["opd", "vopd", "opd_bstar"])
def test_verl_policy_loss_gradient_matches_surrogate(name, seed):
    batch = make_batch(seed=seed)
    g = verl_grad(batch, adapter_advantages(name, batch))
    assert torch.allclose(g, our_grad(name, batch), rtol=0, atol=1e-10)
    assert g.abs().max() > 1e-3


@pytest.mark.parametrize("name", ["vopd", "opd_bstar"])
def test_registry_estimator_from_rewards_and_baselines(name):
    """The path verl's trainer takes: r_t as token_level_rewards, b_t as reward_baselines."""
    batch = make_batch(seed=2)
    fn = core_algos.get_adv_estimator_fn(name)
    assert fn is verl_adapter.REGISTERED[name]
    # ray_trainer.apply_kl_penalty with zero task scores, beta = 1, the teacher as reference: r_t
    old_log_probs = dv.token_logprobs(batch.student_logits, batch.tokens)
    rewards = 0.0 - 1.0 * core_algos.kl_penalty(old_log_probs, batch.teacher_token_logprobs, "kl") * batch.mask
    b = verl_adapter.token_baseline(name, batch.student_logits, batch.teacher_logits, batch.tokens, batch.mask)
    adv, returns = fn(token_level_rewards=rewards, response_mask=batch.mask.bool(), config=None,
                      index=list(range(3)), reward_baselines=b)
    assert torch.allclose(adv, adapter_advantages(name, batch), rtol=0, atol=1e-12)
    assert torch.equal(adv, returns)
    assert torch.allclose(verl_grad(batch, adv), our_grad(name, batch), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="reward_baselines"):
        fn(token_level_rewards=rewards, response_mask=batch.mask.bool(), config=None)


def test_reimport_keeps_one_registration():
    module = importlib.reload(verl_adapter)
    assert core_algos.get_adv_estimator_fn("vopd") is module.vopd_advantage
    assert core_algos.get_adv_estimator_fn("opd_bstar") is module.opd_bstar_advantage
