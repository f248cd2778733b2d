"""The GPU check (``python -m benchmarks.gpu_check``): its dry run on the CPU, the structure of
results.json and results.md, and that a failing or overlong part is recorded while the others run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import distill_step as ds
from benchmarks import estimator_cost as ec
from benchmarks import gpu_check as check

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_passes_every_part_and_writes_results(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[gpu_check" in proc.stdout and "passed; wrote" in proc.stdout
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["dry_run"] is True and record["passed"] is True and record["failed_parts"] == []
    assert set(record["versions"]) >= {"torch", "transformers", "triton", "cuda", "python"}
    assert record["machine"]["device"] == "cpu" and 0 < record["wall_s"] < wall
    assert list(record["parts"]) == list(check.PARTS)
    for name, part in record["parts"].items():
        assert part["status"] == "passed" and part["error"] is None, (name, part)
        assert 0 < part["wall_s"] <= part["budget_s"] and part["markdown"]

    tests = record["parts"]["cuda_tests"]
    assert tests["returncode"] == 0 and tests["failed"] == tests["errors"] == 0
    assert tests["passed"] == tests["tests"] > 0 and "passed" in tests["summary"]

    cost = record["parts"]["estimator_cost"]
    assert cost["skipped"] == [] and isinstance(cost["target_misses"], list)
    assert [r["label"] for r in cost["rows"]] == [e[0] for e in ec.ESTIMATORS] * len(check.DRY.cost_tokens)
    assert all(r["vocab"] == check.DRY.vocab and r["time_s"] > 0 and r["mem_bytes"] > 0 for r in cost["rows"])

    fused = record["parts"]["fused_path"]
    assert sorted({r["tokens"] for r in fused["rows"]}) == list(check.DRY.fused_tokens)
    assert {"materialised", "fused"} <= {r["method"] for r in fused["rows"]} and fused["trl"]
    assert all(r["time_s"] > 0 and r["value_error"] < 0.1 for r in fused["rows"])

    step = record["parts"]["distill_step"]
    assert list(step["rows"]) == list(check.DISTILL_ROWS)
    assert step["response_tokens"] == check.DRY.rollouts[0] * check.DRY.rollouts[2]
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 for r in step["rows"].values())

    md = (tmp_path / "results.md").read_text()
    assert md.startswith("## ") and md.splitlines()[0].endswith(" UTC gpu_check --dry-run")
    assert "\nMachine: " in md and record["device_name"] == "cpu"
    for name, (_, _, title) in check.PARTS.items():
        assert f"### {title}: passed" in md
    assert "| V | tokens | opd ms |" in md and "| N | estimator |" in md and "| estimator | score ms |" in md


def test_a_failing_and_an_overlong_part_are_recorded_and_the_others_run(tmp_path, monkeypatch, capsys):
    def fails(ctx, budget, result, log):
        result["markdown"] = "half a table"
        raise ValueError("broken kernel")

    def sleeps(ctx, budget, result, log):
        result["rows"] = [1]
        time.sleep(10)

    def works(ctx, budget, result, log):
        result["markdown"] = "| a |"

    monkeypatch.setattr(check, "PARTS", {"fails": (fails, 60, "F"), "sleeps": (sleeps, 1, "S"), "works": (works, 60, "W")})
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    record = json.loads((tmp_path / "results.json").read_text())
    parts = record["parts"]
    assert parts["fails"]["status"] == "failed" and "ValueError: broken kernel" in parts["fails"]["error"]
    assert parts["sleeps"]["status"] == "timeout" and parts["sleeps"]["rows"] == [1]
    assert parts["sleeps"]["wall_s"] < 5
    assert parts["works"]["status"] == "passed"
    assert record["failed_parts"] == ["fails", "sleeps"] and record["passed"] is False
    md = (tmp_path / "results.md").read_text()
    assert "### F: failed (ValueError: broken kernel)" in md and "half a table" in md and "### W: passed" in md
    assert "FAILED: fails, sleeps" in capsys.readouterr().out


def test_sized_skips_sizes_predicted_not_to_fit():
    budget = check.Budget(10.0)
    result, seen = {}, []

    def measure(n):
        seen.append(n)
        time.sleep(0.2 * n)          # 0.2 s for n = 1: n = 4 is predicted at 0.8 s, n = 64 at 12.8 s

    check.sized([1, 4, 64], measure, budget, result, lambda msg: None)
    assert seen == [1, 4] and result["skipped"] == [64] and result["out_of_memory"] == []


def test_sized_records_out_of_memory_and_skips_larger_sizes():
    result, seen = {}, []

    def measure(n):
        seen.append(n)
        if n == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    check.sized([1, 4, 16, 64], measure, check.Budget(60.0), result, lambda msg: None)
    assert seen == [1, 4] and result["out_of_memory"] == [4] and result["skipped"] == [16, 64]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_the_full_check_refuses_in_one_line(tmp_path, capsys):
    assert check.main(["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dry-run" in err and not (tmp_path / "r").exists()


def test_distill_summary_matches_its_table():
    rows = {"opd": ("opd", {}, False), "vopd (fused)": ("vopd", {}, True), "vopd": ("vopd", {}, False)}
    phases = {label: [(0.01 * (i + 1), 0.002, 0.005)] * 3 for i, label in enumerate(rows)}
    peaks = {"opd": 2 ** 20, "vopd (fused)": 2 ** 21, "vopd": 3 * 2 ** 20}
    summary = ds.summary(rows, phases, peaks, 1000)
    assert summary["opd"]["step_vs_opd"] == 1.0 and summary["opd"]["step_vs_materialised"] is None
    assert summary["vopd (fused)"]["step_vs_materialised"] == pytest.approx(0.027 / 0.037)
    assert summary["vopd"]["tokens_per_s"] == pytest.approx(1000 / 0.037)
    line = ds.table(rows, phases, peaks, 1000)[3]
    assert line == "| vopd (fused) | 20 | 2.0 | 5 | 1.588 | 0.730 | 7.4% | 37037 | 2 | 2.00 |"


def test_junit_counts_names_the_failures(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
                   '<testcase name="ok"/><testcase name="bad"><failure message="value error 3e-02&#10;more"/></testcase>'
                   '<testcase name="broken"><error/></testcase><testcase name="skip"><skipped/></testcase>'
                   '</testsuite></testsuites>')
    counts = check.junit_counts(xml)
    assert (counts["tests"], counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (4, 1, 1, 1, 1)
    assert counts["failures"] == [("bad", "value error 3e-02"), ("broken", "")]


def test_the_distill_pair_has_the_qwen25_parameter_counts():
    """Built on the meta device (no memory): 494,032,768 and 1,543,714,304 parameters, as Qwen2.5-0.5B and
    -1.5B have, with the lm_head tied to the embedding."""
    meta = torch.device("meta")
    for shape, count in ((check.QWEN25_0_5B, 494_032_768), (check.QWEN25_1_5B, 1_543_714_304)):
        model = check.qwen2_model(shape, check.GPU.vocab, meta, torch.bfloat16, seed=0)
        assert model.num_parameters() == count and model.lm_head.weight is model.model.embed_tokens.weight
        assert next(model.parameters()).dtype == torch.bfloat16
