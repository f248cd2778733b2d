"""``vopd exact``: exact J and every estimator's mean, variance and bias on one environment."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from .. import estimators as est
from ..errors import InputError
from . import dp, enumeration
from .targets import bias_report, tree_quantities


def default_specs(k: int, names: Optional[Iterable[str]] = None) -> Dict[str, dict]:
    """One spec per single-sequence registered estimator; top-k ones use ``k``."""
    specs = {}
    for entry in est.REGISTRY.values():
        if entry.group or (names is not None and entry.name not in names):
            continue
        spec = {"name": entry.name}
        if "k" in entry.defaults:
            spec["k"] = k
        specs[entry.name] = spec
    return specs


def analyse(tree, k: int = 2, names: Optional[Iterable[str]] = None, method: str = "dp") -> dict:
    """Exact J, and for every applicable estimator its mean, variance and bias (plain floats).

    ``method`` is "dp" (vopd_analysis.tabular.dp, any layered environment) or "enumerate"
    (all V^H sequences, prefix trees only). The JSON shape of ``vopd exact``:
    {"sequence_kl", "estimators": {name: {"mean_gradient", "total_variance",
    "bias_token", "bias_sequence", ...}}} with absolute L2 biases.
    """
    est._check_k(k, tree.vocab, "--k")
    tq = tree_quantities(tree)
    if method == "dp":
        moments = dp.dp_moments(tree, default_specs(k, names), tq)
    elif method == "enumerate":
        moments = enumeration.exact_moments(tree, default_specs(k, names), quantities=tq)
    else:
        raise InputError(f"unknown exact method '{method}'; choose 'dp' or 'enumerate'")
    result = {"vocab": tree.vocab, "horizon": tree.horizon, "k": k, "method": method, "sequence_kl": tq.sequence_kl,
              "grad_sequence_norm": float(torch.linalg.norm(tq.grad_sequence)),
              "grad_token_norm": float(torch.linalg.norm(tq.grad_token)), "estimators": {}}
    for name, m in moments.items():
        entry = est.get(name)
        result["estimators"][name] = {
            "unbiased_for": entry.target_for(**({"k": k} if "k" in entry.defaults else {})),
            "mean_gradient": m.mean.reshape(-1).tolist(),
            "total_variance": m.total_variance,
            "position_variance": m.position_variance.tolist(),
            "bias_token": bias_report(m.mean, tq.grad_token)["l2"],
            "bias_sequence": bias_report(m.mean, tq.grad_sequence)["l2"],
        }
    return result
