"""The committed tiny pair is what every machine loads, and the committed real-model tables reproduce.

Tolerance: the tables are recomputed here with one torch thread, from the committed weights,
and compared with the committed CSVs at a relative tolerance of 1e-4 (absolute 1e-9).
Sampling and greedy decoding are discrete, so any change that moves a sampled token shows up
far above that; what the tolerance absorbs is float32 round-off of matrix products, which
differs between CPU kernel families (AVX2 / AVX-512, the manifests' ``machine`` entry) at
about 1e-7 relative and reaches the float64 variance traces amplified by at most a few
hundred.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from studies import common, distill_tiny, llm_variance
from vopd_analysis import InputError
from vopd_analysis.lm import loading, tiny

RTOL, ATOL = 1e-4, 1e-9
FIGURES = common.REPO / "figures"


def test_committed_pair_matches_its_card():
    card = tiny.verify_pair()
    assert {"student/model.safetensors", "teacher/model.safetensors"} <= set(card["files"])
    assert card["teacher"]["eval_accuracy"] > card["student"]["eval_accuracy"]
    student, teacher, tokenizer = tiny.load_or_train_pair(verbose=False)
    assert student.startswith(str(tiny.COMMITTED)) and len(tokenizer) == 16


def test_tampered_or_missing_weights_name_the_file(tmp_path):
    pair = tmp_path / "pair"
    shutil.copytree(tiny.COMMITTED, pair)
    expected = tiny.verify_pair(pair)["files"]["teacher/model.safetensors"]
    with open(pair / "teacher" / "model.safetensors", "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(InputError, match=f"teacher/model.safetensors has sha256 .*, expected {expected}"):
        tiny.verify_pair(pair)
    (pair / "student" / "model.safetensors").unlink()
    shutil.copy(tiny.COMMITTED / "teacher" / "model.safetensors", pair / "teacher" / "model.safetensors")
    with pytest.raises(InputError, match="student/model.safetensors is missing"):
        tiny.verify_pair(pair)
    (pair / tiny.CARD).unlink()
    with pytest.raises(InputError, match="card .* is missing"):
        tiny.verify_pair(pair)


def _assert_frames_close(new: pd.DataFrame, committed: pd.DataFrame):
    assert list(new.columns) == list(committed.columns)
    assert len(new) == len(committed)
    for col in new.columns:
        if pd.api.types.is_numeric_dtype(committed[col]):
            np.testing.assert_allclose(new[col].to_numpy(float), committed[col].to_numpy(float), rtol=RTOL,
                                       atol=ATOL, err_msg=col)
        else:
            assert (new[col].astype(str) == committed[col].astype(str)).all(), col


def test_llm_variance_reproduces_committed_batches(tmp_path):
    """The first two of the committed quick run's prompt batches, recomputed from scratch."""
    llm_variance.run(quick=True, out_dir=tmp_path, config={"num_batches": 2}, plot=False)
    new = pd.read_csv(tmp_path / "llm_variance_batches.csv")
    committed = pd.read_csv(FIGURES / "llm_variance_batches.csv")
    _assert_frames_close(new, committed[committed["batch"] < 2].reset_index(drop=True))


def test_distill_tiny_reproduces_committed_run():
    """One (estimator, seed) run of the committed quick table: the training loop is deterministic too."""
    config = {**distill_tiny.DEFAULTS["quick"], "estimators": {"vopd": {}}, "seeds": [1]}
    table, _ = distill_tiny.compute(config)
    committed = pd.read_csv(FIGURES / "distill_tiny.csv")
    committed = committed[(committed["estimator"] == "vopd") & (committed["seed"] == 1)].reset_index(drop=True)
    _assert_frames_close(table, committed)


