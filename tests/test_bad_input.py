"""What bad input gets: one line ``error: ...`` and exit status 2 from the CLI, ``InputError`` from Python.

Each case of the bad-input battery has a test here; the CLI runs in-process as in test_cli.py.
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from synthetic.markov import make_markov
from synthetic.tree import MAX_LOGIT_SPREAD, from_arrays, make_tree
from vopd_analysis import cli
from vopd_analysis import estimators as est
from vopd_analysis.batch import TokenBatch
from vopd_analysis.errors import InputError
from vopd_analysis.tabular import cli as tabular_cli
from vopd_analysis.tabular import montecarlo as mc

BASE = ("--vocab", "3", "--horizon", "2")


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def strict_json(text: str):
    """json.loads that refuses the NaN / Infinity tokens Python's json writes by default."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def assert_one_line_error(code, err, needle):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """Bad --tables files: extreme logits, a .npy, string and object arrays, text named .npz."""
    folder = tmp_path_factory.mktemp("tables")
    tree = make_tree(3, 2, seed=0)
    paths = {}
    for who in ("student", "teacher"):
        s, t = tree.student_logits.copy(), tree.teacher_logits.copy()
        (s if who == "student" else t)[0, 0] = 1e30
        paths[f"extreme_{who}"] = folder / f"extreme_{who}.npz"
        np.savez(paths[f"extreme_{who}"], student_logits=s, teacher_logits=t)
    paths["npy"] = folder / "one.npy"
    np.save(paths["npy"], tree.student_logits)
    paths["strings"] = folder / "strings.npz"
    np.savez(paths["strings"], student_logits=np.full((4, 3), "a"), teacher_logits=tree.teacher_logits)
    paths["objects"] = folder / "objects.npz"
    np.savez(paths["objects"], student_logits=np.array([{}] * 12, dtype=object).reshape(4, 3),
             teacher_logits=tree.teacher_logits)
    paths["text"] = folder / "text.npz"
    paths["text"].write_text("student_logits = [[1, 2, 3]]\n")
    return paths


# ----------------------------------------------------------------------------- 1, 5: tables and knobs

@pytest.mark.parametrize("key, needle", [
    ("extreme_student", "student_logits row 0 spans 1e+30"),
    ("extreme_teacher", "teacher_logits row 0 spans 1e+30"),
    ("npy", "single .npy array, not a .npz archive"),
    ("strings", "student_logits must be a real numeric array, got dtype <U1"),
    ("objects", "student_logits is an object array"),
    ("text", "is not a NumPy .npz archive"),
])
def test_bad_tables_files(capsys, tables, key, needle):
    for extra in ((), ("--json",)):
        code, out, err = run(capsys, "exact", "--tables", str(tables[key]), "--horizon", "2", *extra)
        assert_one_line_error(code, err, needle)
        assert out == ""


def test_extreme_rows_are_refused_in_python_and_the_limit_is_finite_everywhere():
    tree = make_tree(3, 2, coupling=1.0, seed=0)
    s = tree.student_logits.copy()
    s[1, 0] = s[1].min() + MAX_LOGIT_SPREAD * 1.01
    with pytest.raises(InputError, match="student_logits row 1 spans"):
        from_arrays(s, tree.teacher_logits, 2)
    # at the limit every estimator's exact moments stay finite (k3's variance overflows at about 355)
    from vopd_analysis.tabular.analysis import analyse
    s[1, 0] = s[1].min() + MAX_LOGIT_SPREAD * 0.999
    result = analyse(from_arrays(s, tree.teacher_logits, 2))
    assert list(tabular_cli._non_finite_paths(result)) == []


