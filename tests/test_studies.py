"""Each study's core computation on a tiny configuration: CSV columns, determinism, key identities."""

import json

import numpy as np
import pandas as pd
import pytest

from studies import (
    baseline_quality,
    calibration,
    estimator_zoo,
    run_all,
    sequence_bias,
    topk,
    training_dynamics,
    unbiasedness,
    variance_landscape,
)
from synthetic.tree import make_tree
from vopd_analysis.tabular.baseline_quality import baseline_quality as quality

TINY = {
    "unbiasedness": (unbiasedness, {"envs": ["bandit", "tree_coupled"], "mc_samples": 3000},  # 300: too few for a verdict
                     ["env", "estimator", "claimed_target", "rel_bias_token", "rel_bias_sequence", "mc_p", "mc_reject"]),
    "test_calibration": (calibration, {"envs": ["bandit", "tree_coupled"], "ns": [300], "reps": 4,
                                       "group_ns": [300], "group_reps": 2, "biased": ["topk_kl"]},
                         ["env", "estimator", "n", "reject_rate", "inconclusive_rate", "reject_given_verdict"]),
    "variance_landscape": (variance_landscape, {"seeds": [0], "sweeps": {"divergence": [0.5, 2.0], "horizon": [1, 2]}},
                           ["knob", "value", "seed", "estimator", "total_variance", "ratio_to_opd"]),
    "baseline_quality": (baseline_quality, {"vocab": [3], "horizon": [2], "divergence": [1.0, 4.0],
                                            "teacher_temperature": [1.0], "coupling": [1.0],
                                            "teacher_shape": ["gaussian"], "seeds": [0, 1]},
                         ["var_none", "var_vopd", "var_bstar", "reduction_ratio", "explained_variance"]),
    "topk": (topk, {"vocab": 8, "horizon": 2, "zipf_exponent": [1.5], "divergence": [1.0], "ks": [1, 2, 8]},
             ["k", "var_vopd_topk", "fraction_kept", "topk_kl_bias_token", "vopd_topk_bias_token"]),
    "sequence_bias": (sequence_bias, {"vocab": 3, "horizon": 3, "coupling": [0.0, 1.0], "gammas": [0.0, 1.0],
                                      "batch_sizes": [1, 16], "seeds": [0]},
                      ["coupling", "estimator", "rel_bias_sequence", "total_variance", "mse_B1", "mse_B16"]),
    "training_dynamics": (training_dynamics, {"tree": {**training_dynamics.TREE, "vocab": 3, "horizon": 2},
                                              "estimators": {"full_kl": {}, "opd": {}}, "lrs": [1.0, 1e4],
                                              "steps": 10, "seeds": [0], "eval_every": 5},
                          ["estimator", "lr", "seed", "step", "J", "stable"]),
    "estimator_zoo": (estimator_zoo, {"grids": [{"base": "quick", "vocab": [3], "horizon": [2], "divergence": [1.0],
                                                 "teacher_temperature": [1.0], "coupling": [0.0, 1.0],
                                                 "teacher_shape": ["gaussian", "zipf"], "seeds": [0]}]},
                      ["estimator", "target", "cost", "rel_bias_token", "rel_bias_sequence", "total_variance",
                       "var_ratio", "mse_token_B1", "mse_sequence_B256", "crossover_token_regime"]),
}


@pytest.mark.parametrize("name", list(TINY))
def test_study_writes_reproducible_outputs(name, tmp_path):
    module, config, columns = TINY[name]
    df = module.run(quick=True, out_dir=tmp_path / "a", config=config, plot=(name != "training_dynamics"))
    module.run(quick=True, out_dir=tmp_path / "b", config=config, plot=False)
    first = (tmp_path / "a" / f"{name}.csv").read_bytes()
    assert first == (tmp_path / "b" / f"{name}.csv").read_bytes()
    assert set(columns) <= set(pd.read_csv(tmp_path / "a" / f"{name}.csv").columns)
    manifest = json.loads((tmp_path / "a" / f"{name}.json").read_text())
    assert {"config", "versions", "git", "wall_time_s"} <= set(manifest)
    assert {"torch", "numpy", "scipy", "pandas"} <= set(manifest["versions"])
    if name != "training_dynamics":
        assert (tmp_path / "a" / f"{name}.png").exists()
    assert len(df) > 0


def test_unbiasedness_claims_hold_exactly():
    df = unbiasedness.compute({**unbiasedness.DEFAULTS["quick"], **TINY["unbiasedness"][1]})
    claimed = df[df["claimed_target"] != "none"]
    assert (claimed["rel_bias_claimed"] < 1e-10).all()
    coupled = df[(df["env"] == "tree_coupled") & (df["estimator"] == "opd")].iloc[0]
    assert coupled["rel_bias_sequence"] > 0.05            # token-level OPD is biased against grad J
    assert df[df["estimator"] == "topk_kl"]["mc_reject"].all()


