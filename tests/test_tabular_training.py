import numpy as np
import pytest

from synthetic.tree import make_tree
from vopd_analysis.errors import InputError
from vopd_analysis.tabular.training import train


@pytest.fixture(scope="module")
def tree():
    return make_tree(3, 2, coupling=0.5, seed=0)


def test_full_kl_small_lr_decreases_J(tree):
    r = train(tree, "full_kl", lr=0.5, steps=30, batch_size=8, seed=0, eval_every=10)
    assert r.stable and r.final_J < 0.5 * r.initial_J
    assert list(r.curve["step"]) == [0, 10, 20, 30]


def test_vopd_decreases_J(tree):
    r = train(tree, "vopd", lr=0.5, steps=40, batch_size=16, seed=0, eval_every=40)
    assert r.stable and r.final_J < r.initial_J


def test_diverging_lr_is_unstable(tree):
    r = train(tree, "full_kl", lr=1e4, steps=20, batch_size=8, seed=0, eval_every=1)
    assert not r.stable and r.diverged_at is not None and np.isnan(r.final_J)
    assert len(r.curve) == 21 and r.curve["J"].iloc[-1] != r.curve["J"].iloc[-1]  # padded with NaN


def test_same_seed_same_curve(tree):
    a = train(tree, "opd", lr=1.0, steps=15, batch_size=4, seed=3, eval_every=5)
    b = train(tree, "opd", lr=1.0, steps=15, batch_size=4, seed=3, eval_every=5)
    assert a.curve.equals(b.curve)


def test_estimator_params_are_checked(tree):
    with pytest.raises(InputError):
        train(tree, "no_such_estimator", lr=1.0, steps=1, batch_size=2, seed=0)
    with pytest.raises(InputError):
        train(tree, "opd", lr=1.0, steps=1, batch_size=2, seed=0, k=2)
