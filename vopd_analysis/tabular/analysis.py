"""``vopd exact``: exact J and every estimator's mean, variance and bias on one environment.

Parameters follow ``vopd_analysis.params``: each estimator starts from its registry defaults,
every given parameter goes to each selected estimator that takes it (``params.distribute``),
and a registry-default top-k size larger than the vocabulary is capped at V and reported
(``params.cap_to_vocab``); an explicit k > V is an error.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .. import estimators as est
from .. import params as prm
from ..errors import InputError
from . import dp, enumeration
from .targets import bias_report, tree_quantities


def single_sequence_names(names: Optional[Iterable[str]] = None) -> List[str]:
    """The estimators ``vopd exact`` analyses: ``names`` (checked), or every single-sequence one.

    Args:
      names: registered estimators, or None for all of the registry's non-group estimators.
    Returns:
      The names, in the given order (registry order for None).
    Raises:
      InputError: an unknown name, or a group estimator (it draws K rollouts per prompt, so it
        has no single-sequence moments).
    """
    if names is None:
        return [e.name for e in est.REGISTRY.values() if not e.group]
    names = list(dict.fromkeys(names))
    for name in names:
        if est.get(name).group:
            raise InputError(f"'{name}' is a group estimator (K rollouts per prompt), not a single-sequence one: "
                             "vopd exact does not cover it; use vopd mc --estimator "
                             f"{name} (each draw one group) or tabular.enumeration.exact_group_moments")
    return names


def estimator_specs(params: Optional[dict] = None, names: Optional[Iterable[str]] = None,
                    vocab: Optional[int] = None) -> Tuple[Dict[str, dict], List[dict]]:
    """Specs for the exact engines, {name: {"name": name, **full parameters}}, and the capped parameters.

    Each estimator gets its registry defaults, overridden by the entries of ``params`` it takes
    (``params.distribute``: a parameter no selected estimator takes is an error). With ``vocab``,
    a default k > V is capped at V and listed; an explicit k outside 1..V is an error.

    Args:
      params: {parameter: value} given for all selected estimators (None: registry defaults).
      names: estimators to include (None: every single-sequence one, ``single_sequence_names``).
      vocab: V of the environment, or None to skip the top-k check.
    Returns:
      (specs, capped), capped a list of {"estimator", "param", "default", "used"}.
    """
    names = single_sequence_names(names)
    shared = prm.distribute(names, params)
    specs, capped = {}, []
    for name in names:
        full = prm.resolve(name, shared[name])
        if vocab is not None:
            full, cut = prm.cap_to_vocab(name, full, shared[name], vocab)
            capped += cut
        specs[name] = {"name": name, **full}
    return specs, capped


def dp_applies(spec: dict) -> bool:
    """Whether ``tabular.dp`` computes this spec's moments: its estimator's credit (a, c, gamma)
    exists (``Estimator.credit_for`` is None where the gradient at t depends on the whole sequence).

    Args:
      spec: {"name": estimator, **params}.
    Returns:
      True or False.
    """
    entry = est.get(spec["name"])
    return entry.credit_for(**{p: v for p, v in spec.items() if p != "name"}) is not None


def default_specs(k: int, names: Optional[Iterable[str]] = None) -> Dict[str, dict]:
    """``estimator_specs({"k": k}, names)[0]``: every single-sequence estimator, the top-k ones with ``k``.

    Args:
      k: the top-k size given to every estimator that takes ``k``.
      names: estimators to include (None: all single-sequence ones).
    Returns:
      {name: {"name": name, **parameters}}.
    """
    return estimator_specs({"k": k}, names)[0]


def analyse(tree, params: Optional[dict] = None, names: Optional[Iterable[str]] = None, method: str = "dp",
            *, k: Optional[int] = None) -> dict:
    """Exact J, and for every selected estimator its parameters, mean, variance and bias (plain floats).

    Args:
      tree: a prefix tree or Markov chain (``synthetic``).
      params: {parameter: value} for every selected estimator that takes it (``estimator_specs``);
        None: registry defaults, a default k above V capped at V.
      names: estimators (None: every single-sequence one).
      method: "dp" (vopd_analysis.tabular.dp, any layered environment) or "enumerate"
        (all V^H sequences, prefix trees only).
      k: shorthand for ``params={"k": k}``.
    Returns:
      The JSON object of ``vopd exact``: {"vocab", "horizon", "method", "params" (the given ones),
      "capped" (list of {"estimator", "param", "default", "used"}), "skipped" ({estimator: why}:
      with method "dp" and all estimators, those the DP cannot compute), "sequence_kl",
      "grad_sequence_norm", "grad_token_norm", "estimators": {name: {"params", "unbiased_for",
      "mean_gradient", "total_variance", "position_variance", "bias_token", "bias_sequence"}}},
      biases as absolute L2 norms.
    """
    given = prm.with_shorthand(params, k, option="k")
    if method not in ("dp", "enumerate"):
        raise InputError(f"unknown exact method '{method}'; choose 'dp' or 'enumerate'")
    specs, capped = estimator_specs(given, names, vocab=tree.vocab)
    skipped = {}
    if method == "dp" and names is None:   # all estimators: leave out those the DP cannot compute
        for name in [n for n, spec in specs.items() if not dp_applies(spec)]:
            skipped[name] = "no DP (its position-t gradient depends on the whole sequence); use --method enumerate"
            del specs[name]
    tq = tree_quantities(tree)
    if method == "dp":
        moments = dp.dp_moments(tree, specs, tq)
    else:
        moments = enumeration.exact_moments(tree, specs, quantities=tq)
    result = {"vocab": tree.vocab, "horizon": tree.horizon, "method": method, "params": given, "capped": capped,
              "skipped": skipped,
              "sequence_kl": tq.sequence_kl, "grad_sequence_norm": float(torch.linalg.norm(tq.grad_sequence)),
              "grad_token_norm": float(torch.linalg.norm(tq.grad_token)), "estimators": {}}
    for name, m in moments.items():
        used = {p: v for p, v in specs[name].items() if p != "name"}
        result["estimators"][name] = {
            "params": used,
            "unbiased_for": est.get(name).target_for(**used),
            "mean_gradient": m.mean.reshape(-1).tolist(),
            "total_variance": m.total_variance,
            "position_variance": m.position_variance.tolist(),
            "bias_token": bias_report(m.mean, tq.grad_token)["l2"],
            "bias_sequence": bias_report(m.mean, tq.grad_sequence)["l2"],
        }
    return result
