"""Comparing runs: summary.json of a run, the statistics of compare, vopd compare and vopd sweep."""

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from vopd_analysis import cli
from vopd_analysis.distill import checkpoint as ckpt
from vopd_analysis.distill import compare, sweep
from vopd_analysis.distill.metrics import Metrics
from vopd_analysis.errors import InputError
from vopd_analysis.lm import tiny
from vopd_analysis.lock import LOCK, RunLock

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tiny.save_random_pair(tmp_path_factory.mktemp("pair"))


def options(pair, **overrides):
    """vopd distill options for two fast steps on the random pair, evaluated at every step."""
    opts = {"student": pair[0], "teacher": pair[1], "steps": 2, "prompts_per_step": 4, "rollouts_per_prompt": 2,
            "num_eval": 8, "eval_every": 1, "save_every": 1, "lr": 0.01, **overrides}
    return [x for key, value in opts.items() for x in (f"--{key.replace('_', '-')}", str(value))]


def read_rows(run, kind):
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def call(*argv):
    """cli.main(argv) -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- summary.json

def test_run_writes_summary_and_says_where(pair, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "run"
    code, printed, _ = call("distill", *options(pair, estimator="vopd_topk", k=4, out=out))
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    evals = read_rows(out, "eval")
    assert summary["label"] == "vopd_topk-k4" and summary["estimator"] == "vopd_topk"
    assert summary["estimator_params"] == {"k": 4, "rho": 1.0} and summary["seed"] == 0
    assert summary["steps_done"] == 2 and summary["skipped_steps"] == 0 and summary["resumed_from_step"] == 0
    assert summary["first_eval"] == {k: evals[0][k] for k in ("step", "eval_accuracy", "eval_reverse_kl",
                                                                "eval_teacher_logprob")}
    assert summary["last_eval"]["step"] == 2 and summary["last_eval"]["eval_reverse_kl"] == evals[-1]["eval_reverse_kl"]
    assert summary["wall_seconds"] > summary["train_seconds"] > 0
    assert "nats" in summary["units"]["eval_reverse_kl"] and "nats" in summary["units"]["eval_teacher_logprob"]
    assert all(r["eval_teacher_logprob"] < 0 for r in evals)
    assert summary["config"] == {**json.loads((out / "config.json").read_text()), "max_new_tokens": 8}
    for key in ("metrics_jsonl", "metrics_csv", "curves_png", "final_model"):
        assert Path(summary[key]).exists(), key
    assert Path(summary["curves_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))
    last = printed.strip().splitlines()[-9:]    # done, the table (header and 3 rows), then 4 paths
    assert last[0].startswith("done: vopd_topk-k4 seed 0, 2 steps")
    assert last[1].split() == ["held-out", "eval", "step", "0", "step", "2", "unit"]
    first, final = summary["first_eval"], summary["last_eval"]
    assert last[2].split()[:4] == ["greedy", "accuracy", f"{first['eval_accuracy']:.3f}", f"{final['eval_accuracy']:.3f}"]
    assert last[3].split()[:4] == ["reverse", "KL", f"{first['eval_reverse_kl']:.4g}", f"{final['eval_reverse_kl']:.4g}"]
    assert "nats per sequence" in last[3] and "nats per token" in last[4] and "fraction" in last[2]
    assert last[5] == f"run:     {out}" and str(out / "metrics.jsonl") in last[6]
    assert str(out / "summary.json") in last[7] and str(out / "curves.png") in last[8]

    # continued to more steps: unfinished (no summary) while it runs, then a new summary
    real_log, seen = Metrics.log, []
    monkeypatch.setattr(Metrics, "log", lambda self, row: (seen.append((out / "summary.json").exists()),
                                                                real_log(self, row)))
    assert call("distill", "--out", out, "--steps", 3, "--resume")[0] == 0
    assert seen and not any(seen)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 3 and summary["resumed_from_step"] == 2 and summary["last_eval"]["step"] == 3


# ----------------------------------------------------------------------------- statistics

def t_quantile(p, df):
    """Student-t quantiles in closed form: Cauchy for 1 degree of freedom, and df = 2."""
    return {1: math.tan(math.pi * (p - 0.5)), 2: (2 * p - 1) / math.sqrt(2 * p * (1 - p))}[df]


def test_mean_interval_by_hand():
    mean, low, high = compare.mean_interval([1.0, 2.0, 3.0])            # s = 1, n = 3
    half = t_quantile(0.975, 2) / math.sqrt(3)
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-12)
    mean, low, high = compare.mean_interval([1.0, 3.0], confidence=0.9)  # s = sqrt 2, n = 2
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - t_quantile(0.95, 1), 2.0 + t_quantile(0.95, 1)))
    mean, low, high = compare.mean_interval([0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high)


def test_paired_difference_by_hand_and_against_scipy():
    d = compare.paired_difference([1.0, 4.0], [0.0, 1.0])   # d = (1, 3): mean 2, sd sqrt 2, t = 2 on 1 df
    assert d["n"] == 2 and d["mean"] == 2.0
    assert (d["low"], d["high"]) == pytest.approx((2 - t_quantile(0.975, 1), 2 + t_quantile(0.975, 1)))
    assert d["p_value"] == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, rel=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=6), rng.normal(0.5, size=6)
    d = compare.paired_difference(a, b)
    assert d["p_value"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-10)
    assert (d["mean"], d["low"], d["high"]) == pytest.approx(compare.mean_interval(a - b))


def test_summary_table_pairs_by_seed():
    def rows(label, seeds, finals):
        return [{"estimator": label.split("-")[0], "label": label, "seed": s, "step": step, "eval_accuracy": acc,
                 "eval_reverse_kl": 10 - acc, "run": f"{label}-{s}"}
                for s, final in zip(seeds, finals) for step, acc in ((0, 0.1), (5, final))]

    df = pd.DataFrame(rows("vopd", [0, 1, 2], [0.5, 0.6, 0.9]) + rows("opd", [0, 1], [0.4, 0.45]))
    table = compare.summary_table(df)
    assert list(table["label"]) == ["opd", "vopd"] and table.attrs["reference"] == "opd"
    vopd = table.iloc[1]
    assert vopd["seeds"] == 3 and vopd["step"] == 5 and vopd["eval_accuracy_pairs"] == 2
    assert vopd["eval_accuracy_mean"] == pytest.approx(2.0 / 3)
    expected = compare.paired_difference([0.5, 0.6], [0.4, 0.45])
    assert vopd["eval_accuracy_diff"] == pytest.approx(0.125)
    assert vopd["eval_accuracy_p"] == pytest.approx(expected["p_value"])
    assert vopd["eval_reverse_kl_diff"] == pytest.approx(-0.125)
    assert math.isnan(table.iloc[0]["eval_accuracy_diff"])
    assert compare.summary_table(df, reference="vopd").attrs["reference"] == "vopd"
    with pytest.raises(InputError, match="not among the runs"):
        compare.summary_table(df, reference="full_kl")
    assert "minus opd" in compare.format_table(table)


# ----------------------------------------------------------------------------- sweep and compare

SWEEP = ("--estimators", "opd,vopd_topk:k=4", "--seeds", "0,1")


@pytest.fixture(scope="module")
def swept(pair, tmp_path_factory):
    """A 2 x 2 sweep interrupted in its third run (opd seed 1, after step 1's checkpoint), then called again."""
    out = tmp_path_factory.mktemp("sweep") / "sw"
    argv = ("sweep", *SWEEP, *options(pair, out=out))
    real_log = Metrics.log

    def die_in_opd_seed1(self, row):
        real_log(self, row)
        if self.path.parent.name == "opd-seed1" and row["kind"] == "train" and row["step"] == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Metrics, "log", die_in_opd_seed1)
        interrupted = call(*argv)
    assert interrupted[0] == 130 and interrupted[2].endswith("interrupted\n")   # one line, no traceback
    before = {"finished": sorted(p.parent.name for p in out.glob("*/summary.json")),
              "opd-seed1": read_rows(out / "opd-seed1", "train"), "plan": json.loads((out / "sweep.json").read_text())}
    second = call(*argv)
    return out, argv, before, second


