"""The built-in addition task: tokenizer, worked solutions, verifier, prompt sources."""

import json

import pytest

from vopd_analysis.errors import InputError
from vopd_analysis.lm import tasks


@pytest.fixture(scope="module")
def tokenizer():
    return tasks.build_tokenizer()


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    text = "042+379=1+2+4.0"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one id per character
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    batch = tokenizer(["12+3=", "4="], padding=True)
    assert batch["input_ids"][1][:3] == [0, 0, 0]  # left padding, for batched generation


def test_tokenizer_save_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello, 12+34= world?"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token, loaded.eos_token, loaded.padding_side) == ("<pad>", "<eos>", "left")


def test_worked_solution_encodes_carries():
    task = tasks.Addition(3)
    assert task.prompt(42, 379) == "042+379="
    assert task.solution(42, 379) == "1+2+4.0"     # 2+9=11, 4+7+1=12, 0+3+1=4, final carry 0
    assert task.solution(999, 999) == "8+9+9+1"
    assert task.solution(0, 0) == "0.0.0.0"
    for a, b in [(0, 0), (1, 999), (500, 500), (123, 877)]:
        assert tasks.check(task.prompt(a, b), task.solution(a, b), task=task)


def test_verifier_right_and_wrong_answers():
    assert tasks.check("042+379=", "1+2+4.0")
    assert tasks.check("042+379=", " 1+2+4.0 ")             # surrounding whitespace is fine
    assert not tasks.check("042+379=", "1+2+4.1")            # wrong final carry: 1421
    assert not tasks.check("042+379=", "1+3+4.0")            # wrong digit
    assert not tasks.check("042+379=", "1+2+4.")             # truncated
    assert not tasks.check("042+379=", "1+2+4.00")           # trailing garbage
    assert not tasks.check("042+379=", "")
    assert tasks.parse_answer("1+2+4.0") == "421"
    with pytest.raises(InputError, match="not an addition prompt"):
        tasks.check("what is 2+2?", "4")
    # user prompts with an explicit answer: compared as written (integers by value)
    assert tasks.check("what is 2+2?", " 4", answer="4")
    assert tasks.check("x", "012", answer="12")
    assert not tasks.check("x", "5", answer="4")
    assert tasks.verify({"prompt": "what?"}, "4") is None      # ungradable


def test_prompt_generators_are_seeded_and_disjoint():
    assert tasks.train_prompts(20, seed=3) == tasks.train_prompts(20, seed=3)
    assert tasks.train_prompts(20, seed=3) != tasks.train_prompts(20, seed=4)
    train = {r["prompt"] for r in tasks.train_prompts(3000, seed=0)}
    held_out = {r["prompt"] for r in tasks.eval_prompts(300, seed=0)}
    assert not train & held_out
    for r in tasks.eval_prompts(50):
        assert tasks.check(r["prompt"], r["solution"])


def test_read_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": 2}) + "\n\n" + json.dumps({"prompt": "hi"}) + "\n")
    assert tasks.read_jsonl(path) == [{"prompt": "1+1=", "answer": "2"}, {"prompt": "hi", "answer": None}]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a"}', '{"prompt": "b"'], r"p\.jsonl:2: invalid JSON"),
    (['{"prompt": "a"}', '{"answer": "b"}'], r"p\.jsonl:2: missing or empty string field 'prompt'"),
    (['{"prompt": ""}'], r"p\.jsonl:1: missing or empty string field 'prompt'"),
    (['["a"]'], r"p\.jsonl:1: expected a JSON object"),
    (['{"prompt": "a", "answer": [1]}'], r"p\.jsonl:1: field 'answer'"),
    ([""], "no prompts"),
])
def test_read_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message):
        tasks.read_jsonl(path)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        tasks.read_jsonl(tmp_path / "nope.jsonl")
