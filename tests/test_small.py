"""The small pair (8,192-token vocabulary): its card, tokenizer, prompts, distribution statistics,
a distillation run on it and the training code path."""

import json
import math
import shutil

import pytest
import torch

from vopd_analysis import InputError
from vopd_analysis.distill import command, compare
from vopd_analysis.lm import loading, pair_card, presets, small, tiny
from vopd_analysis.lm.smoke import save_tiny_pair
from vopd_analysis.lm.statistics import distribution_statistics, token_distribution_statistics


def test_committed_pair_matches_its_card():
    card = small.verify_pair()
    assert {"student/model.safetensors", "teacher/model.safetensors", small.CORPUS} <= set(card["files"])
    assert card["student"]["held_out_cross_entropy"] > card["teacher"]["held_out_cross_entropy"]
    assert card["teacher"]["held_out_perplexity"] == pytest.approx(
        math.exp(card["teacher"]["held_out_cross_entropy"]), rel=1e-3)
    student, teacher, tokenizer = small.load_or_train_pair(verbose=False)
    assert student.startswith(str(small.COMMITTED)) and teacher.startswith(str(small.COMMITTED))
    assert len(tokenizer) == card["tokenizer"]["vocab_size"] >= 8192
    size = sum(p.stat().st_size for p in small.COMMITTED.rglob("*") if p.is_file())
    assert size < 20e6


def test_tampered_file_names_the_file_and_the_hash(tmp_path):
    pair = tmp_path / "pair"
    shutil.copytree(small.COMMITTED, pair)
    expected = small.verify_pair(pair)["files"][small.CORPUS]
    with open(pair / small.CORPUS, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(InputError, match=f"small pair file .*python_docs.jsonl.gz has sha256 .*, expected {expected}"):
        small.verify_pair(pair)
    shutil.copy(small.COMMITTED / small.CORPUS, pair / small.CORPUS)
    (pair / "teacher" / "model.safetensors").unlink()
    with pytest.raises(InputError, match="small pair file .*teacher/model.safetensors is missing .expected sha256"):
        small.verify_pair(pair)
    (pair / small.CARD).unlink()
    with pytest.raises(InputError, match="small pair card .* is missing.*vopd_analysis.lm.small --retrain"):
        small.verify_pair(pair)


def test_tiny_keeps_its_card_interface():
    assert tiny.CARD == pair_card.CARD and tiny.file_sha256 is pair_card.file_sha256
    card = tiny.verify_pair(tiny.COMMITTED)
    assert tiny.differences(card, card) == []
    other = json.loads(json.dumps(card))
    other["student"]["eval_accuracy"] = 0.5
    assert tiny.differences(other, card) == ["student accuracy 0.5 vs 0.33"]


def test_tokenizer_round_trips_text():
    _, _, tokenizer = small.load_or_train_pair(verbose=False)
    text = "Return the sum of a list:\n\n    >>> sum([1, 2])\n    3\n\u00e9t\u00e9 \u2014 na\u00efve\t{x!r}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2 or len(ids) < 40           # merges, not one id per byte
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1 and tokenizer.padding_side == "left"


def test_corpus_split_is_deterministic_and_disjoint():
    docs = small.read_corpus()
    train, held_out = small.split_documents(docs)
    assert len(train) + len(held_out) == len(docs) and 0.05 < len(held_out) / len(docs) < 0.15
    assert not {d["name"] for d in train} & {d["name"] for d in held_out}
    assert all(small.is_held_out(d["name"]) for d in held_out)


def test_prompt_sources_are_deterministic_and_disjoint():
    a, b = small.train_prompts(40, seed=3), small.train_prompts(40, seed=3)
    assert a == b and a != small.train_prompts(40, seed=4)
    ev = small.eval_prompts(40, seed=0)
    assert ev == small.eval_prompts(40, seed=0)
    assert not {r["prompt"] for r in a} & {r["prompt"] for r in ev}
    assert all(small.is_held_out(r["document"]) for r in ev) and not any(small.is_held_out(r["document"]) for r in a)
    _, _, tokenizer = small.load_or_train_pair(verbose=False)
    lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in a + ev]
    assert max(lengths) <= small.PROMPT_TOKENS + 2 and min(lengths) >= 4
    assert all(r["prompt"] == r["prompt"].strip() for r in a + ev)


def test_document_prompt_cuts_back_to_a_whole_word():
    _, _, tokenizer = small.load_or_train_pair(verbose=False)
    text = "The quick brown fox jumps over the lazy dog. " * 20
    prompt = small.document_prompt(text, 4, tokenizer, max_tokens=7)
    assert text[4:].startswith(prompt + " ") and prompt.startswith("quick")
    assert small.document_prompt("short text", 0, tokenizer) == "short text"


# ----------------------------------------------------------------------------- distribution statistics

def test_uniform_teacher_has_entropy_log_v_and_top_k_mass_k_over_v():
    V = 300
    teacher = torch.zeros(5, V)
    student = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    out = token_distribution_statistics(student, teacher, top_k=(1, 16, 256, 1000))
    assert out["teacher_entropy"] == pytest.approx(math.log(V), rel=1e-6)
    for k in (1, 16, 256):
        assert out[f"teacher_top{k}_mass"] == pytest.approx(k / V, rel=1e-5)
    assert out["teacher_top1000_mass"] == pytest.approx(1.0)
    # KL(q || uniform) = log V - H(q)
    assert out["reverse_kl"] == pytest.approx(math.log(V) - out["student_entropy"], abs=1e-5)
    assert out["tokens"] == 5 and out["vocab_size"] == V


