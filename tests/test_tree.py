"""Prefix-tree layout, construction from arrays and .npz, and the coupling knob."""

import numpy as np
import pytest
import torch

from synthetic.tree import from_arrays, from_npz, make_tree, num_states
from vopd_analysis import InputError
from vopd_analysis.tabular import targets


def test_state_layout_is_level_by_level_lexicographic():
    tree = make_tree(2, 3, seed=0)
    assert tree.num_states == num_states(2, 3) == 7
    tokens = torch.tensor([[0, 0, 0], [1, 0, 1], [1, 1, 0]])
    assert tree.state_ids(tokens).tolist() == [[0, 1, 3], [0, 2, 5], [0, 2, 6]]
    assert tree.sequences().tolist()[:3] == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]


def test_npz_round_trip_and_errors(tmp_path):
    tree = make_tree(3, 2, seed=4)
    path = tmp_path / "tables.npz"
    np.savez(path, student_logits=tree.student_logits, teacher_logits=tree.teacher_logits)
    loaded = from_npz(str(path), horizon=2)
    assert np.array_equal(loaded.student_logits, tree.student_logits)
    with pytest.raises(InputError, match=r"\[13, 3\]"):
        from_npz(str(path), horizon=3)
    bad = tree.teacher_logits.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        from_arrays(tree.student_logits, bad, 2)
    np.savez(tmp_path / "partial.npz", student_logits=tree.student_logits)
    with pytest.raises(InputError, match="teacher_logits"):
        from_npz(str(tmp_path / "partial.npz"), 2)
    with pytest.raises(InputError, match="no such"):
        from_npz(str(tmp_path / "missing.npz"), 2)


def test_knobs():
    flat = targets.tree_quantities(make_tree(3, 3, coupling=0.0, seed=1))
    assert torch.allclose(flat.next_kl_to_go[:4], flat.next_kl_to_go[:4, :1].expand(-1, 3))
    same = make_tree(3, 2, divergence=0.0, seed=1)
    assert targets.tree_quantities(same).sequence_kl < 1e-15
    hot = targets.tree_quantities(make_tree(8, 1, teacher_shape="zipf", teacher_temperature=4.0, seed=0))
    cold = targets.tree_quantities(make_tree(8, 1, teacher_shape="zipf", teacher_temperature=0.5, seed=0))
    entropy = lambda tq: float(-(tq.log_p.exp() * tq.log_p).sum())
    assert entropy(hot) > entropy(cold)
    with pytest.raises(InputError, match="teacher shape"):
        make_tree(3, 2, teacher_shape="pareto")
    with pytest.raises(InputError, match="at least 2"):
        make_tree(1, 2)