def test_sweep_resumes_an_interrupted_run(swept, one_thread):
    out, _, before, (code, printed, _) = swept
    assert before["finished"] == ["opd-seed0", "vopd_topk-k4-seed0"]
    assert [r["folder"] for r in before["plan"]["runs"]] == ["opd-seed0", "vopd_topk-k4-seed0", "opd-seed1",
                                                             "vopd_topk-k4-seed1"]
    assert before["plan"]["seeds"] == [0, 1] and before["plan"]["config"]["steps"] == 2
    assert code == 0
    assert "skip opd-seed0: finished" in printed and "skip vopd_topk-k4-seed0: finished" in printed
    assert "resume opd-seed1" in printed and "start vopd_topk-k4-seed1" in printed
    assert sorted(p.parent.name for p in out.glob("*/summary.json")) == [
        "opd-seed0", "opd-seed1", "vopd_topk-k4-seed0", "vopd_topk-k4-seed1"]
    resumed = read_rows(out / "opd-seed1", "train")
    assert [r["step"] for r in resumed] == [1, 2] and resumed[0] == before["opd-seed1"][0]
    assert json.loads((out / "opd-seed1" / "summary.json").read_text())["resumed_from_step"] == 1
    assert "minus opd" in printed and (out / "compare.png").is_file()


