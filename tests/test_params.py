"""vopd_analysis.params: parsing NAME=VALUE, type checks against the registry defaults, sharing, capping k."""

import dataclasses

import pytest

from vopd_analysis import estimators as est
from vopd_analysis import params as prm
from vopd_analysis.errors import InputError


def test_parse_assignments_reads_json_else_text():
    assert prm.parse_assignments(["k=4", "gamma=0.5", "scale_std=true", "mode=token_mean", "x=null", "s=\"4\""]) == {
        "k": 4, "gamma": 0.5, "scale_std": True, "mode": "token_mean", "x": None, "s": "4"}
    assert prm.parse_assignments(["k=4", "k=8"]) == {"k": 8}          # the later one wins
    assert prm.parse_assignments(["note=a=b"]) == {"note": "a=b"}      # split at the first '='
    assert prm.parse_assignments(None) == {} == prm.parse_assignments([])
    for bad in ("k", "=4"):
        with pytest.raises(InputError, match=f"--param expects NAME=VALUE, got '{bad}'"):
            prm.parse_assignments(["gamma=1", bad])
    with pytest.raises(InputError, match="'vopd_topk:k' expects NAME=VALUE"):
        prm.parse_assignments(["k"], option="'vopd_topk:k'")


def test_shorthand_k():
    assert prm.with_shorthand({"gamma": 0.5}, 4) == {"gamma": 0.5, "k": 4}
    assert prm.with_shorthand(None, None) == {}
    assert prm.with_shorthand({"k": 4}, 4) == {"k": 4}
    with pytest.raises(InputError, match="--k 8 contradicts --param k=4"):
        prm.with_shorthand({"k": 4}, 8)


def test_coerce_by_the_default_type():
    assert prm.coerce("e", "k", 4, 16) == 4
    for bad in (2.5, True, "4", None):
        with pytest.raises(InputError, match="estimator 'e': parameter k must be an integer"):
            prm.coerce("e", "k", bad, 16)
    one = prm.coerce("e", "gamma", 1, 0.5)
    assert one == 1.0 and isinstance(one, float)
    for bad in (True, "0.5"):
        with pytest.raises(InputError, match="parameter gamma must be a number"):
            prm.coerce("e", "gamma", bad, 0.5)
    assert prm.coerce("e", "flag", False, True) is False
    for bad in (0, 1, "true"):
        with pytest.raises(InputError, match="parameter flag must be true or false"):
            prm.coerce("e", "flag", bad, False)
    assert prm.coerce("e", "mode", "a", "b") == "a"
    with pytest.raises(InputError, match="must be a string"):
        prm.coerce("e", "mode", 3, "b")


# stand-in registry entries, so that these tests do not depend on which estimators take what
FAKES = {"f_none": {}, "f_k": {"k": 16}, "f_kg": {"k": 16, "gamma": 1.0}}


@pytest.fixture
def fakes(monkeypatch):
    base = est.get("opd")
    for name, defaults in FAKES.items():
        monkeypatch.setitem(est.REGISTRY, name, dataclasses.replace(base, name=name, defaults=dict(defaults)))


def test_resolve_fills_registry_defaults_and_names_the_culprit(fakes):
    assert prm.resolve("f_kg") == {"k": 16, "gamma": 1.0}
    assert prm.resolve("f_kg", {"gamma": 0}) == {"k": 16, "gamma": 0.0}
    assert prm.resolve("f_none") == {} == prm.resolve("f_none", None)
    real = prm.resolve("vopd_topk")
    assert real == est.get("vopd_topk").defaults and real is not est.get("vopd_topk").defaults
    with pytest.raises(InputError, match="estimator 'f_none' takes parameters none, got unknown"):
        prm.resolve("f_none", {"gamma": 0.5})
    with pytest.raises(InputError, match=r"estimator 'f_kg': parameter k must be an integer \(default 16\), "
                                         r"got 2\.5"):
        prm.resolve("f_kg", {"k": 2.5})
    with pytest.raises(InputError, match="known estimators"):
        prm.resolve("bogus")


def test_distribute_gives_each_parameter_to_the_estimators_that_take_it(fakes):
    assert prm.distribute(["f_none", "f_k", "f_kg"], {"k": 4}) == {"f_none": {}, "f_k": {"k": 4}, "f_kg": {"k": 4}}
    assert prm.distribute(["f_k", "f_kg"], {"gamma": 1}) == {"f_k": {}, "f_kg": {"gamma": 1.0}}
    assert prm.distribute(["f_none", "f_k"], None) == {"f_none": {}, "f_k": {}}
    with pytest.raises(InputError, match=r"no selected estimator takes parameter k \(selected: f_none; "
                                         "none of them takes parameters"):
        prm.distribute(["f_none"], {"k": 4})
    with pytest.raises(InputError, match=r"no selected estimator takes parameter gamma \(selected: f_none, f_k; "
                                         r"f_k takes k\)"):
        prm.distribute(["f_none", "f_k"], {"k": 4, "gamma": 0.5})
    with pytest.raises(InputError, match="'f_kg': parameter k must be an integer"):
        prm.distribute(["f_none", "f_kg"], {"k": True})


def test_cap_to_vocab_caps_defaults_and_refuses_explicit_k():
    params, capped = prm.cap_to_vocab("vopd_topk", {"k": 16}, explicit=(), vocab=3)
    assert params == {"k": 3} and capped == [{"estimator": "vopd_topk", "param": "k", "default": 16, "used": 3}]
    assert prm.cap_to_vocab("vopd_topk", {"k": 2}, explicit=(), vocab=3) == ({"k": 2}, [])
    assert prm.cap_to_vocab("vopd_topk", {"k": 3}, explicit={"k"}, vocab=3) == ({"k": 3}, [])
    assert prm.cap_to_vocab("rtg", {"gamma": 0.5}, explicit={"gamma"}, vocab=3) == ({"gamma": 0.5}, [])
    for k in (4, 0):
        with pytest.raises(InputError, match=f"estimator 'vopd_topk': k must satisfy 1 <= k <= V = 3, got k={k}"):
            prm.cap_to_vocab("vopd_topk", {"k": k}, explicit={"k"}, vocab=3)
    with pytest.raises(InputError, match="got k=0"):          # a default below 1 is not capped upward
        prm.cap_to_vocab("vopd_topk", {"k": 0}, explicit=(), vocab=3)


def test_describe():
    assert prm.describe({"k": 4, "gamma": 0.5}) == "k=4, gamma=0.5"
    assert prm.describe({}) == "-"