def test_variance_training_probes_each_checkpoint(tmp_path):
    """A 4-step run with checkpoints at 2 and 4: every estimator probed at steps 0, 2, 4 on the same rollouts."""
    from studies import variance_training
    probe = {**variance_training.PROBE, "num_prompts": 2, "num_rollouts": 3}
    config = {"steps": 4, "checkpoint_every": 2, "num_batches": 2, "prompts_per_step": 4, "probe": probe}
    df = variance_training.run(quick=True, out_dir=tmp_path, config=config)
    assert sorted(set(df["step"])) == [0, 2, 4] and set(df["run"]) == {"vopd"}
    opd = df[df["estimator"] == "opd"]
    assert np.allclose(opd["ratio_gmean"], 1.0) and (df["batches"] == 2).all()
    # step 0 is the committed student: the same numbers as llm_variance's probe of the same batches
    student, teacher, _ = tiny.load_or_train_pair(verbose=False)
    pair = loading.load_pair(student, teacher)
    rows = pd.concat([llm_variance.probe_batch(pair, {**probe, "num_batches": 2}, b)[0] for b in range(2)])
    start = df[(df["step"] == 0) & (df["estimator"] == "vopd")]["ratio_gmean"].item()
    ratios = rows.loc[rows["estimator"] == "vopd", "variance_ratio_to_opd"]
    assert start == pytest.approx(np.exp(np.log(ratios).mean()), rel=1e-12)
    later = df[(df["step"] == 4) & (df["estimator"] == "vopd")]["ratio_gmean"].item()
    assert later != start                                # the checkpoints are other models
    assert (tmp_path / "variance_training.png").stat().st_size > 0


def test_vocab_effect_reads_the_four_pairs_and_names_a_missing_table(tmp_path):
    from studies import vocab_effect
    config = {"vocab": [2, 4], "seeds": [0]}
    with pytest.raises(InputError, match="llm_variance.csv is missing"):
        vocab_effect.run(quick=True, out_dir=tmp_path, config=config, plot=False)
    for name in vocab_effect.REAL.values():
        for suffix in (".csv", "_batches.csv", ".json"):
            shutil.copy(FIGURES / name.replace(".csv", suffix), tmp_path / name.replace(".csv", suffix))
    with pytest.raises(InputError, match="pair_statistics_entropy.csv is missing"):
        vocab_effect.run(quick=True, out_dir=tmp_path, config=config, plot=False)
    shutil.copy(FIGURES / vocab_effect.ENTROPY, tmp_path / vocab_effect.ENTROPY)
    df = vocab_effect.run(quick=True, out_dir=tmp_path, config=config)
    tab = df[df["source"] == "tabular (exact)"].set_index(["vocab", "estimator"])["ratio"]
    assert tab[(2, "vopd")] > 1 > tab[(2, "full_kl")]          # the exact V=2 values of variance_landscape
    tiny = pd.read_csv(FIGURES / "llm_variance.csv").set_index("estimator")
    real = df[(df["vocab"] == 16) & df["source"].str.startswith("real pair")].set_index("estimator")
    assert real.loc["vopd", "ratio"] == tiny.loc["vopd", "ratio_gmean"]
    assert set(df["vocab"]) == {2, 4, 16, 8192, 49152, 262144}
    bins = pd.read_csv(FIGURES / vocab_effect.ENTROPY)
    g = bins[(bins["pair"] == "gemma3") & (bins["low"] == 3.0)]
    row = df[(df["pair"] == "gemma3") & (df["estimator"] == "vopd") & df["source"].str.contains(r"\[3, 4.5\)")]
    assert row["ratio"].item() == pytest.approx(np.exp(np.log(g["vopd"] / g["opd"]).mean()))
    contrasts = json.loads((tmp_path / "vocab_effect.json").read_text())["contrasts"]
    assert {(c["numerator"], c["denominator"]) for c in contrasts} == {
        ("small", "tiny"), ("smollm2", "tiny"), ("smollm2", "small"), ("gemma3", "tiny"), ("gemma3", "smollm2")}


def test_detectable_difference_closed_form():
    """(t_{0.975,n-1} + t_{0.8,n-1}) sd / sqrt(n): n = 4, sd = 1 gives (3.1824 + 0.9785) / 2."""
    from vopd_analysis import stats
    d = np.array([-1.0, 1.0, -1.0, 1.0]) * np.sqrt(3) / 2          # sample sd exactly 1
    assert stats.detectable_difference(d) == pytest.approx((3.182446 + 0.978472) / 2, rel=1e-5)
    assert np.isnan(stats.detectable_difference([0.3]))
