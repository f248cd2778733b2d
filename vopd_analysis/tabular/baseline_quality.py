"""Baseline quality for the per-token estimator sum_t (l_t - b(s_t)) S_t, exact on prefix trees.

In logit space the score at state s is S = e_y - q_s with |S|^2 = w_y = 1 - 2 q_y + |q|^2.
On a prefix tree the positions of a sequence touch distinct states, so the
cross-position terms of the trace vanish and, for any state baseline b,

    tr Cov(b) = sum_s d(s) sum_y q_y w_y (l_y - b(s))^2 - |g_tok|^2,

a quadratic in each b(s), minimised by

    b*(s) = sum_y q_y w_y l_y / sum_y q_y w_y,

with tr Cov(b) = tr Cov(b*) + sum_s d(s) E_y[w_y] (b(s) - b*(s))^2. vOPD uses
b(s) = KL_s = sum_y q_y l_y (weights q_y, not q_y w_y), so it can land farther
from b* than b = 0 does: the closed-form baseline then *increases* variance.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from synthetic.tree import PrefixTree

from .. import divergences as dv
from .targets import TreeQuantities, tree_quantities


def _weights(tq: TreeQuantities) -> torch.Tensor:
    """q_y |e_y - q|^2 per state and token (``divergences.logit_score_weights``). [S, V]"""
    return dv.logit_score_weights(tq.log_q.exp())


def optimal_baseline(tq: TreeQuantities) -> torch.Tensor:
    """b*(s), the variance-optimal scalar baseline of each state (``divergences.optimal_scalar_baseline``). [S]"""
    return dv.optimal_scalar_baseline(tq.log_q, tq.log_p)


def topk_baseline(tree: PrefixTree, k: int) -> torch.Tensor:
    """The vopd_topk baseline per state: reverse KL on the student's top-k, renormalised. [S]"""
    return dv.renormalised_reverse_kl(*dv.student_topk_logprobs(
        torch.as_tensor(tree.student_logits, dtype=torch.float64),
        torch.as_tensor(tree.teacher_logits, dtype=torch.float64), k))


def baseline_variance(tree: PrefixTree, baseline, quantities: Optional[TreeQuantities] = None) -> float:
    """Exact tr Cov of sum_t (l_t - b(s_t)) S_t for a state baseline b given as an [S] array."""
    tq = quantities or tree_quantities(tree)
    b = torch.as_tensor(np.asarray(baseline, dtype=np.float64)).reshape(-1, 1)
    second = (tq.reach[:, None] * _weights(tq) * (tq.log_q - tq.log_p - b) ** 2).sum()
    return float(second - (tq.grad_token ** 2).sum())


def baseline_quality(tree: PrefixTree, baseline=None, quantities: Optional[TreeQuantities] = None) -> dict:
    """Variance with no baseline, with ``baseline`` (default: vOPD's KL_s), and with b*.

    reduction_ratio = Var_b / Var_0 (below 1 is a reduction); explained_variance =
    (Var_0 - Var_b) / (Var_0 - Var_b*) (1 is optimal, negative means b adds
    variance); gap_to_optimal = Var_b - Var_b*.
    """
    tq = quantities or tree_quantities(tree)
    var_none = baseline_variance(tree, np.zeros(tree.num_states), tq)
    var_opt = baseline_variance(tree, optimal_baseline(tq), tq)
    var_b = baseline_variance(tree, tq.kl if baseline is None else baseline, tq)
    return {"var_no_baseline": var_none, "var_baseline": var_b, "var_optimal": var_opt,
            "reduction_ratio": var_b / var_none,
            "explained_variance": (var_none - var_b) / (var_none - var_opt) if var_none > var_opt else float("nan"),
            "gap_to_optimal": var_b - var_opt}