def test_counterexample_decomposition_matches_variances():
    states = baseline_quality.per_state(vocab=3, horizon=3, coupling=1.0, seed=1)
    q = quality(make_tree(3, 3, coupling=1.0, seed=1))
    assert q["var_baseline"] > q["var_no_baseline"] > q["var_optimal"]
    assert np.isclose(states["vopd_minus_none"].sum(), q["var_baseline"] - q["var_no_baseline"], atol=1e-12)
    assert np.isclose(states["gap_none"].sum(), q["var_no_baseline"] - q["var_optimal"], atol=1e-12)


def test_topk_full_k_recovers_vopd_and_removes_bias():
    df = topk.compute({**topk.DEFAULTS["quick"], **TINY["topk"][1]})
    full = df[df["k"] == 8].iloc[0]
    assert np.isclose(full["fraction_kept"], 1.0) and full["topk_kl_bias_token"] < 1e-10
    assert (df["vopd_topk_bias_token"] < 1e-10).all()   # a state baseline never adds bias
    assert np.isclose(df[df["k"] == 1]["fraction_kept"].iloc[0], 0.0)  # top-1 renormalised KL is 0


def test_sequence_bias_vanishes_without_coupling():
    df = sequence_bias.compute({**sequence_bias.DEFAULTS["quick"], **TINY["sequence_bias"][1]})
    assert (df[df["coupling"] == 0.0]["rel_bias_sequence"] < 1e-10).all()
    assert (df[df["estimator"] == "rtg_g1"]["rel_bias_sequence"] < 1e-10).all()
    coupled = df[(df["coupling"] == 1.0) & (df["estimator"] == "opd")].iloc[0]
    assert coupled["rel_bias_sequence"] > 0.05
    cross = sequence_bias.crossovers(df)
    assert np.isinf(cross[cross["coupling"] == 0.0]["crossover_B"]).all()


def test_training_summary_flags_unstable_lr():
    cfg = {**training_dynamics.DEFAULTS["quick"], **TINY["training_dynamics"][1]}
    table = training_dynamics.summary(training_dynamics.compute(cfg)).set_index("estimator")
    assert table.loc["full_kl", "largest_stable_lr"] == 1.0


def test_run_all_knows_every_study_module():
    import inspect
    import pathlib

    modules = {p.stem for p in pathlib.Path(run_all.__file__).parent.glob("*.py")}
    assert set(run_all.STUDIES) == modules - {"__init__", "cli", "common", "run_all"}
    assert {"unbiasedness", "llm_variance_gemma3", "distill_tuned"} <= set(run_all.STUDIES)
    for name in run_all.STUDIES:
        assert {"quick", "out_dir"} <= set(inspect.signature(run_all.study(name)).parameters)
    with pytest.raises(SystemExit, match="known studies"):
        run_all.study("bogus")


def test_every_study_declares_the_studies_it_reads():
    for name in run_all.STUDIES:
        reads = run_all.reads(name)
        assert isinstance(reads, tuple) and set(reads) <= set(run_all.STUDIES) - {name}, name
    from studies import vocab_effect
    files = [*vocab_effect.REAL.values(), vocab_effect.ENTROPY]
    assert {f.removesuffix(".csv").removesuffix("_entropy") for f in files} == set(vocab_effect.READS)


def test_a_study_reading_another_runs_after_it():
    for names in (run_all.STUDIES, run_all.STUDIES[::-1]):
        ordered = run_all.order(names)
        assert sorted(ordered) == sorted(names)
        for name in ordered:
            assert all(ordered.index(read) < ordered.index(name) for read in run_all.reads(name)), name
    assert run_all.order(run_all.STUDIES) == run_all.STUDIES     # already in a valid order: unchanged
    fake = {"a": ("c",), "b": (), "c": (), "d": ("a", "missing")}
    assert run_all.order(["a", "b", "c", "d"], fake.get) == ["b", "c", "a", "d"]   # stable otherwise
    with pytest.raises(SystemExit, match="cycle"):
        run_all.order(["a", "c"], {"a": ("c",), "c": ("a",)}.get)


