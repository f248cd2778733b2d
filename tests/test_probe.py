"""``vopd probe`` and the probe library (``vopd_analysis.lm.probe``) on the committed tiny pair."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from vopd_analysis import cli, records
from vopd_analysis import estimators as est
from vopd_analysis.errors import InputError
from vopd_analysis.lm import fused_score as fs
from vopd_analysis.lm import loading, presets, probe, variance
from vopd_analysis.lm import rollouts as ro
from vopd_analysis.lock import RunLock

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_pair():
    return loading.load_pair(*presets.PRESETS["tiny"].sources(None, False))


def test_plan_labels_parameters_and_refusals():
    planned = probe.plan(["vopd", "vopd_topk:k=2", "vopd_topk:k=4", "topk_kl"], vocab_size=16, topk=4)
    assert [p.label for p in planned] == ["opd", "vopd", "vopd_topk(k=2)", "vopd_topk(k=4)", "topk_kl"]
    assert [p.params.get("k") for p in planned] == [None, None, 2, 4, 4]         # the preset's k where none given
    assert probe.plan(["vopd_topk"], vocab_size=8)[1].params["k"] == 8           # a default above V is capped
    with pytest.raises(InputError, match="listed twice"):
        probe.plan(["vopd_topk:k=2", "vopd_topk:k=2"], vocab_size=16)
    with pytest.raises(InputError, match="k must satisfy 1 <= k <= V = 16"):
        probe.plan(["vopd_topk:k=32"], vocab_size=16)
    with pytest.raises(InputError, match="exact tabular quantities"):
        probe.plan(["rtg_oracle"], vocab_size=16)
    with pytest.raises(InputError, match="no estimator in --estimators takes parameter gamma"):
        probe.plan(["vopd"], vocab_size=16, common={"gamma": 0.5})


def test_verdict_names_the_lowest_variance_per_compute_among_unbiased():
    table = pd.DataFrame([
        {"estimator": "opd", "unbiased_for": "token", "efficiency_gmean": 1.0, "efficiency_low": 1.0, "efficiency_high": 1.0},
        {"estimator": "vopd", "unbiased_for": "token", "efficiency_gmean": 0.6, "efficiency_low": 0.5, "efficiency_high": 0.7},
        {"estimator": "opd_bstar", "unbiased_for": "token", "efficiency_gmean": 0.55, "efficiency_low": 0.45,
         "efficiency_high": 0.65},
        {"estimator": "topk_kl", "unbiased_for": "none", "efficiency_gmean": 0.01, "efficiency_low": 0.0,
         "efficiency_high": 0.02}])
    said = probe.verdict(table)
    assert (said["best"], said["runner_up"], said["intervals_overlap"]) == ("opd_bstar", "vopd", True)
    table.loc[2, ["efficiency_gmean", "efficiency_low", "efficiency_high"]] = [0.3, 0.2, 0.4]
    said = probe.verdict(table)
    assert said["best"] == "opd_bstar" and said["intervals_overlap"] is False and "do not overlap" in said["text"]


def test_select_parameters(tiny_pair):
    student = tiny_pair.student
    names = variance.select_parameters(student, "last:1")
    last = max(int(n.split(".")[2]) for n, _ in student.named_parameters() if n.startswith("model.layers."))
    assert names and all(n.startswith((f"model.layers.{last}.", "model.norm.", "lm_head.")) for n in names)
    assert any(n.startswith("model.norm.") for n in names)
    assert [n for n, p in student.named_parameters() if p.requires_grad] == names
    assert variance.select_parameters(student, "regex:norm") == [n for n, _ in student.named_parameters() if "norm" in n]
    everything = variance.select_parameters(student, "all")
    assert everything == [n for n, _ in student.named_parameters()]
    for spec, message in (("last:0", "N must be in 1"), ("last:x", "expected last:N"), ("regex:(", "bad regular"),
                          ("regex:nothing_here", "selects no parameter"), ("top", "expected all")):
        with pytest.raises(InputError, match=message):
            variance.select_parameters(student, spec)
    variance.select_parameters(student, "all")


def test_the_auto_path_depends_on_the_budget_not_on_where_responses_end(tiny_pair, monkeypatch):
    """A group whose responses all stop early (EOS) takes the path a full group takes: the choice reads
    rollouts x max_new_tokens. At the threshold exactly (N x V = AUTO_MIN_ELEMENTS) both go fused."""
    rollouts = ro.generate_rollouts(tiny_pair.student, tiny_pair.tokenizer, ["12+34="], 2, 8, seed=0,
                                    vocab_size=16)
    early = rollouts.select([0, 1])
    early.response_mask[:, early.prompt_width + 2:] = 0                      # every response ends after 2 tokens
    assert fs.planned_tokens(early, 8) == 2 * 8
    monkeypatch.setattr(fs, "AUTO_MIN_ELEMENTS", 2 * 8 * 16)
    calls = []
    real = fs.hidden_batch
    monkeypatch.setattr(fs, "hidden_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    named = variance.trainable_parameters(tiny_pair.student)
    list(variance.rollout_gradients(tiny_pair.student, tiny_pair.teacher, early, {"vopd": {}}, named, vocab_size=16,
                                    max_new_tokens=8))
    assert calls, "the fused path was not taken for a group at the threshold whose responses ended early"


def test_vopd_probe_command(tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["probe", "--preset", "tiny", "--num-batches", "2", "--num-prompts", "1", "--num-rollouts", "3",
            "--estimators", "opd,vopd,vopd_topk:k=2,vopd_topk:k=4,full_kl", "--params", "last:1", "--threads", "1",
            "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "lowest variance per unit of compute" in printed and "logits: materialised (scored 1 rollout(s) at a time" in printed
    summary = pd.read_csv(out / "probe.csv")
    assert list(summary["estimator"]) == ["opd", "vopd", "vopd_topk(k=2)", "vopd_topk(k=4)", "full_kl"]
    batches = pd.read_csv(out / "probe_batches.csv")
    for label, g in batches.groupby("estimator"):
        logs = np.log(g["variance_ratio_to_opd"].to_numpy())
        assert summary.set_index("estimator").loc[label, "ratio_gmean"] == pytest.approx(np.exp(logs.mean()))
    assert np.allclose(batches.loc[batches["estimator"] == "opd", "variance_ratio_to_opd"], 1.0)
    manifest = json.loads((out / "probe.json").read_text())
    assert manifest["verdict"]["best"] in {"vopd", "vopd_topk(k=2)", "vopd_topk(k=4)", "full_kl", "opd"}
    assert manifest["contrasts"] == []                  # labelled top-k estimators: none of the default contrasts
    assert manifest["parameters_probed"]["spec"] == "last:1"
    student = loading.load_pair(*presets.PRESETS["tiny"].sources(None, False)).student
    expected = sum(p.numel() for n in variance.select_parameters(student, "last:1") for m, p in student.named_parameters()
                   if m == n)
    assert manifest["parameters_probed"]["count"] == expected
    assert manifest["estimator_params"]["vopd_topk(k=4)"]["k"] == 4
    assert (out / "probe.png").stat().st_size > 0
    assert not (out / "probe_batches.partial").exists()                     # the resume folder, once written
    assert cli.main(args) == 2                                                # never overwrites a probe
    assert "already holds probe.json" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    ([], "give --preset NAME, or --student and --teacher"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--student", "a", "--teacher", "b"], "without --preset give --prompts"),
    (["--preset", "tiny", "--num-rollouts", "1"], "--num-rollouts must be >= 2"),
    (["--preset", "tiny", "--estimators", "nope"], "unknown estimator 'nope'"),
    (["--preset", "tiny", "--params", "last:9"], "N must be in 1..2"),
])
def test_vopd_probe_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert cli.main(["probe", *args, "--threads", "1", "--out", str(tmp_path / "p")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]          # after any model-loading progress bars
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "p").exists()


def test_too_few_prompts_in_a_file(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+2="}\n{"prompt": "3+4="}\n')
    student, teacher = presets.PRESETS["tiny"].sources(None, False)
    assert cli.main(["probe", "--student", student, "--teacher", teacher, "--prompts", str(prompts),
                     "--num-batches", "2", "--num-prompts", "2", "--out", str(tmp_path / "o")]) == 2
    assert "holds 2 prompts; 2 batches of 2 need 4" in capsys.readouterr().err


def test_labels_share_one_scoring(tiny_pair):
    """vopd_topk at two k on one scoring: at k = V it equals vopd to float32 round-off; the top-k fields are
    scored for the largest k and each label reads its own first k."""
    planned = probe.plan(["vopd", "vopd_topk:k=16", "vopd_topk:k=2"], vocab_size=16)
    config = {"num_rollouts": 3, "max_new_tokens": 6, "seed": 0, "num_projections": 0}
    rows, _, _ = probe.probe_batch(tiny_pair, planned, ["12+34=", "5+6="], config, batch=0)
    by = rows.set_index("estimator")
    assert by.loc["vopd_topk(k=16)", "trace_cov"] == pytest.approx(by.loc["vopd", "trace_cov"], rel=1e-5)  # float32
    assert by.loc["vopd_topk(k=2)", "trace_cov"] != pytest.approx(by.loc["vopd", "trace_cov"], rel=1e-6)
    assert est.get("vopd_topk").target({"k": 2}) == "token"
    torch.testing.assert_close(torch.tensor(by["num_rollouts"].to_numpy()), torch.full((4,), 6))


def test_per_rollout_scoring_gives_the_grouped_gradients(tiny_pair):
    """Scoring each rollout alone changes the work per backward, not the gradients (float32 round-off)."""
    rollouts = ro.generate_rollouts(tiny_pair.student, tiny_pair.tokenizer, ["12+34=", "5+67="], 3, 8, seed=1,
                                    vocab_size=16)
    named = variance.trainable_parameters(tiny_pair.student)
    params = {"opd": {}, "vopd": {}, "vopd_topk": {"k": 4}}

    def gradients(per_rollout):
        out = {}
        for name, g in variance.rollout_gradients(tiny_pair.student, tiny_pair.teacher, rollouts, params, named,
                                                  vocab_size=16, per_rollout=per_rollout):
            out.setdefault(name, []).append(g)
        return {name: torch.stack(g) for name, g in out.items()}
    grouped, alone = gradients(False), gradients(True)
    for name in params:
        error = (alone[name] - grouped[name]).norm(dim=1) / grouped[name].norm(dim=1)
        assert error.max() < 1e-5, (name, error)            # float32 sums in another order
    with pytest.raises(InputError, match="group estimators"):
        list(variance.rollout_gradients(tiny_pair.student, tiny_pair.teacher, rollouts, {"seq_rloo": {"group_size": 3}},
                                        named, vocab_size=16, per_rollout=True))


def test_parameter_check_compares_the_same_batches():
    from studies import llm_variance
    restricted = pd.DataFrame({"batch": [0, 0, 1, 1, 2, 2], "estimator": ["opd", "vopd"] * 3,
                               "variance_ratio_to_opd": [1.0, 0.5, 1.0, 0.6, 1.0, 0.7]})
    full = pd.DataFrame({"batch": [0, 0, 1, 1], "estimator": ["opd", "vopd"] * 2,
                         "variance_ratio_to_opd": [1.0, 0.4, 1.0, 0.6]})
    rows = llm_variance.parameter_check(restricted, full)
    assert [(r["batch"], r["estimator"]) for r in rows] == [(0, "vopd"), (1, "vopd")]     # batch 2: restricted only
    assert [r["restricted_over_all"] for r in rows] == pytest.approx([1.25, 1.0])


def test_vopd_probe_checks_its_out_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, message in ((str(tmp_path / "file"), "is a file, not a folder"), ("", "--out is empty"),
                         (str(tmp_path / "file" / "below"), "is a file, so the folder cannot be made")):
        assert cli.main(["probe", "--preset", "tiny", "--out", out]) == 2
        assert message in capsys.readouterr().err


def test_a_second_probe_on_the_same_outputs_is_refused_while_the_first_runs(tmp_path, capsys, monkeypatch):
    """``OUT/<name>.lock`` is held while a probe runs (here by this process, as a running probe would hold
    it): a second ``vopd probe`` with the same --out and --name is refused at once, naming the holder; another
    --name in the same folder is not locked out. After release the lock file is gone."""
    out = tmp_path / "p"
    out.mkdir()
    held = RunLock(out, "probe.lock", "vopd probe")
    held.acquire()
    try:
        assert cli.main(["probe", "--preset", "tiny", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "in use by another vopd probe" in err and f"pid {os.getpid()}" in err
        reached = []
        monkeypatch.setattr(probe, "_probe", lambda args, preset, folder, started: reached.append(args.name) or 0)
        assert cli.main(["probe", "--preset", "tiny", "--out", str(out), "--name", "other"]) == 0
        assert reached == ["other"] and not (out / "other.lock").exists()
    finally:
        held.release()
    assert not (out / "probe.lock").exists()


def test_a_killed_probe_resumes_from_its_stored_batches(tiny_pair, tmp_path, monkeypatch):
    """With a work folder every batch is stored; a rerun reads stored batches back (not probed again) and
    gives the tables of an uninterrupted probe; other settings in the same folder are refused by name."""
    planned = probe.plan(["vopd", "full_kl"], vocab_size=16)
    source = presets.PRESETS["tiny"].train_prompts
    config = {"num_batches": 3, "num_prompts": 1, "num_rollouts": 3, "max_new_tokens": 6, "seed": 0,
              "num_projections": 0, "parameters": "last:1", "per_rollout": True}
    whole = probe.run(tiny_pair, planned, config, source=source, progress=False)
    work = tmp_path / "batches"
    probe.run(tiny_pair, planned, {**config, "num_batches": 2, "work_dir": work}, source=source, progress=False)
    assert sorted(p.name for p in work.iterdir()) == ["batch-0000.json", "batch-0001.json"]     # killed after 2
    probed = []
    real = probe.probe_batch
    monkeypatch.setattr(probe, "probe_batch", lambda pair, plan, prompts, cfg, batch: probed.append(batch)
                        or real(pair, plan, prompts, cfg, batch))
    resumed = probe.run(tiny_pair, planned, {**config, "work_dir": work}, source=source, progress=False)
    assert probed == [2]
    cols = ["batch", "estimator", "variance_ratio_to_opd", "cosine_to_reference"]
    pd.testing.assert_frame_equal(resumed.per_batch[cols], whole.per_batch[cols], check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(resumed.layers, whole.layers, check_exact=False, rtol=1e-6)
    stored = probe.batch_from_json(records.read_stored_result(probe.batch_file(work, 0), probe.batch_key(
        {**config, "work_dir": work}, planned), "a stored probe batch"))
    assert stored[0]["trace_cov"].tolist() == resumed.per_batch.query("batch == 0")["trace_cov"].tolist()  # exact
    with pytest.raises(InputError, match=r"batch-0000.json was computed with other settings \(num_rollouts\)"):
        probe.run(tiny_pair, planned, {**config, "num_rollouts": 4, "work_dir": work}, source=source, progress=False)