def test_sweep_called_again_skips_everything(swept, one_thread):
    out, argv, _, _ = swept
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    code, printed, _ = call(*argv)
    assert code == 0 and printed.count("skip ") == 4 and " start " not in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
    code, _, err = call(*argv, "--lr", 0.02)        # another learning rate: refused before anything runs
    assert code == 2 and err.startswith("error: cannot resume") and "opd-seed0" in err and "lr" in err


def test_compare_two_runs_table_plot_csv_json(swept, tmp_path, one_thread):
    out = swept[0]
    runs = [out / "opd-seed0", out / "vopd_topk-k4-seed0"]
    code, printed, _ = call("compare", *runs, "--plot", tmp_path / "c.png", "--csv", tmp_path / "c.csv")
    assert code == 0
    assert "opd" in printed and "vopd_topk-k4" in printed and "nats" in printed and "minus opd" in printed
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(tmp_path / "c.csv")
    assert list(table["label"]) == ["opd", "vopd_topk-k4"] and list(table["seeds"]) == [1, 1]
    final = read_rows(out / "vopd_topk-k4-seed0", "eval")[-1]["eval_reverse_kl"]
    assert table["eval_reverse_kl_mean"][1] == pytest.approx(final)
    code, printed, _ = call("compare", out, "--json", "--reference", "vopd_topk", "--plot", tmp_path / "d.png")
    result = json.loads(printed)
    assert code == 0 and result["reference"] == "vopd_topk-k4"
    assert [r["seeds"] for r in result["rows"]] == [2, 2] and result["rows"][1]["eval_accuracy_pairs"] == 2
    df = compare.load_runs([out])
    assert list(df.columns[:6]) == ["estimator", "label", "seed", "step", "eval_accuracy", "eval_reverse_kl"]
    assert len(df) == 4 * 3


def test_compare_refuses_what_is_not_a_run(swept, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = call("compare", swept[0] / "opd-seed0", tmp_path / "empty")
    assert code == 2 and err == f"error: {tmp_path / 'empty'} is not a vopd distill run (no metrics.jsonl)\n"
    code, _, err = call("compare", tmp_path / "nowhere")
    assert code == 2 and "nowhere does not exist" in err


def test_parse_estimators_and_seeds():
    assert sweep.parse_estimators("opd, vopd_topk:k=4", {"k": 8}) == [("opd", {}), ("vopd_topk", {"k": 4})]
    assert sweep.parse_estimators("opd,topk_kl", {"k": 8}) == [("opd", {}), ("topk_kl", {"k": 8})]
    for text, common, needle in [("opd,bogus", {}, "unknown estimator"), ("opd,opd", {}, "listed twice"),
                                 ("opd,vopd", {"k": 4}, "no estimator in --estimators takes parameter k"),
                                 ("vopd_topk:k", {}, "expects NAME=VALUE")]:
        with pytest.raises(InputError, match=needle):
            sweep.parse_estimators(text, common)
    assert sweep.parse_seeds(None, 3) == [0, 1, 2] and sweep.parse_seeds("4,2", None) == [4, 2]
    with pytest.raises(InputError, match="not both"):
        sweep.parse_seeds("1", 2)


def test_sweep_jobs_spread_over_gpus_and_report_failures(pair, tmp_path, monkeypatch):
    """--jobs N: N runs at a time, each given a GPU round-robin; a failed run leaves the others going."""
    calls = []

    def fake(run, resume, device, log):
        calls.append((run.name, device))
        if run.name == "opd-seed1":
            raise RuntimeError(f"exit status 1; see {log}")

    monkeypatch.setattr(sweep, "gpu_ids", lambda: ["3", "5"])
    monkeypatch.setattr(sweep, "run_in_subprocess", fake)
    code, _, err = call("sweep", "--estimators", "opd", "--num-seeds", 3, "--jobs", 2, *options(pair, out=tmp_path))
    assert code == 1 and "failed: opd-seed1: exit status 1" in err
    assert sorted(name for name, _ in calls) == ["opd-seed0", "opd-seed1", "opd-seed2"]
    assert {device for _, device in calls} == {"3", "5"}


def test_sweep_jobs_run_worker_processes(pair, tmp_path):
    out = tmp_path / "sw"
    code, printed, _ = call("sweep", "--estimators", "opd", "--jobs", 2, *options(pair, out=out))
    assert code == 0 and "done opd-seed0" in printed
    assert json.loads((out / "opd-seed0" / "summary.json").read_text())["steps_done"] == 2
    assert "summary: " + str(out / "opd-seed0" / "summary.json") in (out / "logs" / "opd-seed0.log").read_text()


# ----------------------------------------------------------------------------- damaged folders, bad places, signals

def test_compare_names_a_damaged_config(swept, tmp_path):
    run = tmp_path / "opd-seed0"
    shutil.copytree(swept[0] / "opd-seed0", run)
    config = json.loads((run / "config.json").read_text())
    for text, needle in [("{oops", f"error: run config {run / 'config.json'} is not JSON (line 1, column 2: "),
                         (json.dumps({k: v for k, v in config.items() if k != "estimator"}),
                          f"error: {run / 'config.json'}: field 'estimator' is missing\n"),
                         (json.dumps({**config, "seed": "0"}),
                          f"error: {run / 'config.json'}: field 'seed' must be an integer, got \"0\"\n")]:
        (run / "config.json").write_text(text)
        code, _, err = call("compare", run, "--plot", tmp_path / "c.png")
        assert code == 2 and err.count("\n") == 1 and err.startswith(needle), err
    (run / "config.json").write_text(json.dumps(config))
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "eval"}\n{"kind": "train", "step": 9}\n')
    bad_line = len((run / "metrics.jsonl").read_text().splitlines()) - 1
    code, _, err = call("compare", run, "--plot", tmp_path / "c.png")
    assert code == 2 and err == f"error: {run / 'metrics.jsonl'}:{bad_line}: field 'step' is missing\n", err