def test_run_study_prints_report_and_writes_outputs(tmp_path, capsys):
    from studies import common

    defaults = {"quick": {"seeds": [3], "n": 2}, "full": {"seeds": [3], "n": 5}}
    drawn = []

    def figure(df, scale):
        import matplotlib.pyplot as plt
        drawn.append(scale)
        fig, ax = plt.subplots()
        ax.plot(df["x"] * scale)
        return fig

    def report(df, cfg):
        return common.Report(text=f"{len(df)} rows", extra={"total": int(df["x"].sum())}, figure_args=(10,),
                             markdown="# notes\n")

    compute = lambda cfg: (pd.DataFrame({"x": range(cfg["n"])}), {"timing": {"a": 1.0}})  # noqa: E731
    df = common.run_study("toy", defaults, compute, figure, report=report, quick=True, out_dir=tmp_path,
                          config={"n": 3})
    assert list(df["x"]) == [0, 1, 2] and drawn == [10]
    assert capsys.readouterr().out == "3 rows\n"
    manifest = json.loads((tmp_path / "toy.json").read_text())
    assert manifest["seed"] == [3] and manifest["config"]["n"] == 3
    assert manifest["total"] == 3 and manifest["timing"] == {"a": 1.0}
    assert (tmp_path / "toy.md").read_text() == "# notes\n" and (tmp_path / "toy.png").exists()

    common.run_study("bare", defaults, lambda cfg: pd.DataFrame({"x": [1]}), figure, quick=True,
                     out_dir=tmp_path, plot=False, seed="n")
    assert capsys.readouterr().out == "" and drawn == [10]
    assert not (tmp_path / "bare.png").exists() and not (tmp_path / "bare.md").exists()
    assert json.loads((tmp_path / "bare.json").read_text())["seed"] == 2


def test_estimator_zoo_numbers_on_a_tiny_tree():
    cfg = {**estimator_zoo.DEFAULTS["quick"],
           "grids": [{"base": "quick", "vocab": [3], "horizon": [3], "divergence": [1.0], "teacher_temperature": [1.0],
                      "coupling": [0.0, 1.0], "teacher_shape": ["gaussian"], "seeds": [1]}]}
    df, _ = estimator_zoo.compute(cfg)
    row = df.set_index(["coupling", "estimator"])
    for kappa in (0.0, 1.0):
        r = row.loc[kappa]
        assert r.loc["opd", "var_ratio"] == 1.0
        for name in ("opd", "vopd", "full_kl", "opd_bstar", "opd_bstar_topk", "vopd_topk", "k2"):
            assert r.loc[name, "rel_bias_token"] < 1e-10
            for B in (1, 16, 256):   # unbiased: the MSE is tr Cov / B
                assert np.isclose(r.loc[name, f"mse_token_B{B}"], r.loc[name, "total_variance"] / B, rtol=1e-12)
        assert r.loc["opd_bstar", "total_variance"] <= r.loc["vopd", "total_variance"]   # b* is optimal per state
        assert r.loc["k2", "crossover_token_regime"] == "tie"
        q = quality(make_tree(3, 3, coupling=kappa, seed=1))   # the baseline_quality engine agrees
        assert np.isclose(r.loc["opd", "total_variance"], q["var_no_baseline"], rtol=1e-10)
        assert np.isclose(r.loc["vopd", "total_variance"], q["var_baseline"], rtol=1e-10)
        assert np.isclose(r.loc["opd_bstar", "total_variance"], q["var_optimal"], rtol=1e-10)
        assert (r["rel_bias_claimed"].dropna() < 1e-10).all()
        for target in ("token", "sequence"):   # the MSE identity and the crossover B*
            x = r.loc["topk_kl"]
            assert np.isclose(x[f"mse_{target}_B16"], x[f"bias_sq_{target}"] + x["total_variance"] / 16, rtol=1e-12)
            if x[f"crossover_{target}_regime"] == "below":
                B = x[f"crossover_{target}_B"]
                o = r.loc["opd"]
                assert np.isclose(x[f"bias_sq_{target}"] + x["total_variance"] / B,
                                  o[f"bias_sq_{target}"] + o["total_variance"] / B, rtol=1e-9)
    assert row.loc[(0.0, "opd"), "rel_bias_sequence"] < 1e-10 and row.loc[(1.0, "opd"), "rel_bias_sequence"] > 0.01
    assert (row.loc[1.0].loc[["rtg", "seq_reinforce", "rb_seq", "rtg_vopd"], "rel_bias_sequence"] < 1e-10).all()
    # enumeration everywhere gives the same numbers as DP-where-possible
    enum, _ = estimator_zoo.compute({**cfg, "engine": "enumeration"})
    assert (enum["engine"] == "enumeration").all() and set(df["engine"]) == {"dp", "enumeration"}
    for col in ("total_variance", "bias_sq_token", "bias_sq_sequence"):
        assert np.allclose(enum[col], df[col], rtol=1e-9, atol=1e-18)
    table = estimator_zoo.summary(df)
    assert table.iloc[0]["group"] == "unbiased for g_tok"
    assert table.set_index("estimator").loc["opd", "var_ratio_median"] == 1.0