@pytest.mark.parametrize("argv, needle", [
    (("exact", "--vocab", "3", "--horizon", "1000000"), "about 10^477,121 states"),
    (("exact", "--vocab", "3", "--horizon", "1000000", "--method", "enumerate"), "about 10^477,121 sequences"),
    (("mc", "--vocab", "3", "--horizon", "1000000", "--estimator", "opd"), "about 10^477,121 sequences"),
    (("exact", *BASE, "--seed", "-1"), "--seed must be a non-negative integer, got -1"),
    (("mc", *BASE, "--estimator", "opd", "--seed", "-1"), "--seed must be a non-negative integer"),
    (("exact", "--markov", "--vocab", "100000", "--horizon", "2"), "tables alone take 149.0 GiB"),
    (("exact", "--vocab", "100000", "--horizon", "2"), "would need about"),
    (("exact", *BASE, "--teacher-temperature", "nan"), "--teacher-temperature must be a positive finite number"),
    (("exact", *BASE, "--teacher-temperature", "0"), "--teacher-temperature must be a positive finite number"),
    (("exact", *BASE, "--teacher-temperature=-inf"), "--teacher-temperature must be a positive finite"),
    (("exact", *BASE, "--markov", "--teacher-temperature", "inf"), "--teacher-temperature must be a positive"),
    (("exact", *BASE, "--divergence", "nan"), "--divergence must be a finite number"),
    (("exact", *BASE, "--teacher-temperature", "1e-5"), "spans"),
    (("mc", *BASE, "--markov", "--estimator", "opd", "--divergence", "1e6"), "raise teacher_temperature or lower"),
    (("mc", *BASE, "--estimator", "opd", "--coupling", "inf"), "--coupling must be a finite number"),
    (("exact", *BASE, "--param", "gamma=abc"), "parameter gamma must be a number (default 0.5), got 'abc'"),
    (("exact", *BASE, "--param", "alpha=NaN"), "parameter alpha must be a finite number"),
    (("mc", *BASE, "--estimator", "rtg", "--param", "gamma=Infinity"), "parameter gamma must be a finite number"),
    (("exact", "--tables", "x.npz", "--markov", "--horizon", "2"), "--markov generates a chain"),
    (("exact", "--vocab", "3"), "the following arguments are required: --horizon"),
    (("exact", *BASE, "--horizon", "abc"), "argument --horizon: invalid int value: 'abc'"),
    (("exact", *BASE, "--estimators", ""), "--estimators is empty"),
    (("study",), "the following arguments are required: name"),
    (("study", "common"), "no study named 'common'; known studies: baseline_quality, calibration"),
])
def test_cli_errors_are_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert out == ""


def test_generators_refuse_bad_knobs_in_python():
    for make in (make_tree, make_markov):
        for knobs, needle in [({"seed": -1}, "seed must be a non-negative integer"),
                              ({"seed": 1.5}, "seed must be a non-negative integer"),
                              ({"teacher_temperature": float("nan")}, "positive finite"),
                              ({"teacher_temperature": 0.0}, "positive finite"),
                              ({"divergence": float("inf")}, "divergence must be a finite number"),
                              ({"coupling": float("nan")}, "coupling must be a finite number")]:
            with pytest.raises(InputError, match=needle):
                make(3, 2, **knobs)
    with pytest.raises(InputError, match="states"):
        make_tree(3, 10 ** 6)


def test_training_may_drive_the_student_past_the_spread_limit():
    """The spread limit guards tables that come in (files, arrays, generator knobs), not a student that
    a diverging training run moves: ``with_student`` keeps accepting finite tables."""
    tree = make_tree(3, 2, seed=0)
    wide = tree.student_logits.copy()
    wide[0, 0] += 10 * MAX_LOGIT_SPREAD
    assert tree.with_student(wide).student_logits[0, 0] == wide[0, 0]


# ----------------------------------------------------------------------------- 1: strict JSON

def test_json_output_is_strict_and_non_finite_results_become_null(capsys, monkeypatch):
    code, out, _ = run(capsys, "exact", *BASE, "--json")
    assert code == 0 and "non_finite" not in strict_json(out)
    from vopd_analysis.tabular import analysis

    real = analysis.analyse

    def overflowing(*args, **kwargs):
        result = real(*args, **kwargs)
        result["estimators"]["k3"]["total_variance"] = float("inf")
        result["estimators"]["k3"]["mean_gradient"][2] = float("nan")
        return result

    monkeypatch.setattr(analysis, "analyse", overflowing)
    code, out, _ = run(capsys, "exact", *BASE, "--json")
    result = strict_json(out)
    assert code == 0 and result["estimators"]["k3"]["total_variance"] is None
    assert result["estimators"]["k3"]["mean_gradient"][2] is None
    assert result["non_finite"] == ["estimators.k3.mean_gradient[]", "estimators.k3.total_variance"]
    code, out, _ = run(capsys, "exact", *BASE)
    assert code == 0 and "note: not finite in float64 (null in --json): estimators.k3.mean_gradient[]" in out