def test_hand_checked_two_token_distributions():
    # teacher (3/4, 1/4), student (1/2, 1/2); a second, identical row of point masses
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, -1e4]])
    student = torch.tensor([[0.0, 0.0], [0.0, -1e4]])
    out = token_distribution_statistics(student, teacher, top_k=(1, 2), chunk_tokens=1)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert out["teacher_entropy"] == pytest.approx(h / 2, abs=1e-6)
    assert out["teacher_top1_mass"] == pytest.approx((0.75 + 1.0) / 2, abs=1e-6)
    assert out["teacher_top2_mass"] == pytest.approx(1.0, abs=1e-6)
    assert out["reverse_kl"] == pytest.approx(kl / 2, abs=1e-6)
    assert out["student_entropy"] == pytest.approx(math.log(2) / 2, abs=1e-6)
    with pytest.raises(InputError, match="equal non-empty"):
        token_distribution_statistics(student, teacher[:1])


def test_distribution_statistics_on_rollouts(tmp_path, one_thread):
    student, teacher = save_tiny_pair(tmp_path)
    pair = loading.load_pair(student, teacher)
    same = distribution_statistics(pair.student, pair.student, pair.tokenizer, ["12+", "3+4="], 3, 5, seed=0,
                                   vocab_size=pair.info.vocab_size)
    assert same["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["teacher_entropy"] == pytest.approx(same["student_entropy"], rel=1e-6)
    out = distribution_statistics(pair.student, pair.teacher, pair.tokenizer, ["12+", "3+4="], 3, 5, seed=0,
                                  vocab_size=pair.info.vocab_size)
    assert out["tokens"] == same["tokens"] and out["reverse_kl"] > 0       # same seed: the same rollouts
    assert 0 < out["teacher_top1_mass"] <= out["teacher_top16_mass"] <= out["teacher_top256_mass"] == pytest.approx(1)
    assert out["teacher_entropy"] <= math.log(pair.info.vocab_size) + 1e-6


# ----------------------------------------------------------------------------- distillation and training

def test_distill_small_preset_writes_teacher_logprob(tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "small", "--out", out, "--steps", 3, "--prompts-per-step", 2, "--rollouts-per-prompt", 2,
            "--num-eval", 4, "--eval-every", 3, "--save-every", 0, "--max-new-tokens", 8, "--estimator", "vopd"]
    assert command.main([str(a) for a in argv]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3]
    assert all(r["eval_accuracy"] is None and r["eval_teacher_logprob"] < 0 and r["eval_reverse_kl"] > 0 for r in evals)
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["response_tokens"] == 2 * 2 * 8 and r["sample_accuracy"] is None for r in train)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_eval"]["eval_teacher_logprob"] == evals[-1]["eval_teacher_logprob"]
    assert summary["config"]["preset"] == "small"
    printed = capsys.readouterr().out
    assert "teacher log-prob" in printed and "greedy accuracy" not in printed
    table = compare.summary_table(compare.load_runs([out]))
    assert math.isnan(table["eval_accuracy_mean"][0]) and table["eval_teacher_logprob_mean"][0] < 0
    assert "no verifier" in compare.format_table(table)


def test_small_preset_prompts_and_length_come_from_the_table():
    preset = presets.PRESETS["small"]
    assert preset.max_new_tokens == small.RESPONSE_TOKENS
    assert preset.eval_prompts(3, 0) == small.eval_prompts(3, 0)
    assert set(presets.PRESETS) >= {"tiny", "small", "smollm2", "gemma3"}
    with pytest.raises(SystemExit):
        command.build_parser().parse_args(["--preset", "huge"])


def test_train_pair_runs_on_a_tiny_config(tmp_path, one_thread):
    docs = small.read_corpus()
    train, held_out = small.split_documents(docs)
    few = held_out[:4] + train[:30]
    corpus = small.write_corpus(few, tmp_path / "few.jsonl.gz")
    config = small.SmallConfig(vocab_size=400, teacher=tiny.ModelSize(16, 1, 2, 32),
                               student=tiny.ModelSize(8, 1, 2, 16), max_positions=64, seq_len=32, batch_size=4,
                               teacher_steps=3, student_steps=2, eval_windows=4)
    card = small.train_pair(tmp_path / "pair", config, verbose=False, corpus=corpus)
    assert card["teacher"]["train_steps"] == 3 and card["student"]["train_steps"] == 2
    assert card["tokenizer"]["vocab_size"] == 400 and card["corpus"]["documents"] == 34
    assert small.verify_pair(tmp_path / "pair") == card
    assert small.read_corpus(tmp_path / "pair" / small.CORPUS) == few
    assert math.isfinite(card["teacher"]["held_out_cross_entropy"])
    assert small.differences(card, card) == []
    pair = loading.load_pair(str(tmp_path / "pair" / "student"), str(tmp_path / "pair" / "teacher"))
    assert pair.info.vocab_size == 400


def test_write_corpus_is_byte_deterministic(tmp_path):
    docs = [{"name": "a", "text": "caf\u00e9 one"}, {"name": "b", "text": "two"}]
    one = small.write_corpus(docs, tmp_path / "1.gz").read_bytes()
    assert one == small.write_corpus(docs, tmp_path / "2.gz").read_bytes()
    assert small.read_corpus(tmp_path / "1.gz") == docs
