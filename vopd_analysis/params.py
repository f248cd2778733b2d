"""Estimator parameters from the command line: one parser, one resolver, one sharing rule.

Every command that takes estimator parameters (``vopd exact``, ``vopd mc``, ``vopd distill``,
``vopd sweep``) reads them as ``--param NAME=VALUE`` (repeatable; ``--k K`` is shorthand for
``--param k=K``) and goes through these functions:

* ``parse_assignments``  ``["k=4", "gamma=0.5"]`` -> ``{"k": 4, "gamma": 0.5}``;
* ``resolve``            one estimator's full parameter dict: registry defaults, then the
                         overrides, each checked against the type of its default;
* ``distribute``         several estimators at once: each given parameter goes to every
                         estimator that takes it, and one that none takes is an error;
* ``cap_to_vocab``       a top-k size ``k`` that exceeds the vocabulary: a registry default is
                         capped at V (and reported), an explicit value is an error.

All functions are pure (no I/O); bad input raises ``InputError`` naming the estimator, the
parameter and the value.
"""

from __future__ import annotations

import json
import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import estimators as est
from .errors import InputError


def parse_value(text: str):
    """A ``--param`` value: JSON where it parses (``4`` -> 4, ``0.5`` -> 0.5, ``true`` -> True,
    ``null`` -> None), else the text itself (``token_mean`` -> "token_mean").

    Args:
      text: the part after ``=``.
    Returns:
      The parsed value.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: Optional[Iterable[str]], option: str = "--param") -> dict:
    """``["k=4", "beta=0.5"]`` -> ``{"k": 4, "beta": 0.5}``; a later assignment of a name wins.

    Args:
      items: ``NAME=VALUE`` strings (None or empty: no parameters).
      option: how the error message names where the items came from.
    Returns:
      {name: value}, values read by ``parse_value``.
    Raises:
      InputError: an item without ``=`` or with an empty name, naming the item.
    """
    params = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"{option} expects NAME=VALUE, got {item!r}")
        params[name] = parse_value(value)
    return params


def with_shorthand(params: Optional[Mapping], k: Optional[int] = None, option: str = "--k") -> dict:
    """``params`` with ``k`` added: ``--k K`` is ``--param k=K``; giving both with different values is an error.

    Args:
      params: parsed ``--param`` assignments (or None).
      k: the ``--k`` value, or None when not given.
      option: the shorthand's name in the error message.
    Returns:
      A new dict.
    """
    out = dict(params or {})
    if k is not None:
        if "k" in out and out["k"] != k:
            raise InputError(f"{option} {k} contradicts --param k={out['k']!r}; give one of them")
        out["k"] = k
    return out


def coerce(estimator: str, name: str, value, default):
    """``value`` checked against the type of the registry default ``default``.

    int default: an int (not a bool, not 2.5); float default: a finite int or float (not NaN,
    which ``parse_value`` reads from ``NaN``, nor an infinity), returned as float; bool default: true or false; str default: a string; None default: anything.

    Args:
      estimator: the estimator's name (for the message).
      name: the parameter's name.
      value: the given value.
      default: the registry default.
    Returns:
      The value, converted to float for a float default.
    Raises:
      InputError: naming the estimator, the parameter, the value and the type expected.
    """
    def bad(kind: str):
        return InputError(f"estimator '{estimator}': parameter {name} must be {kind} (default {default!r}), "
                          f"got {value!r}")

    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number, not NaN or an infinity")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if not isinstance(value, type(default)):
        raise bad(f"of type {type(default).__name__}")
    return value


def resolve(estimator: str, overrides: Optional[Mapping] = None) -> dict:
    """One estimator's full parameter dict: ``get(estimator).defaults`` updated with ``overrides``.

    Args:
      estimator: a registered estimator's name.
      overrides: {parameter: value}; every name must be one the estimator takes.
    Returns:
      {parameter: value} for every parameter the estimator takes, overrides type-checked by ``coerce``.
    Raises:
      InputError: an unknown estimator, a parameter it does not take, or a value of the wrong type.
    """
    entry = est.get(estimator)
    overrides = dict(overrides or {})
    params = entry.params(**overrides)     # unknown names: the registry's message
    for name, value in overrides.items():
        params[name] = coerce(estimator, name, value, entry.defaults[name])
    return params


def distribute(names: Sequence[str], given: Optional[Mapping]) -> Dict[str, dict]:
    """Share parameters over several estimators: each given parameter goes to every one that takes it.

    Args:
      names: registered estimators' names.
      given: {parameter: value}, e.g. from ``parse_assignments``.
    Returns:
      {estimator: {parameter: value}}, the overrides of each estimator (type-checked), in the
      order of ``names``; an estimator that takes none of them gets {}.
    Raises:
      InputError: a parameter that none of ``names`` takes (listing which take what), or a
        value of the wrong type for one that does.
    """
    given = dict(given or {})
    defaults = {name: est.get(name).defaults for name in names}
    unused = sorted(set(given) - {p for d in defaults.values() for p in d})
    if unused:
        takes = "; ".join(f"{n} takes {', '.join(d)}" for n, d in defaults.items() if d)
        raise InputError(f"no selected estimator takes parameter {', '.join(unused)} (selected: {', '.join(names)}; "
                         + (f"{takes})" if takes else "none of them takes parameters)"))
    return {name: {p: coerce(name, p, v, d[p]) for p, v in given.items() if p in d}
            for name, d in defaults.items()}


def parse_estimator_items(items: Iterable, common: Optional[Mapping] = None, what: str = "--estimators") -> list:
    """Estimator items with their own parameters: ``["opd", "vopd_topk:k=4"]`` (or one comma-separated
    string) -> ``[("opd", {}), ("vopd_topk", {"k": 4})]``; a (name, params) pair passes as it is.

    Args:
      items: names, ``NAME:PARAM=VALUE[:...]`` strings or (name, params) pairs; or one string of them
        separated by commas.
      common: parameters meant for every estimator that takes them (``--param``, ``--k``); one that no
        item's estimator takes is an error (they are not merged here: callers decide how).
      what: how messages name the list.

    Returns:
      [(registry name, the item's own parameters)], names checked against the registry.

    Raises:
      InputError: an empty list, an unknown estimator, a malformed assignment, or a ``common``
        parameter that none of the estimators takes.
    """
    if isinstance(items, str):
        items = items.split(",")
    out = []
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                continue
            name, *assignments = item.strip().split(":")
            own = parse_assignments(assignments, option=f"'{item.strip()}'")
        else:
            name, own = item[0], dict(item[1])
        est.get(name)
        out.append((name, own))
    if not out:
        raise InputError(f"{what} is empty")
    unused = sorted(set(common or {}) - {k for name, _ in out for k in est.get(name).defaults})
    if unused:
        raise InputError(f"no estimator in {what} takes parameter {', '.join(unused)}")
    return out


def cap_to_vocab(estimator: str, params: Mapping, explicit: Iterable[str], vocab: int) -> Tuple[dict, List[dict]]:
    """Fit a top-k size to the vocabulary: ``k`` must satisfy 1 <= k <= V.

    A ``k`` that came from the registry default and exceeds V becomes V (the top-V set is the
    whole vocabulary) and is reported; an explicit one (named in ``explicit``) outside
    1..V is an error, as is any k below 1.

    Args:
      estimator: the estimator's name.
      params: its full parameter dict (``resolve``).
      explicit: the parameter names the user gave.
      vocab: V.
    Returns:
      (params with k capped, [{"estimator", "param", "default", "used"}] for each capped parameter).
    Raises:
      InputError: an explicit k outside 1..V, naming the estimator and V.
    """
    params, capped = dict(params), []
    k = params.get("k")
    if isinstance(k, int) and not isinstance(k, bool):
        if "k" not in set(explicit) and k > vocab:
            params["k"] = vocab
            capped.append({"estimator": estimator, "param": "k", "default": k, "used": vocab})
        elif not 1 <= k <= vocab:
            raise InputError(f"estimator '{estimator}': k must satisfy 1 <= k <= V = {vocab}, got k={k}")
    return params, capped


def describe(params: Mapping) -> str:
    """``{"k": 4, "gamma": 0.5}`` -> ``"k=4, gamma=0.5"`` (``"-"`` for none), for printed tables."""
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"