def test_compare_outputs_are_checked_before_the_work(swept, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    nowhere = tmp_path / "no-such-run"               # refused later: the outputs are checked first
    for option, path, needle in [("--csv", afile / "t.csv", f"--csv {afile / 't.csv'}: {afile} is a file, so the "
                                                             "file cannot be made"),
                                 ("--plot", tmp_path, f"--plot {tmp_path} is a folder, not a file"),
                                 ("--csv", "", "--csv is empty"),
                                 ("--plot", tmp_path / ("x" * 300 + ".png"), "cannot be written: File name too long")]:
        code, _, err = call("compare", nowhere, option, path)
        assert code == 2 and err.count("\n") == 1 and needle in err, err
    code, _, err = call("compare", swept[0] / "opd-seed0", "--plot", tmp_path / "new" / "c.png", "--csv",
                        tmp_path / "new" / "deeper" / "t.csv")           # missing folders are made
    assert code == 0 and (tmp_path / "new" / "deeper" / "t.csv").is_file() and (tmp_path / "new" / "c.png").is_file()
    if os.geteuid() != 0:
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        code, _, err = call("compare", nowhere, "--csv", locked / "t.csv")
        assert code == 2 and "is not writable" in err


def test_sweep_rebuilds_a_damaged_summary_and_refuses_a_second_sweep(swept, tmp_path, one_thread):
    out = tmp_path / "sw"
    shutil.copytree(swept[0], out)
    (out / "opd-seed0" / "summary.json").write_text("garbage")
    held = RunLock(out, sweep.LOCK, "vopd sweep")      # another sweep on the folder
    assert held.acquire() is None
    try:
        code, _, err = call(*swept[1][:-2], "--out", out)
        assert code == 2 and err.startswith(f"error: {out} is in use by another vopd sweep (pid {os.getpid()} on ")
    finally:
        held.release()
    code, printed, err = call(*swept[1][:-2], "--out", out)
    assert code == 0 and f"warning: the run's summary {out / 'opd-seed0' / 'summary.json'} is not JSON" in err
    assert "resume opd-seed0" in printed and printed.count("skip ") == 3
    assert json.loads((out / "opd-seed0" / "summary.json").read_text())["steps_done"] == 2
    assert not (out / sweep.LOCK).exists()


def test_ctrl_c_on_sweep_jobs_reports_resumable_runs(pair, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the process group) on --jobs 2: each worker finishes its step and
    checkpoints, the sweep says so, starts nothing new and exits 130; the logs hold no traceback."""
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "vopd_analysis.cli", "sweep", "--estimators", "opd,vopd", "--seeds", "0,1",
           "--jobs", "2", *options(pair, out=out, steps=1000, save_every=50, eval_every=100)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not all((out / run / "metrics.jsonl").is_file() and '"train"' in (out / run / "metrics.jsonl").read_text()
                  for run in ("opd-seed0", "vopd-seed0")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in stderr, (stdout, stderr)
    for run in ("opd-seed0", "vopd-seed0"):
        assert f"interrupted {run}: stopped by a signal after its last checkpoint" in stdout
        assert "Traceback" not in (out / "logs" / f"{run}.log").read_text()
        assert ckpt.verify(ckpt.latest(out / run)) == [] and not (out / run / LOCK).exists()
    assert "FAILED" not in stdout and "start opd-seed1" not in stdout
    assert stdout.strip().splitlines()[-1].startswith("interrupted: 2 run(s) stopped after a checkpoint")
    assert not (out / sweep.LOCK).exists()
