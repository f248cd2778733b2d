"""studies.run_all.compare_table: columns that differ by float round-off only are reported as round-off."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from studies import run_all


def test_round_off_columns_are_named_as_such(tmp_path):
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text("name,x,tiny\na,1.0,1e-15\nb,2.0,0\n")
    new.write_text("name,x,tiny\na,1.0,2e-15\nb,2.0,0\n")
    assert run_all.compare_table(new, old) == "same shape, round-off only (in tiny)"
    new.write_text("name,x,tiny\na,1.0,2e-15\nb,2.2,0\n")
    assert run_all.compare_table(new, old) == "same shape, max diff 0.1 of the column's scale (in x); round-off in tiny"
    new.write_text("name,x,tiny\na,1.0,2e-9\nb,2.0,0\n")                # above the floor: a real difference
    assert run_all.compare_table(new, old) == "same shape, max diff 2e+06 of the column's scale (in tiny)"
    new.write_text("name,x,tiny\na,1.00,1e-15\nb,2.0,0.0\n")            # other bytes, same values
    assert run_all.compare_table(new, old) == "same shape, same values"


def test_the_committed_unbiasedness_table_with_round_off_moved(tmp_path):
    """k1's exact mean gradient is the zero vector: its relative biases are 1e-16 and its cosine has no
    direction; moving both (as another CPU does) is round-off, moving another estimator's cosine is not."""
    table = pd.read_csv(Path(run_all.__file__).resolve().parents[1] / "figures" / "unbiasedness.csv")
    old, new = tmp_path / "old" / "unbiasedness.csv", tmp_path / "new" / "unbiasedness.csv"
    old.parent.mkdir()
    new.parent.mkdir()
    table.to_csv(old, index=False)
    moved = table.copy()
    k1 = moved["estimator"] == "k1"
    moved.loc[k1, "cos_sequence"] = -moved.loc[k1, "cos_sequence"]
    moved.loc[k1, "rel_bias_claimed"] *= 2
    moved.to_csv(new, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # compare_table warns about nothing
        assert run_all.compare_table(new, old) == "same shape, round-off only (in rel_bias_claimed, cos_sequence)"
        moved.loc[moved["estimator"] == "opd", "cos_sequence"] *= 0.5
        moved.to_csv(new, index=False)
        assert run_all.compare_table(new, old).startswith("same shape, max diff")
        with np.errstate(all="raise"):
            moved.loc[0, "total_variance"] = np.inf
            table.loc[0, "total_variance"] = np.inf
            moved.to_csv(new, index=False)
            table.to_csv(old, index=False)
            assert run_all.compare_table(new, old).startswith("same shape, max diff")