def test_estimator_zoo_trees_and_topk_sizes():
    quick = estimator_zoo.trees(estimator_zoo.DEFAULTS["quick"])
    whole = estimator_zoo.trees({"grids": [{"base": "quick"}]})
    assert len(whole) == 540 and len(quick) == 420     # V = 32 thinned to seed 0
    assert {t["teacher_shape"] for t in quick} == {"gaussian", "zipf"} and {t["coupling"] for t in quick} == {0.0, 1.0}
    cfg = estimator_zoo.DEFAULTS["quick"]
    assert [estimator_zoo.topk_size(16, V, cfg) for V in (3, 8, 16, 32, 64, 128)] == [2, 2, 4, 8, 16, 16]
    assert estimator_zoo.topk_size(100, 64, cfg) == 16
    labels = estimator_zoo.specs(8, cfg)
    assert labels["opd[rho=0.5]"] == {"name": "opd", "rho": 0.5} and "seq_rloo" not in labels


def test_run_all_compares_fresh_tables_with_the_committed_ones(tmp_path):
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text("name,x,tiny\na,1.0,1e-15\nb,2.0,0\n")
    new.write_text("name,x,tiny\na,1.0,1e-15\nb,2.0,0\n")
    assert run_all.compare_table(new, old) == "identical"
    new.write_text("name,x,tiny\na,1.0,2e-15\nb,2.2,0\n")
    assert run_all.compare_table(new, old) == ("same shape, max diff 0.1 of the column's scale (in x); "
                                               "round-off in tiny")                # tiny: 1e-15 against 2e-15
    new.write_text("name,x,tiny\na,1.0,1e-15\nb,2.0,0\nc,3.0,0\n")
    assert run_all.compare_table(new, old) == "rows 2 committed -> 3 now"
    new.write_text("name,y\na,1\n")
    assert run_all.compare_table(new, old).startswith("columns differ")
    new.write_text("name,x,tiny\nA,1.0,1e-15\nb,2.0,0\n")
    assert run_all.compare_table(new, old) == "same shape, text columns differ"
    assert run_all.compare_table(new, tmp_path / "missing.csv") == "no committed table"
    assert run_all.compare(tmp_path, tmp_path) == [("new.csv", "identical"), ("old.csv", "identical")]


def test_manifest_dirty_flag_counts_tracked_code_only(tmp_path, monkeypatch):
    import subprocess

    from studies import common

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "figures").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "figures" / "t.csv").write_text("a\n1\n")
    git("add", ".")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "init")
    monkeypatch.setattr(common, "REPO", tmp_path)
    assert common.git_revision()["dirty"] is False
    (tmp_path / "scratch.txt").write_text("untracked\n")
    (tmp_path / "figures" / "t.csv").write_text("a\n2\n")                  # an output rewritten by a study
    assert common.git_revision()["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.git_revision()["dirty"] is True


def test_pair_statistics_bins_states_by_teacher_entropy(tmp_path, one_thread):
    """The tiny pair alone: one row of means, and per batch and entropy bin the sums of the exact one-token
    score variance, b* never above vOPD's baseline or none (it is their minimiser)."""
    from studies import pair_statistics
    config = {"pairs": ["tiny"], "num_batches": 2, "num_prompts": 2, "num_rollouts": 2}
    df = pair_statistics.run(quick=True, out_dir=tmp_path, config=config, plot=False)
    assert list(df["pair"]) == ["tiny"] and df["vocab_size"].item() == 16
    bins = pd.read_csv(tmp_path / "pair_statistics_entropy.csv")
    assert set(bins["batch"]) == {0, 1} and (bins["states"] >= 0).all()
    per_batch = json.loads((tmp_path / "pair_statistics.json").read_text())["per_batch"]
    assert bins.groupby("batch")["states"].sum().tolist() == [r["tokens"] for r in per_batch]   # every state binned
    assert (bins["bstar"] <= bins[["opd", "vopd"]].min(axis=1) + 1e-9).all()


def test_pair_statistics_resumes_from_stored_batches(tmp_path, one_thread, monkeypatch):
    """With a work folder each (pair, batch) is stored; a rerun reads them back instead of sampling again and
    writes the same tables."""
    from studies import pair_statistics
    config = {"pairs": ["tiny"], "num_batches": 2, "num_prompts": 2, "num_rollouts": 2, "work_dir": str(tmp_path / "w")}
    pair_statistics.run(quick=True, out_dir=tmp_path / "a", config=config, plot=False)
    assert sorted(p.name for p in (tmp_path / "w" / "tiny").iterdir()) == ["batch-0000.json", "batch-0001.json"]
    monkeypatch.setattr(pair_statistics, "batch_statistics", lambda *a: pytest.fail("a stored batch was recomputed"))
    pair_statistics.run(quick=True, out_dir=tmp_path / "b", config=config, plot=False)
    for name in ("pair_statistics.csv", "pair_statistics_entropy.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
