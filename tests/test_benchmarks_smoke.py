"""Smoke test of the estimator-cost benchmark: structure of its rows and table, and that
RESULTS.md entries are appended without erasing earlier ones. No timing values are checked."""

import math

import torch

from benchmarks import common
from benchmarks import estimator_cost as ec


def test_measure_tiny_size_gives_one_row_per_estimator():
    rows = ec.measure(vocab=64, tokens=16, device=torch.device("cpu"), repeats=2, warmup=1, min_sample_s=0.0)
    labels = [e[0] for e in ec.ESTIMATORS]
    assert [r.label for r in rows] == labels
    by = {r.label: r for r in rows}
    assert by["opd"].time_ratio == 1.0 and by["opd"].mem_ratio == 1.0
    for r in rows:
        assert (r.vocab, r.tokens) == (64, 16)
        assert r.time_s > 0 and math.isfinite(r.time_ratio) and r.time_ratio > 0
        assert r.mem_bytes > 0 and math.isfinite(r.mem_ratio)
        assert r.input_bytes > 0
    # the floor: opd's 3 passes (the gradient's write into fresh memory), vopd's one more read of the teacher
    assert ec.floor_time("opd", 2.0, 5.0) == 2.0 + 5.0
    assert ec.floor_time("vopd", 2.0, 5.0) == 3.0 + 5.0 and ec.floor_time("full_kl", 2.0, 5.0) == 4.0 + 5.0
    assert ec.floor_time("vopd_topk@16", 2.0, 5.0) == ec.floor_time("opd/eager", 2.0, 5.0) == 7.0
    assert 0 < by["opd"].floor_s < by["vopd"].floor_s and 0 < by["opd"].floor_ratio < by["vopd"].floor_ratio
    # the working memory includes at least the student gradient [N, V] float32
    assert by["opd"].mem_bytes >= 16 * 64 * 4
    # full-logit estimators read the teacher logits as well
    assert by["vopd"].input_bytes > by["opd"].input_bytes or by["vopd"].input_bytes == by["full_kl"].input_bytes

    table = ec.format_table(rows)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["V", "tokens", "opd ms", "opd floor ms", "opd MiB"]
    assert header[5:] == [l for l in labels if l != "opd"]
    assert len(lines) == 3                                   # header, separator, one size
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(cells) == len(header) and cells[:2] == ["64", "16"]
    for cell in cells[5:]:
        t, m = (float(x) for x in cell.split("(")[0].split("/"))
        assert t > 0 and m > 0
    assert isinstance(ec.check_targets(rows), list)


def test_grid_quick_respects_its_cap():
    sizes = ec.grid(quick=True)
    assert sizes and all(v * n <= ec.QUICK_MAX_ELEMENTS for v, n in sizes)
    assert max(v for v, _ in sizes) >= 150_000


def test_peak_memory_counts_tensors_alive_together():
    n = 1 << 16

    def two_alive():
        a = torch.ones(n)
        b = torch.ones(n)
        return float((a + b).sum())

    peak = common.peak_memory(two_alive, torch.device("cpu"))
    assert 3 * 4 * n <= peak < 5 * 4 * n


def test_append_results_keeps_earlier_entries(tmp_path):
    path = tmp_path / "RESULTS.md"
    info = common.machine_info(torch.device("cpu"))
    common.append_results("first entry body", path=path, title="one", info=info)
    first = path.read_text()
    common.append_results("second entry body", path=path, title="two", info=info)
    text = path.read_text()
    assert text.startswith(first)
    assert text.count("# Benchmark results") == 1
    assert "first entry body" in text and "second entry body" in text
    assert text.index("first entry body") < text.index("second entry body")
    assert text.count("Machine: ") == 2 and info["torch"] in text
    entries = [l for l in text.splitlines() if l.startswith("## ")]
    assert len(entries) == 2 and entries[0].endswith("one") and entries[1].endswith("two")


def test_main_no_write_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ec, "grid", lambda quick: [(32, 8)])
    results = tmp_path / "R.md"
    results.write_text("# existing\n\nold entry\n")
    assert ec.main(["--quick", "--repeats", "1", "--threads", "0", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| V | tokens |" in out
    text = results.read_text()
    assert text.startswith("# existing\n\nold entry\n") and "estimator_cost --quick" in text


def test_record_names_the_command_and_title(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_PATH", tmp_path / "RESULTS.md")
    common.record("exact_engine", True, "| a | b |", torch.device("cpu"))
    text = (tmp_path / "RESULTS.md").read_text()
    assert [l for l in text.splitlines() if l.startswith("## ")][0].endswith(" exact_engine --quick")
    assert "`python -m benchmarks.exact_engine --quick`\n\n| a | b |" in text
