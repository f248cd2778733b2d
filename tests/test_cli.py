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


def test_exact_parameters_registry_defaults_capped_and_shown(capsys):
    from vopd_analysis import estimators as est
    default_k = est.get("vopd_topk").defaults["k"]
    assert default_k > 3
    code, out, _ = run(capsys, "exact", "--vocab", "3", "--horizon", "2", "--estimators", "opd,vopd_topk", "--json")
    result = json.loads(out)
    assert code == 0 and list(result["estimators"]) == ["opd", "vopd_topk"]
    assert result["params"] == {}
    assert result["estimators"]["vopd_topk"]["params"] == {**est.get("vopd_topk").defaults, "k": 3}
    assert result["estimators"]["opd"]["params"] == est.get("opd").defaults
    assert result["capped"] == [{"estimator": "vopd_topk", "param": "k", "default": default_k, "used": 3}]
    code, out, _ = run(capsys, "exact", "--vocab", "3", "--horizon", "2", "--estimators", "opd,vopd_topk")
    assert code == 0 and f"capped at V=3: vopd_topk (k={default_k})" in out
    assert "k=3" in next(line for line in out.splitlines() if line.startswith("vopd_topk "))


def test_exact_param_and_k_shorthand_agree(capsys):
    runs = []
    for extra in (("--k", "2"), ("--param", "k=2")):
        code, out, _ = run(capsys, "exact", "--vocab", "3", "--horizon", "2", "--estimators", "vopd_topk,topk_kl",
                           "--json", *extra)
        assert code == 0
        runs.append(json.loads(out))
    assert runs[0] == runs[1]
    assert runs[0]["capped"] == [] and runs[0]["params"] == {"k": 2}
    assert [row["params"]["k"] for row in runs[0]["estimators"].values()] == [2, 2]
    # k=2 and k=3 (the whole vocabulary) give different top-k baselines
    code, out, _ = run(capsys, "exact", "--vocab", "3", "--horizon", "2", "--estimators", "vopd_topk", "--json")
    assert json.loads(out)["estimators"]["vopd_topk"]["total_variance"] != \
        runs[0]["estimators"]["vopd_topk"]["total_variance"]


def test_mc_parameters_and_group_estimators(capsys):
    code, out, _ = run(capsys, "mc", "--vocab", "3", "--horizon", "2", "--estimator", "seq_rloo", "--param",
                       "group_size=2", "--samples", "50", "--json")
    result = json.loads(out)
    assert code == 0 and result["params"]["group_size"] == 2 and result["sequences_per_draw"] == 2
    code, out, _ = run(capsys, "mc", "--vocab", "3", "--horizon", "2", "--estimator", "vopd_topk", "--samples", "50")
    assert code == 0 and "vopd_topk (k=3" in out and "capped at V=3" in out


def test_parameter_errors_are_one_line(capsys):
    base = ("--vocab", "3", "--horizon", "2")
    for argv, needle in [(("exact", *base, "--estimators", "seq_rloo"), "'seq_rloo' is a group estimator"),
                         (("exact", *base, "--estimators", "opd,vopd_topk", "--param", "nonexistent=1"),
                          "no selected estimator takes parameter nonexistent"),
                         (("exact", *base, "--param", "k=2.5"), "parameter k must be an integer"),
                         (("exact", *base, "--param", "k"), "--param expects NAME=VALUE, got 'k'"),
                         (("exact", *base, "--k", "2", "--param", "k=3"), "--k 2 contradicts --param k=3"),
                         (("mc", *base, "--estimator", "vopd_topk", "--k", "4"), "1 <= k <= V = 3, got k=4"),
                         (("mc", *base, "--estimator", "seq_grpo", "--param", "scale_std=1"),
                          "parameter scale_std must be true or false"),
                         (("mc", *base, "--estimator", "vopd_topk", "--param", "nonexistent=1"), "unknown")]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("error:") and needle in err and err.count("\n") == 1, (argv, err)


def test_exact_dp_leaves_out_only_what_it_cannot_compute(capsys):
    from vopd_analysis import estimators as est
    results = {}
    for method in ("dp", "enumerate"):
        code, out, _ = run(capsys, "exact", "--vocab", "3", "--horizon", "2", "--method", method, "--json")
        assert code == 0
        results[method] = json.loads(out)
    dp, en = results["dp"], results["enumerate"]
    assert en["skipped"] == {} and list(en["estimators"]) == [e.name for e in est.REGISTRY.values() if not e.group]
    assert set(dp["estimators"]) | set(dp["skipped"]) == set(en["estimators"])
    for name in dp["skipped"]:
        assert est.get(name).credit_for(**en["estimators"][name]["params"]) is None, name
    for name, row in dp["estimators"].items():
        assert row["params"] == en["estimators"][name]["params"]
        assert np.allclose(row["mean_gradient"], en["estimators"][name]["mean_gradient"], atol=1e-13), name


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capsys):
    from vopd_analysis import cli, estimators_cli

    def interrupted(as_json):
        raise KeyboardInterrupt

    monkeypatch.setattr(estimators_cli, "print_registry", interrupted)
    assert cli.main(["estimators"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