def test_mc_json_is_strict_for_a_deterministic_miss(capsys):
    """gkd_jsd on a bandit gives the same gradient in every draw, off the token target: the test's
    statistic is +inf, which --json writes as null (it printed a bare Infinity before)."""
    code, out, _ = run(capsys, "mc", "--vocab", "3", "--horizon", "1", "--estimator", "gkd_jsd", "--samples", "20",
                       "--json")
    result = strict_json(out)
    assert code == 0 and result["test_token"]["reject"] and result["test_token"]["statistic"] is None
    assert result["non_finite"] == ["test_token.statistic", "test_sequence.statistic"]


# ----------------------------------------------------------------------------- 2: mc options, alpha, --markov

@pytest.mark.parametrize("alpha", ["2", "1", "0", "-0.5", "nan"])
def test_mc_alpha_must_lie_in_0_1(capsys, alpha):
    code, _, err = run(capsys, "mc", *BASE, "--estimator", "vopd", "--samples", "50", f"--alpha={alpha}")
    assert_one_line_error(code, err, "0 < alpha < 1")


@pytest.mark.parametrize("alpha", [2.0, 1.0, 0.0, float("nan"), "0.05"])
def test_unbiasedness_test_validates_alpha(alpha):
    draws = np.random.default_rng(0).standard_normal((20, 4))
    with pytest.raises(InputError, match="0 < alpha < 1"):
        mc.unbiasedness_test(draws, np.zeros(4), alpha=alpha)


def test_unbiasedness_test_validates_shapes():
    with pytest.raises(InputError, match="D = target.size = 3"):
        mc.unbiasedness_test(np.zeros((20, 4)), np.zeros(3))


