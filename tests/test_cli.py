"""The vopd command: JSON shape, errors as one line with exit status 2."""

import json

import numpy as np

from synthetic.tree import make_tree
from vopd_analysis import cli
def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_estimators_listing(capsys):
    code, out, _ = run(capsys, "estimators", "--json")
    names = [row["name"] for row in json.loads(out)]
    assert code == 0 and "vopd" in names and "topk_kl" in names


def test_exact_from_tables_json(capsys, tmp_path):
    tree = make_tree(3, 2, coupling=1.0, seed=0)
    path = tmp_path / "t.npz"
    np.savez(path, student_logits=tree.student_logits, teacher_logits=tree.teacher_logits)
    code, out, _ = run(capsys, "exact", "--tables", str(path), "--horizon", "2", "--k", "2", "--json")
    result = json.loads(out)
    assert code == 0
    assert isinstance(result["sequence_kl"], float)
    row = result["estimators"]["vopd"]
    assert len(row["mean_gradient"]) == tree.num_states * 3
    assert row["bias_token"] < 1e-12 < row["bias_sequence"]
    assert set(row) >= {"mean_gradient", "total_variance", "bias_token", "bias_sequence"}


def test_exact_generated_and_mc_text(capsys):
    code, out, _ = run(capsys, "exact", "--vocab", "3", "--horizon", "2", "--coupling", "0.5")
    assert code == 0 and "vopd" in out
    code, out, _ = run(capsys, "mc", "--vocab", "3", "--horizon", "2", "--estimator", "vopd", "--samples", "500",
                       "--json")
    assert code == 0 and json.loads(out)["test_token"]["p_value"] >= 0


def test_errors_are_one_line(capsys, tmp_path):
    for argv, needle in [(("exact", "--vocab", "3", "--horizon", "2", "--k", "4"), "1 <= k <= V"),
                         (("exact", "--vocab", "40", "--horizon", "6"), "Monte Carlo"),
                         (("exact", "--tables", str(tmp_path / "no.npz"), "--horizon", "2"), "no such"),
                         (("exact", "--vocab", "3", "--horizon", "2", "--estimators", "opd,bogus"), "known estimators"),
                         (("mc", "--vocab", "3", "--horizon", "2", "--estimator", "bogus"), "known estimators"),
                         (("study", "bogus"), "no study")]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("error:") and needle in err, (argv, err)
