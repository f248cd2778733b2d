"""vOPD and opd_bstar as verl advantage estimators (tested against verl 0.9.1 on CPU).

verl's policy loss is ``-A_t * ratio_t`` (it *maximises* A log pi), while this project's surrogates
*minimise* ``sum_t sg(l_t - b_t) log pi(y_t)`` with ``l_t = log pi(y_t) - log pi_T(y_t)``. So the
verl advantage of an estimator with state baseline b_t is

    A_t = -(l_t - b_t) = r_t + b_t,    r_t = log pi_T(y_t) - log pi(y_t),

with b_t = 0 (opd), KL_t = KL(pi || pi_T)(s_t) (vopd) or b*(s_t) (opd_bstar). KL_t and b* come from
the project's own functions (``estimators.KL_BASELINE`` / ``BSTAR_BASELINE``), not re-derived here.
With ratio = 1 (first PPO epoch) and loss_agg_mode "token-mean", verl's gradient equals
``estimators.surrogate_loss(name, batch, reduction="token_mean")``'s (``tests/test_verl_adapter.py``).

What verl's registry can carry. In verl 0.9.1 ``ray_trainer.compute_advantage`` calls a registered
estimator with ``token_level_rewards``, ``response_mask``, ``config`` and, only when present in
``data.batch``, ``index`` (``uid``) and ``reward_baselines``: no logits. So:

* r_t arrives as ``token_level_rewards``: with ``algorithm.use_kl_in_reward`` verl computes
  ``token_level_scores - beta * (old_log_probs - ref_log_prob)``, which is exactly r_t for
  ``kl_penalty="kl"``, a fixed beta = 1, zero task scores and the teacher's log-probs in
  ``ref_log_prob``. verl's stock ref worker scores the actor's own initial model, so putting the
  teacher's log-probs there (or writing r_t per token from a reward function) is the user's wiring.
* b_t must be put into ``data.batch["reward_baselines"]`` ([B, T]) by the user, where both models'
  full logits at the response positions exist (verl's workers return per-token log-probs only, so this
  step is the user's own code): ``data.batch["reward_baselines"] = token_baseline("vopd", student_logits,
  teacher_logits, responses)``. Then set ``algorithm.adv_estimator=vopd`` (or ``opd_bstar``).

A trainer that writes ``data.batch["advantages"]`` itself can skip the registry:
``token_advantages(name, student_logits, teacher_logits, tokens, mask)`` gives A directly.
Importing this module registers "vopd" and "opd_bstar" when verl imports.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import divergences as dv
from .. import estimators as est
from ..batch import TokenBatch
from ..errors import InputError

try:
    from verl.trainer.ppo import core_algos
    _VERL_ERROR: Optional[Exception] = None
except ImportError as err:  # the pure-torch functions below work without verl
    core_algos, _VERL_ERROR = None, err

BASELINES = {"opd": est.NO_BASELINE, "vopd": est.KL_BASELINE, "opd_bstar": est.BSTAR_BASELINE}


def _batch(student_logits, teacher_logits, tokens, mask) -> TokenBatch:
    mask = torch.ones(tokens.shape, dtype=student_logits.dtype) if mask is None else mask
    teacher_lp = dv.token_logprobs(teacher_logits.detach(), tokens)
    return TokenBatch(tokens, mask.to(student_logits.dtype), student_logits.detach(), teacher_lp,
                      teacher_logits=teacher_logits.detach()).validate(allow_empty_mask=True)


def _baseline(name: str):
    if name not in BASELINES:
        raise InputError(f"verl adapter: unknown estimator '{name}'; choose one of {sorted(BASELINES)}")
    return BASELINES[name]


def token_baseline(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """b_t [B, T], detached: 0 (opd), KL_t (vopd) or b*(s_t) (opd_bstar), from full [B, T, V] logits
    of the student (the policy that sampled ``tokens``) and the teacher. Store it as
    ``data.batch["reward_baselines"]`` for the registered verl estimators."""
    batch = _batch(student_logits, teacher_logits, tokens, mask)
    lp, b = est.logprobs_and_baseline(batch, _baseline(name), name)
    return torch.zeros_like(lp) if b is None else b.detach()


def token_advantages(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """verl's advantages A_t = -m_t (l_t - b_t) [B, T], detached, for ``name`` in opd / vopd / opd_bstar:
    the tensor for ``data.batch["advantages"]``."""
    batch = _batch(student_logits, teacher_logits, tokens, mask)
    lp, b = est.logprobs_and_baseline(batch, _baseline(name), name)
    l = est.log_ratio(batch, lp)
    return -(l if b is None else l - b).detach() * batch.mask


def _from_rewards(name, token_level_rewards, response_mask, reward_baselines):
    if reward_baselines is None or reward_baselines.shape != token_level_rewards.shape:
        raise ValueError(f"verl estimator '{name}' needs data.batch['reward_baselines'] of shape "
                         f"{tuple(token_level_rewards.shape)} holding b_t (token_baseline('{name}', ...)), "
                         f"got {None if reward_baselines is None else tuple(reward_baselines.shape)}")
    with torch.no_grad():
        m = response_mask.to(token_level_rewards.dtype)
        advantages = (token_level_rewards + reward_baselines.to(token_level_rewards.dtype)) * m
    return advantages, advantages


def vopd_advantage(token_level_rewards, response_mask, reward_baselines=None, config=None, **kwargs):
    """verl estimator "vopd": (A, A) with A_t = m_t (r_t + KL_t); r_t = log pi_T(y_t) - log pi(y_t)
    as ``token_level_rewards``, KL_t as ``reward_baselines``. [B, T] each"""
    return _from_rewards("vopd", token_level_rewards, response_mask, reward_baselines)


def opd_bstar_advantage(token_level_rewards, response_mask, reward_baselines=None, config=None, **kwargs):
    """verl estimator "opd_bstar": (A, A) with A_t = m_t (r_t + b*(s_t)), b* as ``reward_baselines``."""
    return _from_rewards("opd_bstar", token_level_rewards, response_mask, reward_baselines)


REGISTERED = {"vopd": vopd_advantage, "opd_bstar": opd_bstar_advantage}


def register() -> None:
    """Register REGISTERED in verl's advantage-estimator registry. Re-importing this module replaces
    its own earlier entries; a different function already under one of the names raises verl's ValueError."""
    if core_algos is None:
        raise ImportError(f"verl is not importable: {_VERL_ERROR}")
    for name, fn in REGISTERED.items():
        old = core_algos.ADV_ESTIMATOR_REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) == (fn.__module__, fn.__qualname__):
            del core_algos.ADV_ESTIMATOR_REGISTRY[name]
        core_algos.register_adv_est(name)(fn)


if core_algos is not None:
    register()