@pytest.mark.parametrize("argv, needle", [
    (("mc", *BASE, "--estimator", "vopd", "--samples", "2"), "--samples must be at least 3"),
    (("mc", *BASE, "--estimator", "seq_rloo", "--param", "group_size=0"), "needs group_size >= 2"),
    (("mc", *BASE, "--estimator", "seq_rloo", "--param", "group_size=-3"), "needs group_size >= 2"),
    (("mc", *BASE, "--estimator", "seq_rloo", "--param", "group_size=100000000", "--samples", "3"),
     "need about"),
    (("exact", *BASE, "--estimators", "seq_rloo"), "'seq_rloo' is a group estimator"),
    (("exact", *BASE, "--json", "--estimators", "seq_grpo"), "'seq_grpo' is a group estimator"),
])
def test_mc_and_group_errors(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert out == ""


def test_mc_samples_a_markov_chain(capsys):
    from vopd_analysis.tabular import dp
    code, out, _ = run(capsys, "mc", "--markov", "--vocab", "3", "--horizon", "4", "--estimator", "vopd",
                       "--samples", "2000", "--json")
    result = strict_json(out)
    assert code == 0 and not result["test_token"]["reject"] and not result["test_token"]["inconclusive"]
    interval = result["trace_covariance_interval"]
    assert interval["low"] < result["trace_covariance"] < interval["high"] and interval["confidence"] == 0.95
    exact = dp.dp_moments(make_markov(3, 4, coupling=0.0, seed=0), {"v": {"name": "vopd", "rho": 1.0}})["v"].total_variance
    assert interval["low"] < exact < interval["high"]
    code, out, _ = run(capsys, "mc", "--markov", "--vocab", "3", "--horizon", "3", "--estimator", "seq_rloo",
                       "--samples", "100")
    assert code == 0 and "each a group of 4 sequences" in out and "95% normal interval" in out


def test_trace_covariance_interval_is_the_normal_one():
    draws = np.random.default_rng(1).standard_normal((4000, 3)) * np.array([1.0, 2.0, 3.0])
    low, high = mc.trace_covariance_interval(draws)
    assert low < mc.trace_covariance(draws) < high and low < 14.0 < high and high - low < 2.0
    with pytest.raises(InputError, match="at least 2 draws"):
        mc.trace_covariance_interval(draws[:1])


# ----------------------------------------------------------------------------- 3: TokenBatch validation

def make_batch(B=3, T=4, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    tlp = torch.log_softmax(t, -1).gather(-1, y[..., None])[..., 0]
    return TokenBatch(y, torch.ones(B, T, dtype=torch.float64), z, tlp, teacher_logits=t)


def with_field(batch, **fields):
    return TokenBatch(**{**batch.__dict__, **fields})


def _nan_at(x, index=(0, 1, 2)):
    x = x.clone()
    x[index] = float("nan")
    return x


BAD_BATCHES = [
    (lambda b: with_field(b, student_logits=_nan_at(b.student_logits)), "student_logits contains NaN or inf at"),
    (lambda b: with_field(b, teacher_logits=_nan_at(b.teacher_logits)), "teacher_logits contains NaN or inf"),
    (lambda b: with_field(b, student_logits=b.student_logits.index_fill(2, torch.tensor([1]), float("inf"))),
     "student_logits contains NaN or inf"),
    (lambda b: with_field(b, teacher_logits=b.teacher_logits.index_fill(1, torch.tensor([2]), float("-inf"))),
     "teacher_logits contains NaN or inf at [b, t] = [0, 2]: a NaN, a +inf or a row that is -inf everywhere"),
    (lambda b: with_field(b, teacher_token_logprobs=_nan_at(b.teacher_token_logprobs, (1, 1))),
     "teacher_token_logprobs contains NaN or inf"),
    (lambda b: with_field(b, teacher_logsumexp=torch.zeros(4, 3, dtype=torch.float64)),
     "teacher_logsumexp must be [B, T] = [3, 4]"),
    (lambda b: with_field(b, teacher_logsumexp=torch.zeros(12, dtype=torch.float64)), "teacher_logsumexp must be"),
    (lambda b: with_field(b, tokens=b.tokens.double()), "tokens must be a torch.long"),
    (lambda b: with_field(b, tokens=b.tokens.int()), "tokens must be a torch.long"),
    (lambda b: with_field(b, tokens=b.tokens + 5), "token ids must lie in [0, 5)"),
    (lambda b: with_field(b, mask=2 * b.mask), "mask must hold only 0 and 1"),
    (lambda b: with_field(b, student_logits=b.student_logits.long()), "floating-point"),
]


@pytest.mark.parametrize("make_bad, needle", BAD_BATCHES)
@pytest.mark.parametrize("entry", ["per_sequence", "surrogate_loss"])
def test_estimator_entry_points_validate_the_batch(make_bad, needle, entry):
    bad = make_bad(make_batch())
    unread = needle.startswith("teacher_logits")   # opd reads no teacher logits: only their shape is checked
    for name in ("vopd", "full_kl", "topk_kl") + (() if unread else ("opd", "k3")):
        with pytest.raises(InputError, match=re.escape(needle)):
            getattr(est, entry)(name, bad)
    if unread:
        assert torch.isfinite(getattr(est, entry)("opd", bad)).all()
        with pytest.raises(InputError, match="teacher_logits must be"):
            getattr(est, entry)("opd", with_field(bad, teacher_logits=bad.teacher_logits[..., :-1]))


def test_validation_opt_out_skips_the_checks():
    bad = with_field(make_batch(), student_logits=_nan_at(make_batch().student_logits))
    assert torch.isnan(est.per_sequence("vopd", bad, validate=False)).any()
    assert torch.isnan(est.surrogate_loss("vopd", bad, validate=False))


def test_all_masked_batch_is_an_error_for_the_mean_reductions_only():
    empty = with_field(make_batch(), mask=torch.zeros(3, 4, dtype=torch.float64))
    for reduction in ("sequence_mean", "token_mean"):
        with pytest.raises(InputError, match="mask is empty"):
            est.surrogate_loss("vopd", empty, reduction=reduction)
        assert est.surrogate_loss("vopd", empty, reduction=reduction, num_items_in_batch=8).item() == 0.0
    assert est.surrogate_loss("vopd", empty, reduction="sum").item() == 0.0
    assert est.surrogate_loss("vopd", empty, reduction="none").tolist() == [0.0, 0.0, 0.0]
    assert est.per_sequence("vopd", empty).tolist() == [0.0, 0.0, 0.0]
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(InputError, match="num_items_in_batch must be positive and finite"):
            est.surrogate_loss("vopd", make_batch(), reduction="token_mean", num_items_in_batch=bad)


def test_validation_passes_under_vmap():
    batch = make_batch()

    def loss(z):
        one = TokenBatch(batch.tokens[:1], batch.mask[:1], z.unsqueeze(0), batch.teacher_token_logprobs[:1],
                         teacher_logits=batch.teacher_logits[:1])
        return est.surrogate_loss("vopd", one)

    per_row = torch.func.vmap(torch.func.grad(loss))(batch.student_logits[:1].expand(2, -1, -1))
    assert per_row.shape == (2, 4, 5) and torch.isfinite(per_row).all()


def test_exact_engines_skip_validation_and_are_unchanged():
    """The engines' inner calls pass validate=False, so validation costs them nothing; their moments
    equal the validated calls' (one-token batches are already checked by construction)."""
    from vopd_analysis.tabular import dp, enumeration
    tree = make_tree(3, 2, coupling=1.0, seed=0)
    specs = {"vopd": {"name": "vopd", "rho": 1.0}}
    a, b = dp.dp_moments(tree, specs)["vopd"], enumeration.exact_moments(tree, specs)["vopd"]
    assert torch.allclose(a.mean, b.mean, atol=1e-14) and math.isclose(a.total_variance, b.total_variance,
                                                                          rel_tol=1e-12)


# ----------------------------------------------------------------------------- 6: console

def test_study_help_lists_the_studies(capsys):
    from studies.run_all import STUDIES
    with pytest.raises(SystemExit) as exit_:
        cli.main(["study", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "studies:" in out
    assert all(name in out for name in STUDIES)


@pytest.mark.parametrize("out, needle", [("", "--out is empty"), ("FILE", "is a file, not a folder")])
def test_study_out_is_checked_before_the_study_runs(tmp_path, capsys, out, needle):
    file = tmp_path / "a_file"
    file.write_text("x")
    assert cli.main(["study", "topk", "--quick", "--out", str(file) if out == "FILE" else out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_mc_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["mc", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for needle in ("--samples SAMPLES number of draws", "(default: 2000)", "(default: 0.01)", "(default: 1.0)",
                   "(default: gaussian)", "(default: 0)", "(default: False)", "normal (CLT) interval",
                   "--estimator ESTIMATOR a registered estimator", "--tables TABLES", "--k K"):
        assert needle in out, needle
    mc_parser = tabular_cli.build_mc_parser()
    assert all(action.help for action in mc_parser._actions)


def test_estimators_columns_align(capsys):
    code, out, _ = run(capsys, "estimators")
    lines = out.splitlines()
    header = lines[0]
    starts = [header.index(c) for c in ("unbiased for", "teacher", "params", "description")]
    rows = {r["name"]: r for r in est.describe()}
    assert code == 0 and len(lines) == len(rows) + 1
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip([0] + starts, starts + [len(line)])]
        row = rows[cells[0]]
        assert cells[1:4] == [row["unbiased_for"], row["teacher_signal"],
                              ", ".join(f"{k}={v}" for k, v in row["params"].items())], line
        assert cells[4] == row["description"]
    assert "student_topk_kl" in rows and "seq_grpo" in rows


def test_estimators_into_a_closed_pipe_prints_no_traceback():
    read, write = os.pipe()
    os.close(read)   # the reader is gone before the first write, as after `| head -3`
    try:
        done = subprocess.run([sys.executable, "-m", "vopd_analysis.cli", "estimators"], stdout=write,
                              stderr=subprocess.PIPE, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    finally:
        os.close(write)
    assert done.returncode == 141 and b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr, \
        done.stderr


# ----------------------------------------------------------------------------- 4: a hard-masked vocabulary

@pytest.mark.parametrize("name", [e.name for e in est.REGISTRY.values() if not e.group and not e.analysis_only])
def test_hard_masked_vocabulary_equals_the_smaller_vocabulary(name):
    """Student and teacher both at -inf on tokens 2 and 5: every estimator (vopd and full_kl included) gives
    the loss and gradient of the batch without those tokens, and no gradient on them."""
    big = make_batch(V=7, seed=3)
    keep, masked = torch.tensor([0, 1, 3, 4, 6]), torch.tensor([2, 5])
    y_small = torch.randint(0, 5, big.tokens.shape, generator=torch.Generator().manual_seed(4))
    teacher = big.teacher_logits.index_fill(-1, masked, float("-inf"))
    params = {"k": 3} if "k" in est.get(name).defaults else {}
    grads, losses = [], []
    for z, t, y in ((big.student_logits.index_fill(-1, masked, float("-inf")), teacher, keep[y_small]),
                    (big.student_logits[..., keep], big.teacher_logits[..., keep], y_small)):
        z = z.clone().requires_grad_(True)
        tlp = torch.log_softmax(t, -1).gather(-1, y[..., None])[..., 0]
        loss = est.surrogate_loss(name, TokenBatch(y, big.mask, z, tlp, teacher_logits=t), **params)
        loss.backward()
        losses.append(loss.detach())
        grads.append(z.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    assert torch.all(grads[0][..., masked] == 0)
    torch.testing.assert_close(grads[0][..., keep], grads[1], rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------------- 5: metadata and answers read back

def test_records_name_the_file_and_the_field(tmp_path):
    from vopd_analysis import records
    path = tmp_path / "x.json"
    for text, needle in [("{oops", f"thing {path} is not JSON (line 1, column 2: "),
                         ("[1]", f"thing {path} must hold a JSON object, not a JSON array"),
                         ('{"a": "1"}', f"{path}: field 'a' must be an integer, got \"1\""),
                         ('{"b": 1}', f"{path}: field 'a' is missing"),
                         ('{"a": 1, "c": 2}', f"{path}: unknown field 'c'"),
                         ('{"a": true}', f"{path}: field 'a' must be an integer, got true")]:
        path.write_text(text)
        with pytest.raises(InputError) as info:
            records.read_record(path, "thing", {"a": int, "b": (float, type(None))}, required=("a",), closed=True)
        assert str(info.value).startswith(needle) and "\n" not in str(info.value), (text, str(info.value))
    with pytest.raises(InputError, match=f"thing {re.escape(str(tmp_path / 'none.json'))} is missing"):
        records.read_json(tmp_path / "none.json", "thing")
    rows = tmp_path / "m.jsonl"
    rows.write_text('{"kind": "train", "step": 1}\n{"kind": "eval"}\n')
    with pytest.raises(InputError, match=r"m\.jsonl:2: field 'step' is missing"):
        records.read_rows(rows)
    rows.write_text('{"kind": "train", "step": 1}\n{"kind": "tr')        # cut off by an interruption
    assert records.read_rows(rows) == [{"kind": "train", "step": 1}]


def test_stored_results_come_back_only_for_their_settings(tmp_path):
    """A stored unit of work is read back exactly for the same settings (tuples and paths compare as their JSON
    form), refused by name for others, and a damaged file is one line, never a traceback or a silent rerun."""
    from pathlib import Path

    from vopd_analysis import records
    path = tmp_path / "work" / "batch-0000.json"
    key = {"seed": 0, "shape": (2, 3), "model": Path("/m"), "lr": 3e-4}
    assert records.read_stored_result(path, key, "a stored batch") is None
    records.store_result(path, key, {"rows": [{"x": 0.1 + 0.2}], "length": 6.5})
    assert records.read_stored_result(path, dict(key), "a stored batch") == {"rows": [{"x": 0.1 + 0.2}], "length": 6.5}
    with pytest.raises(InputError, match=r"batch-0000.json was computed with other settings \(lr, seed\)"):
        records.read_stored_result(path, {**key, "seed": 1, "lr": 1e-3}, "a stored batch")
    path.write_text('{"key": {"seed"')
    with pytest.raises(InputError, match="a stored batch .* is not JSON"):
        records.read_stored_result(path, key, "a stored batch")
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("card, needle", [("{not json", "tiny pair card {card} is not JSON (line 1, column 2"),
                                          ('{"teacher": {}}', "{card}: field 'files' is missing"),
                                          ('{"files": {"a.bin": 5}}', "{card}: files: field 'a.bin' must be a string")])
def test_damaged_pair_card_is_one_line(tmp_path, card, needle):
    from vopd_analysis.lm import pair_card
    (tmp_path / pair_card.CARD).write_text(card)
    with pytest.raises(InputError) as info:
        pair_card.verify_pair(tmp_path, "tiny", "vopd_analysis.lm.tiny")
    assert str(info.value).startswith(needle.format(card=tmp_path / pair_card.CARD)), str(info.value)


def test_plain_number_answers_are_graded_and_other_answers_refused(tmp_path):
    from vopd_analysis.lm import tasks
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "123+456=", "answer": "579"}\n{"prompt": "001+002=", "answer": 3}\n')
    first, second = tasks.read_jsonl(path)
    assert tasks.verify(first, "9.7.5.0") is True and tasks.verify(first, "579") is True     # worked or plain
    assert tasks.verify(first, "9.7.6.0") is False and tasks.verify(second, "3.0.0.0") is True
    assert tasks.verify({"prompt": "q", "answer": "yes"}, " yes ") is True
    for answer in ("true", "4.5", "[1]", "{}"):
        path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "1+1=", "answer": ' + answer + '}\n')
        with pytest.raises(InputError, match=r"p\.jsonl:2: field 'answer' must be a string or an integer .*, got "
                                             + re.escape(answer)):
            tasks.read_jsonl(path)
