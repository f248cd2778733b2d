"""Learning-rate grids: vopd sweep --lrs, vopd compare by learning rate and --best-lr, the distill_tuned study."""

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from studies import distill_small, distill_tiny, distill_tuned, distill_tuned_small
from vopd_analysis import cli
from vopd_analysis.distill import compare, sweep
from vopd_analysis.distill.config import DistillConfig
from vopd_analysis.distill.metrics import Metrics
from vopd_analysis.errors import InputError
from vopd_analysis.lm import tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tiny.save_random_pair(tmp_path_factory.mktemp("pair"))


def options(pair, **overrides):
    """vopd distill options for two fast steps on the random pair, evaluated and saved at every step."""
    opts = {"student": pair[0], "teacher": pair[1], "steps": 2, "prompts_per_step": 4, "rollouts_per_prompt": 2,
            "num_eval": 8, "eval_every": 1, "save_every": 1, **overrides}
    return [x for key, value in opts.items() for x in (f"--{key.replace('_', '-')}", str(value))]


def call(*argv):
    """cli.main(argv) -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def rows(run, kind):
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ----------------------------------------------------------------------------- vopd sweep --lrs

def test_format_lr_and_parse_lrs():
    assert [compare.format_lr(x) for x in (3e-4, 1e-3, 0.0015, 1.0, 2.5, 10.0, 3e-4 * 3)] == [
        "3e-4", "1e-3", "1.5e-3", "1", "2.5", "1e1", "9e-4"]
    assert sweep.parse_lrs(" 1e-4, 3e-4 ,0.001") == [1e-4, 3e-4, 1e-3]
    for text, needle in [("", "--lrs is empty"), (" , ", "--lrs is empty"), ("1e-4,fast", "expects comma-separated"),
                         ("0", "> 0"), ("-1e-3", "> 0"), ("inf", "finite"), ("nan", "finite"),
                         ("3e-4,0.0003", "lists 3e-4 twice")]:
        with pytest.raises(InputError, match=needle):
            sweep.parse_lrs(text)


def test_lr_plan_folders_and_order():
    base = DistillConfig(preset="tiny", steps=2)
    est = [("opd", {}), ("vopd_topk", {"k": 4})]
    runs = sweep.plan(base, est, [0, 1], Path("/nowhere/sw"), [1e-4, 3e-4])
    assert [r.name for r in runs] == [
        "opd-lr1e-4-seed0", "vopd_topk-k4-lr1e-4-seed0", "opd-lr3e-4-seed0", "vopd_topk-k4-lr3e-4-seed0",
        "opd-lr1e-4-seed1", "vopd_topk-k4-lr1e-4-seed1", "opd-lr3e-4-seed1", "vopd_topk-k4-lr3e-4-seed1"]
    assert [r.cfg.lr for r in runs[:4]] == [1e-4, 1e-4, 3e-4, 3e-4]
    assert runs[1].cfg.out_dir == "/nowhere/sw/" + runs[1].name
    plain = sweep.plan(base, est, [0], Path("/nowhere/sw"))        # without a grid: today's names and lr
    assert [r.name for r in plain] == ["opd-seed0", "vopd_topk-k4-seed0"] and {r.cfg.lr for r in plain} == {base.lr}


@pytest.mark.parametrize("lrs, extra, needle", [
    ("", (), "--lrs is empty"), ("1e-3,abc", (), "expects comma-separated numbers"), ("1e-3,-1e-3", (), "> 0"),
    ("1e-3,inf", (), "finite"), ("1e-3,0.001", (), "lists 1e-3 twice"), ("1e-3,3e-3", ("--lr", "1e-3"), "not both"),
    ("1e-3,3e-3", ("--reference", "opd"), "--reference opd@lr=1e-3")])
def test_sweep_refuses_bad_lrs_before_anything_exists(pair, tmp_path, lrs, extra, needle):
    out = tmp_path / "sw"
    code, printed, err = call("sweep", "--estimators", "opd", "--lrs", lrs, *extra, *options(pair, out=out))
    assert code == 2 and needle in err and err.startswith("error: ") and err.count("\n") == 1 and printed == ""
    assert not out.exists()


GRID = ("--estimators", "opd,vopd", "--lrs", "0.01,0.03", "--seeds", "0")


@pytest.fixture(scope="module")
def lr_swept(pair, tmp_path_factory):
    """A 2 estimators x 2 lrs sweep interrupted in its third run (opd lr 3e-2, after step 1's checkpoint), then
    called again."""
    out = tmp_path_factory.mktemp("lrsweep") / "sw"
    argv = ("sweep", *GRID, *options(pair, out=out))
    real_log = Metrics.log

    def die(self, row):
        real_log(self, row)
        if self.path.parent.name == "opd-lr3e-2-seed0" and row["kind"] == "train" and row["step"] == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Metrics, "log", die)
        first = call(*argv)
    before = {"finished": sorted(p.parent.name for p in out.glob("*/summary.json")),
              "train": rows(out / "opd-lr3e-2-seed0", "train"), "plan": json.loads((out / "sweep.json").read_text())}
    return out, argv, first, before, call(*argv)


def test_lr_sweep_resumes_where_it_stopped(lr_swept, one_thread):
    out, _, first, before, (code, printed, _) = lr_swept
    assert first[0] == 130
    assert before["finished"] == ["opd-lr1e-2-seed0", "vopd-lr1e-2-seed0"]
    plan = before["plan"]
    assert plan["lrs"] == [0.01, 0.03] and "lr" not in plan["config"]
    assert [(r["folder"], r["lr"]) for r in plan["runs"]] == [
        ("opd-lr1e-2-seed0", 0.01), ("vopd-lr1e-2-seed0", 0.01), ("opd-lr3e-2-seed0", 0.03),
        ("vopd-lr3e-2-seed0", 0.03)]
    assert code == 0
    assert "skip opd-lr1e-2-seed0: finished" in printed and "skip vopd-lr1e-2-seed0: finished" in printed
    assert "resume opd-lr3e-2-seed0" in printed and "start vopd-lr3e-2-seed0" in printed
    resumed = rows(out / "opd-lr3e-2-seed0", "train")
    assert [r["step"] for r in resumed] == [1, 2] and resumed[0] == before["train"][0]
    assert json.loads((out / "opd-lr3e-2-seed0" / "summary.json").read_text())["resumed_from_step"] == 1
    for run, lr in [("opd-lr1e-2-seed0", 0.01), ("vopd-lr3e-2-seed0", 0.03)]:
        assert json.loads((out / run / "config.json").read_text())["lr"] == lr
        assert {r["lr"] for r in rows(out / run, "train")} == {lr}      # the optimizer's lr (no warm-up)
    assert "opd@lr=1e-2" in printed and "vopd@lr=3e-2" in printed and "--best-lr" in printed


def test_lr_sweep_reruns_only_the_run_without_summary(lr_swept, one_thread):
    out, argv, *_ = lr_swept
    (out / "vopd-lr1e-2-seed0" / "summary.json").unlink()
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    code, printed, _ = call(*argv)
    assert code == 0 and printed.count("skip ") == 3 and "resume vopd-lr1e-2-seed0" in printed
    assert " start " not in printed and printed.count("resume ") == 1
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json")
            if p.parent.name != "vopd-lr1e-2-seed0"} == stamps
    assert (out / "vopd-lr1e-2-seed0" / "summary.json").is_file()


def test_compare_groups_a_real_lr_sweep_and_picks_by_the_rule(lr_swept, tmp_path, one_thread):
    out = lr_swept[0]
    code, printed, _ = call("compare", out, "--json", "--plot", tmp_path / "a.png")
    result = json.loads(printed)
    assert code == 0 and result["reference"] is None and result["best_lr"] is None
    assert [(r["label"], r["lr"]) for r in result["rows"]] == [
        ("opd@lr=1e-2", 0.01), ("opd@lr=3e-2", 0.03), ("vopd@lr=1e-2", 0.01), ("vopd@lr=3e-2", 0.03)]
    assert any("several learning rates" in n for n in result["notes"])
    assert not any("differ in lr" in n for n in result["notes"])
    final = {(name, lr): rows(out / f"{name}-lr{lr}-seed0", "eval")[-1]["eval_reverse_kl"]
             for name in ("opd", "vopd") for lr in ("1e-2", "3e-2")}
    best = {name: min(("1e-2", "3e-2"), key=lambda lr: (final[name, lr], float(lr))) for name in ("opd", "vopd")}
    code, printed, _ = call("compare", out, "--best-lr", "--csv", tmp_path / "b.csv", "--plot", tmp_path / "b.png")
    assert code == 0 and "lowest mean final eval_reverse_kl" in printed
    assert printed.count("at the edge of the grid: extend it") == 2        # a grid of two: always an edge
    table = pd.read_csv(tmp_path / "b.csv")
    assert list(table["label"]) == [f"opd@lr={best['opd']}", f"vopd@lr={best['vopd']}"]
    assert table["eval_reverse_kl_diff"][1] == pytest.approx(final["vopd", best["vopd"]] - final["opd", best["opd"]])
    assert f"minus opd@lr={best['opd']}" in printed


# ----------------------------------------------------------------------------- vopd compare on hand-made runs

# final reverse KL per (estimator, lr) for seeds 0, 1, 2; opd's best is inside the grid, vopd's means tie at
# 1e-4 and 3e-4 (6.0 each: the smaller lr wins, at the edge), full_kl's 1e-3 has a diverged (NaN) seed
FINALS = {("opd", 1e-4): [9.0, 8.0, 7.0], ("opd", 3e-4): [5.0, 6.0, 4.0], ("opd", 1e-3): [6.0, 7.0, 5.5],
          ("vopd", 1e-4): [5.0, 7.0, 6.0], ("vopd", 3e-4): [6.0, 6.0, 6.0], ("vopd", 1e-3): [8.0, 9.0, 7.0],
          ("full_kl", 1e-4): [7.0, 7.0, 7.0], ("full_kl", 1e-3): [1.0, float("nan"), 1.0]}


def accuracy(kl):
    return 0.0 if kl != kl else 1.0 / (1.0 + kl)


def write_run(folder: Path, estimator: str, lr: float, seed: int, final_kl: float, **config) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"estimator": estimator, "estimator_params": {}, "engine": "builtin",
                                                    "seed": seed, "lr": lr, "steps": 10, **config}))
    evals = [(0, 12.0), (5, 10.0), (10, final_kl)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(
        {"kind": "eval", "step": step, "eval_accuracy": accuracy(kl), "eval_reverse_kl": kl,
         "eval_teacher_logprob": -kl / 10}) + "\n" for step, kl in evals))
    (folder / "summary.json").write_text("{}")


@pytest.fixture
def hand_runs(tmp_path):
    out = tmp_path / "runs"
    for (name, lr), kls in FINALS.items():
        for seed, kl in enumerate(kls):
            write_run(out / f"{name}-lr{compare.format_lr(lr)}-seed{seed}", name, lr, seed, kl)
    return out


def by_hand_best(metric_of_kl, lower: bool) -> dict:
    """{estimator: lr}: the plain-Python rule (a NaN mean ranks last; ties to the smaller lr)."""
    out = {}
    for name in dict.fromkeys(n for n, _ in FINALS):
        scored = []
        for (n, lr), kls in FINALS.items():
            if n == name:
                values = [metric_of_kl(k) for k in kls]
                mean = sum(values) / len(values)
                scored.append((math.inf if mean != mean else (mean if lower else -mean), lr))
        out[name] = min(scored)[1]
    return out


def test_best_lrs_rule_ties_nan_and_edges(hand_runs):
    df = compare.load_runs([hand_runs])
    choice = compare.best_lrs(compare.final_evals(df), "eval_reverse_kl").set_index("base_label")
    assert choice["lr"].to_dict() == by_hand_best(lambda kl: kl, lower=True) == {"opd": 3e-4, "vopd": 1e-4,
                                                                                   "full_kl": 1e-4}
    assert choice["edge"].to_dict() == {"opd": "", "vopd": "low", "full_kl": "low"}
    assert choice.loc["opd", "mean"] == pytest.approx(5.0) and choice.loc["opd", "seeds"] == 3
    assert choice.loc["opd", "grid"] == [1e-4, 3e-4, 1e-3]
    assert choice.loc["opd", "means"] == pytest.approx([8, 5, 18.5 / 3])
    by_acc = compare.best_lrs(compare.final_evals(df), "eval_accuracy").set_index("base_label")["lr"].to_dict()
    assert by_acc == by_hand_best(accuracy, lower=False)
    assert compare.best_lrs(pd.DataFrame({"base_label": ["a"], "lr": [1e-3], "seed": [0], "eval_reverse_kl": [2.0]}),
                            "eval_reverse_kl")["edge"].tolist() == ["single"]
    with pytest.raises(InputError, match="no finite final eval_reverse_kl"):
        compare.best_lrs(pd.DataFrame({"base_label": ["a"], "lr": [1e-3], "seed": [0], "eval_reverse_kl": [np.nan]}))


def test_compare_best_lr_on_hand_made_runs(hand_runs, tmp_path):
    code, printed, _ = call("compare", hand_runs, "--best-lr", "--csv", tmp_path / "t.csv",
                            "--plot", tmp_path / "t.png")
    assert code == 0 and "note:" not in printed     # the runs at the other learning rates are not "left out"
    lines = printed.splitlines()
    assert "at the edge of the grid: extend it" not in next(line for line in lines if line.startswith("  opd "))
    assert "at the edge of the grid: extend it" in next(line for line in lines if line.startswith("  vopd "))
    table = pd.read_csv(tmp_path / "t.csv").set_index("label")
    assert list(table.index) == ["opd@lr=3e-4", "full_kl@lr=1e-4", "vopd@lr=1e-4"]   # the reference first
    assert list(table["lr"]) == [3e-4, 1e-4, 1e-4] and list(table["seeds"]) == [3, 3, 3]
    d = [v - o for v, o in zip(FINALS["vopd", 1e-4], FINALS["opd", 3e-4])]      # each at its own lr, same seeds
    assert table.loc["vopd@lr=1e-4", "eval_reverse_kl_diff"] == pytest.approx(np.mean(d))
    assert table.loc["vopd@lr=1e-4", "eval_reverse_kl_p"] == pytest.approx(sps.ttest_rel(
        FINALS["vopd", 1e-4], FINALS["opd", 3e-4]).pvalue)
    code, printed, _ = call("compare", hand_runs, "--best-lr", "eval_accuracy", "--json", "--plot", tmp_path / "u.png")
    result = json.loads(printed)
    chosen = {c["base_label"]: c["lr"] for c in result["best_lr"]["choices"]}
    assert chosen == by_hand_best(accuracy, lower=False) and "highest" in result["best_lr"]["rule"]
    assert result["reference"] == f"opd@lr={compare.format_lr(chosen['opd'])}"


def test_compare_lr_is_a_grouping_not_a_refusal(hand_runs, tmp_path):
    df = compare.load_runs([hand_runs])
    assert set(df["label"]) == {f"{n}@lr={compare.format_lr(lr)}" for n, lr in FINALS}
    assert list(df.columns[:6]) == ["estimator", "label", "seed", "step", "eval_accuracy", "eval_reverse_kl"]
    table = compare.summary_table(df)
    assert table.attrs["reference"] is None                       # opd has three learning rates: no default
    assert compare.summary_table(df, reference="opd@lr=3e-4").attrs["reference"] == "opd@lr=3e-4"
    with pytest.raises(InputError, match="ambiguous"):
        compare.summary_table(df, reference="opd")
    one_lr = [hand_runs / f"{n}-lr3e-4-seed{s}" for n in ("opd", "vopd") for s in range(3)]
    assert set(compare.load_runs(one_lr)["label"]) == {"opd", "vopd"}   # one lr: plain labels, as before
    write_run(tmp_path / "again" / "opd-copy", "opd", 3e-4, 0, 1.0)   # same label, lr and seed: still refused
    with pytest.raises(InputError, match="are both opd lr 3e-4 seed 0"):
        compare.load_runs([hand_runs, tmp_path / "again"])
    write_run(tmp_path / "other" / "opd-steps", "opd", 3e-4, 7, 1.0, steps=20)   # another setting: still a note
    remarks = compare.notes([hand_runs, tmp_path / "other"], compare.load_runs([hand_runs, tmp_path / "other"]))
    assert any(r.startswith("the runs differ in steps") for r in remarks) and not any("in lr" in r for r in remarks)


# ----------------------------------------------------------------------------- the study's rule and grid

def test_ladder_step_and_extensions():
    assert [distill_tuned.ladder_step(x, "low") for x in (1e-4, 3e-4, 1e-3, 2e-4)] == [3e-5, 1e-4, 3e-4, 1e-4]
    assert [distill_tuned.ladder_step(x, "high") for x in (1e-4, 3e-4, 3e-3, 2e-4)] == [3e-4, 1e-3, 1e-2, 3e-4]
    choice = pd.DataFrame([{"estimator": "a", "grid": [1e-4, 3e-4, 1e-3], "edge": "low"},
                           {"estimator": "b", "grid": [1e-4, 3e-4, 1e-3], "edge": ""},
                           {"estimator": "c", "grid": [1e-4, 3e-4, 1e-3], "edge": "high"},
                           {"estimator": "d", "grid": [1e-4, 3e-4], "edge": "high"}])
    assert distill_tuned.extensions(choice, {"d": 2}, cap=2) == [{"estimator": "a", "side": "low", "lr": 3e-5},
                                                                 {"estimator": "c", "side": "high", "lr": 3e-3}]
    assert distill_tuned.extensions(choice, {"a": 1, "c": 1}, cap=1) == [{"estimator": "d", "side": "high", "lr": 1e-3}]


def synthetic_selection(optima: dict, grids: dict, seeds: list) -> pd.DataFrame:
    """A selection table whose final reverse KL is 1 + (log10 lr - log10 optimum)^2 (+ 0.01 x seed)."""
    out = []
    for name, grid in grids.items():
        for lr in grid:
            for seed in seeds:
                kl = 1 + (math.log10(lr) - math.log10(optima[name])) ** 2 + 0.01 * seed
                out += [{"estimator": name, "lr": lr, "seed": seed, "step": 0, "eval_accuracy": 0.0,
                         "eval_reverse_kl": 20.0},
                        {"estimator": name, "lr": lr, "seed": seed, "step": 4, "eval_accuracy": 0.5,
                         "eval_reverse_kl": kl}]
    return pd.DataFrame(out, columns=distill_tuned.columns({}))


def test_selection_extends_the_grid_until_inside_or_the_cap(monkeypatch, tmp_path):
    optima = {"opd": 3e-5, "vopd": 1e-3, "full_kl": 1.0, "inside": 2e-4}   # 2e-4: nearer 3e-4 than 1e-4 in log
    trained = []

    def fake_train(config, folder, steps, grids, seeds):
        trained.append({k: list(v) for k, v in grids.items()})
        return synthetic_selection(optima, grids, seeds), {f"{k}/{lr}": 1.0 for k, g in grids.items() for lr in g}

    monkeypatch.setattr(distill_tuned, "train", fake_train)
    config = {"estimators": {k: {} for k in optima}, "lrs": [1e-4, 3e-4, 1e-3, 3e-3], "selection_seeds": [100, 101],
              "selection_steps": 4, "max_extensions": 2}
    table, choice, grid, _ = distill_tuned.select(config, tmp_path)
    chosen = dict(zip(choice["estimator"], choice["lr"]))
    assert chosen == {"opd": 3e-5, "vopd": 1e-3, "full_kl": 3e-2, "inside": 3e-4}
    assert grid["grids"]["opd"] == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]     # 1e-4 at the edge -> 3e-5 -> 1e-5
    assert grid["grids"]["vopd"] == [1e-4, 3e-4, 1e-3, 3e-3]
    assert grid["grids"]["full_kl"] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # capped at 2, still at the edge
    assert [(e["estimator"], e["side"], e["lr"], e["round"]) for e in grid["extensions"]] == [
        ("opd", "low", 3e-5, 1), ("full_kl", "high", 1e-2, 1), ("opd", "low", 1e-5, 2), ("full_kl", "high", 3e-2, 2)]
    assert dict(zip(choice["estimator"], choice["edge"]))["full_kl"] == "high"
    assert len(trained) == 3 and set(table["lr"]) >= {1e-5, 3e-2}


def test_choose_is_the_lowest_mean_final_kl_ties_to_the_smaller_lr():
    table = synthetic_selection({"a": 3e-4}, {"a": [1e-4, 3e-4, 1e-3]}, [0, 1, 2])
    final = table["step"] == 4
    finals = {1e-4: [2.0, 2.0, 2.0], 3e-4: [1.0, 1.5, 2.0], 1e-3: [1.5, 1.5, 1.5]}   # means 2, 1.5, 1.5
    for lr, values in finals.items():
        table.loc[final & (table["lr"] == lr), "eval_reverse_kl"] = values
    choice = distill_tuned.choose(table)
    assert choice["lr"].tolist() == [3e-4] and choice["edge"].tolist() == [""] and choice["mean"].tolist() == [1.5]
    table.loc[final & (table["lr"] == 1e-4), "eval_reverse_kl"] = [1.5, 1.5, 1.5]       # now a three-way tie
    choice = distill_tuned.choose(table)
    assert choice["lr"].tolist() == [1e-4] and choice["edge"].tolist() == ["low"]


def test_tail_slope_is_the_least_squares_slope_of_the_last_fifth():
    steps = np.arange(0, 601, 50)
    kl = 10 * np.exp(-steps / 150) + 0.001 * (steps % 100)
    curve = pd.DataFrame({"step": steps, "eval_reverse_kl": kl})
    tail = steps >= 480
    assert distill_tuned.tail_slope(curve) == pytest.approx(100 * sps.linregress(steps[tail], kl[tail]).slope)
    short = pd.DataFrame({"step": [0, 10, 20], "eval_reverse_kl": [5.0, 4.0, 3.5]})   # last 20%: one eval -> last 2
    assert distill_tuned.tail_slope(short) == pytest.approx(100 * (3.5 - 4.0) / 10)
    assert math.isnan(distill_tuned.tail_slope(short.head(1)))


# ----------------------------------------------------------------------------- the study end to end

def test_distill_tuned_quick_pipeline_resumes_and_reproduces(tmp_path, one_thread, capsys):
    config = {"selection_steps": 2, "steps": 3, "eval_every": 1, "num_eval": 8, "prompts_per_step": 4,
              "rollouts_per_prompt": 2, "kl_threshold": 9.0, "work_dir": str(tmp_path / "work")}
    distill_tuned.run(quick=True, out_dir=tmp_path / "a", config=config)
    printed = capsys.readouterr().out
    assert "QUICK MODE" in printed and "decides nothing" in printed
    distill_tuned.run(quick=True, out_dir=tmp_path / "b", config=config, plot=False)   # every run read back
    assert " start " not in capsys.readouterr().out
    for name in ("distill_tuned.csv", "distill_tuned_lr.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    conf = pd.read_csv(tmp_path / "a" / "distill_tuned.csv")
    sel = pd.read_csv(tmp_path / "a" / "distill_tuned_lr.csv")
    assert list(conf.columns) == list(sel.columns) == ["estimator", "lr", "seed", "step", "eval_accuracy",
                                                       "eval_reverse_kl"]
    assert set(conf["seed"]) == {0, 1} and set(sel["seed"]) == {100} and conf["step"].max() == 3
    manifest = json.loads((tmp_path / "a" / "distill_tuned.json").read_text())
    assert "decides nothing" in manifest["note"] and (tmp_path / "a" / "distill_tuned.png").is_file()
    final = sel[sel["step"] == sel["step"].max()]
    by_hand = {name: min(zip(g["eval_reverse_kl"], g["lr"]))[1] for name, g in final.groupby("estimator")}
    assert manifest["chosen_lr"] == pytest.approx(by_hand)
    assert conf.groupby("estimator")["lr"].first().to_dict() == pytest.approx(by_hand)
    assert manifest["selection"]["grids"]["opd"] == sorted(set(sel.loc[sel["estimator"] == "opd", "lr"]))
    assert len(manifest["selection"]["extensions"]) == 2          # 2 lrs: each best at an edge, cap 1 in quick mode
    runs = len(conf.groupby(["estimator", "seed"])) + len(sel.groupby(["estimator", "lr", "seed"]))
    assert len(manifest["train_seconds"]) == runs
    summary = pd.DataFrame(manifest["summary"]).set_index("estimator")
    last = conf[conf["step"] == 3].set_index(["estimator", "seed"])["eval_reverse_kl"]
    assert summary.loc["vopd", "kl_minus_opd"] == pytest.approx((last["vopd"] - last["opd"]).mean())
    assert summary.loc["opd", "kl_minus_vopd"] == pytest.approx((last["opd"] - last["vopd"]).mean())


def test_the_small_pair_study_reports_its_own_metrics_and_power(monkeypatch, tmp_path):
    """distill_tuned_small runs the same protocol with the small preset's metrics (reverse KL and the teacher's
    log-likelihood, no accuracy); the summary's detectable differences are (t_0.975 + t_0.8) sd(d) / sqrt(n) of
    the paired final differences. Training is replaced by synthetic tables (the loop is tested above)."""
    rng = np.random.default_rng(0)

    def fake_train(config, folder, steps, grids, seeds):
        rows = [{"estimator": name, "lr": lr, "seed": seed, "step": step,
                 "eval_reverse_kl": 30 - step * (1 + i + rng.random()) * lr * 100, "eval_teacher_logprob": -7 + rng.random()}
                for i, (name, grid) in enumerate(grids.items()) for lr in grid for seed in seeds for step in (0, steps)]
        return pd.DataFrame(rows, columns=distill_tuned.columns(config)), {}

    monkeypatch.setattr(distill_tuned, "train", fake_train)
    config = {"estimators": {"opd": {}, "vopd": {}}, "seeds": [0, 1, 2], "max_extensions": 0}
    distill_tuned_small.run(quick=True, out_dir=tmp_path, config=config)
    conf = pd.read_csv(tmp_path / "distill_tuned_small.csv")
    assert list(conf.columns) == ["estimator", "lr", "seed", "step", "eval_reverse_kl", "eval_teacher_logprob"]
    assert list(pd.read_csv(tmp_path / "distill_tuned_small_lr.csv").columns) == list(conf.columns)
    manifest = json.loads((tmp_path / "distill_tuned_small.json").read_text())
    assert manifest["config"]["preset"] == "small" and "decides nothing" in manifest["note"]
    vopd = pd.DataFrame(manifest["summary"]).set_index("estimator").loc["vopd"]
    last = conf[conf["step"] == conf["step"].max()].set_index(["estimator", "seed"])["eval_teacher_logprob"]
    d = (last["vopd"] - last["opd"]).to_numpy()
    by_hand = (sps.t.ppf(0.975, 2) + sps.t.ppf(0.8, 2)) * d.std(ddof=1) / math.sqrt(3)
    assert vopd["tlogp_minus_opd_mde"] == pytest.approx(by_hand)
    assert vopd["tlogp_minus_opd"] == pytest.approx(d.mean()) and "acc_end" not in vopd
    assert (tmp_path / "distill_tuned_small.png").stat().st_size > 0


def test_differences_to_a_second_reference_by_hand():
    """``distill_tiny.differences_to``: the paired final differences to a named reference. Hand case: final
    reverse KL of vopd 3, 4, 5 and opd_bstar 2, 4, 3 on seeds 0, 1, 2, so d = -1, 0, -2: mean -1, sd 1,
    t = -sqrt(3) on 2 degrees of freedom. distill_small's report adds these columns for ``also_against``."""
    finals = {"opd": [9, 8, 7], "vopd": [3, 4, 5], "opd_bstar": [2, 4, 3]}
    df = pd.DataFrame([{"estimator": name, "seed": seed, "step": step, "eval_reverse_kl": 30.0 if step == 0 else kl,
                        "eval_teacher_logprob": -7.0 + seed}
                       for name, kls in finals.items() for seed, kl in enumerate(kls) for step in (0, 10)])
    table = distill_tiny.differences_to(df, "vopd", distill_small.METRICS).set_index("estimator")
    half = sps.t.ppf(0.975, 2) / math.sqrt(3)
    row = table.loc["opd_bstar"]
    assert row["kl_minus_vopd"] == pytest.approx(-1.0)
    assert (row["kl_minus_vopd_low"], row["kl_minus_vopd_high"]) == pytest.approx((-1 - half, -1 + half))
    assert row["kl_minus_vopd_p"] == pytest.approx(2 * sps.t.sf(math.sqrt(3), 2))
    assert row["kl_minus_vopd_mde"] == pytest.approx((sps.t.ppf(0.975, 2) + sps.t.ppf(0.8, 2)) / math.sqrt(3))
    assert math.isnan(table.loc["vopd", "kl_minus_vopd"])
    said = distill_small.report(df, {"kl_threshold": 4.0, "also_against": ["vopd", "absent"]})
    summary = pd.DataFrame(said.extra["summary"]).set_index("estimator")
    assert summary.loc["opd_bstar", "kl_minus_vopd"] == pytest.approx(-1.0)
    assert summary.loc["opd_bstar", "kl_diff"] == pytest.approx(np.mean([2 - 9, 4 - 8, 3 - 7]))
    assert "kl_minus_absent" not in summary
    assert "kl_minus_vopd" not in pd.DataFrame(distill_small.report(df, {"kl_threshold": 4.0}).extra["summary"])
