"""Built-in synthetic reasoning task, its character tokenizer, verifier and prompt sources.

The task is fixed-width multi-digit addition worked column by column, least significant
digit first, as one adds with carries by hand::

    prompt   "042+379="        (operands zero-padded to ``digits`` digits)
    response "1+2+4.0" + EOS   (2+9 = 1 carry 1, 4+7+1 = 2 carry 1, 0+3+1 = 4 no carry, final carry 0)

Each written token is a function of three things the model can see: the sum digit
s_i = (a_i + b_i + c_i) mod 10 and the carry mark c_{i+1} = [a_i + b_i + c_i >= 10]
("+" or "."), c_i being the mark just written. The stated sum is the digits read in
reverse (here 0421 = 421). A ~100k-parameter transformer learns this to near-perfect
accuracy in a few minutes on a CPU; a briefly trained one gets carries wrong. (Without the
written carries, a model of this size stalls at ~10% accuracy.)

User prompts come from JSONL files, one ``{"prompt": ..., "answer": ...}`` per line; the
answer (a string or an integer) is optional and, when given, the verifier compares it to the
response: a plain-number answer ("579") also matches a worked solution that states it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
from pathlib import Path
from typing import List, Optional

from ..errors import InputError

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
TASK_CHARS = string.digits + "+=."   # the addition task's alphabet (the tiny preset's vocabulary)
CHARS = TASK_CHARS + "".join(c for c in string.printable if c not in TASK_CHARS + "\t\n\r\x0b\x0c")


# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer(chars: str = CHARS):
    """A character-level ``PreTrainedTokenizerFast``: one id per char of ``chars`` (default: all
    printable ASCII; the tiny preset uses just ``TASK_CHARS``), plus pad/eos/unk.

    Special tokens come first (pad=0, eos=1, unk=2), so digits have ids 3..12. Padding is on
    the left, as batched generation with decoder-only models needs.

    Args:
      chars: the vocabulary's characters, in id order (ids 3 .. 2 + len(chars)).

    Returns:
      A ``transformers.PreTrainedTokenizerFast`` of 3 + len(chars) tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left", clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- the addition task

@dataclasses.dataclass(frozen=True)
class Addition:
    """Fixed-width addition of two ``digits``-digit numbers, answer reversed."""

    digits: int = 3

    def prompt(self, a: int, b: int) -> str:
        """The prompt "a+b=" with both operands zero-padded to ``digits`` digits."""
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}="

    def solution(self, a: int, b: int) -> str:
        """The worked answer: per column (least significant first) the sum digit and the carry
        out, written "+" (carry 1) or "." (no carry), then the final carry as a digit."""
        xs, ys = f"{a:0{self.digits}d}"[::-1], f"{b:0{self.digits}d}"[::-1]
        out, carry = [], 0
        for x, y in zip(xs, ys):
            carry, digit = divmod(int(x) + int(y) + carry, 10)
            out.append(f"{digit}{'+' if carry else '.'}")
        return "".join(out) + str(carry)

    @property
    def response_tokens(self) -> int:
        """Characters in a worked solution, plus one for EOS."""
        return 2 * self.digits + 2

    def operands(self, prompt: str):
        """(a, b) of an addition prompt of this task (surrounding spaces allowed); else ``InputError``."""
        m = re.fullmatch(rf"\s*(\d{{{self.digits}}})\+(\d{{{self.digits}}})=\s*", prompt)
        if m is None:
            raise InputError(f"not an addition prompt of {self.digits}-digit operands: {prompt!r}")
        return int(m.group(1)), int(m.group(2))

    def answer(self, prompt: str) -> str:
        """The sum a + b as a decimal string."""
        return str(sum(self.operands(prompt)))

    def sample(self, n: int, seed: int, split: str = "train") -> List[dict]:
        """``n`` records {"prompt", "solution"}. Train and eval are disjoint: a pair (a, b) is in
        eval iff (7a + b) mod 10 == 0, about 10% of all pairs."""
        if split not in ("train", "eval"):
            raise InputError(f"split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(f"{split}-{seed}")
        hi = 10 ** self.digits
        out = []
        while len(out) < n:
            a, b = rng.randrange(hi), rng.randrange(hi)
            if ((a * 7 + b) % 10 == 0) == (split == "eval"):
                out.append({"prompt": self.prompt(a, b), "solution": self.solution(a, b)})
        return out


DEFAULT_TASK = Addition()


def train_prompts(n: int, seed: int = 0, task: Addition = DEFAULT_TASK) -> List[dict]:
    """``n`` training records {"prompt", "solution"} of ``task`` (``Addition.sample``)."""
    return task.sample(n, seed, "train")


def eval_prompts(n: int, seed: int = 0, task: Addition = DEFAULT_TASK) -> List[dict]:
    """``n`` held-out records {"prompt", "solution"} of ``task`` (disjoint from the training ones)."""
    return task.sample(n, seed, "eval")


def parse_answer(response: str, task: Addition = DEFAULT_TASK) -> Optional[str]:
    """The sum a worked response states: its digits with the carry marks dropped, read in
    reverse, without leading zeros; None unless the response has the worked form
    (digit, carry mark) x digits, final digit."""
    text = response.strip()
    if re.fullmatch(rf"(\d[+.]){{{task.digits}}}\d", text) is None:
        return None
    return str(int(re.sub(r"[+.]", "", text)[::-1]))


def check(prompt: str, response: str, answer: Optional[str] = None, task: Addition = DEFAULT_TASK) -> bool:
    """True iff the response's final answer is right.

    With ``answer`` given (user prompts), the stripped response must equal the stripped
    answer; an answer written as a plain number is compared by value with a plain number or
    with the sum a worked solution of ``task`` states ("9.7.5.0" states 579). Otherwise the
    prompt must be an addition prompt of ``task`` and the response a worked solution whose
    stated sum is a + b.
    """
    if answer is not None:
        got, want = response.strip(), str(answer).strip()
        if want.isdigit():
            got = parse_answer(got, task) or got
            return got.isdigit() and int(got) == int(want)
        return got == want
    a, b = task.operands(prompt)
    return parse_answer(response, task) == str(a + b)


def verify(record: dict, response: str) -> Optional[bool]:
    """Grade a response to a prompt record (``check``): against its ``answer`` if it has one, else as an
    addition prompt of the built-in task.

    Args:
      record: {"prompt": str, "answer": optional}.
      response: the decoded response.

    Returns:
      True or False; None when the record cannot be graded.
    """
    try:
        return check(record["prompt"], response, record.get("answer"))
    except InputError:
        return None


# ----------------------------------------------------------------------------- user prompts

@dataclasses.dataclass
class PromptCheck:
    """What a prompt must satisfy to be trained on: every character encodable by ``tokenizer``
    (not mapped to its unknown token, not silently dropped), at least one token, and room for
    ``max_new_tokens`` response tokens in ``context`` positions.

    Calling it on (text, where) raises ``InputError`` starting with ``where`` (``file:line``).
    """

    tokenizer: object
    context: Optional[int] = None          # the model's max_position_embeddings; None: unchecked
    max_new_tokens: int = 0
    _known: dict = dataclasses.field(default_factory=dict, repr=False)

    def __call__(self, text: str, where: str) -> int:
        """Check one prompt; return its length in tokens."""
        bad = self.unencodable(text)
        if bad:
            raise InputError(f"{where}: prompt {_short(text)} has characters the tokenizer cannot encode: "
                             f"{''.join(bad)!r}{self._alphabet()}")
        n = len(self.tokenizer(text)["input_ids"])
        if n == 0:
            raise InputError(f"{where}: prompt {_short(text)} encodes to zero tokens")
        if self.context is not None and n + self.max_new_tokens > self.context:
            room = self.context - n
            raise InputError(f"{where}: prompt of {n} tokens + --max-new-tokens {self.max_new_tokens} = "
                             f"{n + self.max_new_tokens} exceeds the model's context of {self.context} tokens "
                             "(max_position_embeddings); " + (f"use --max-new-tokens {room} or less, or shorter prompts"
                                                               if room > 0 else "the prompt alone fills it"))
        return n

    def unencodable(self, text: str) -> List[str]:
        """The distinct characters of ``text`` the tokenizer maps to its unknown token, or drops
        (encodes to nothing on their own and are lost in the decoded prompt)."""
        out, decoded = [], None
        for c in dict.fromkeys(text):
            if c not in self._known:
                ids = self.tokenizer(c, add_special_tokens=False)["input_ids"]
                unk = self.tokenizer.unk_token_id
                self._known[c] = "unk" if unk is not None and unk in ids else ("none" if not ids else "ok")
            if self._known[c] == "none" and decoded is None:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                decoded = self.tokenizer.decode(ids, skip_special_tokens=True)
            if self._known[c] == "unk" or (self._known[c] == "none" and c not in decoded):
                out.append(c)
        return out

    def _alphabet(self) -> str:
        """" (it knows only '0123...')" for a small character-level vocabulary, else ""."""
        special = set(self.tokenizer.all_special_tokens)
        vocab = [t for t, _ in sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if t not in special]
        if len(vocab) > 100 or any(len(t) != 1 for t in vocab):
            return ""
        return f" (it knows only {''.join(vocab)!r})"


def _short(text: str, width: int = 40) -> str:
    """``repr`` of ``text``, cut to ``width`` characters."""
    return repr(text if len(text) <= width else text[:width] + "...")


def _lines(path: Path):
    """(line number, text) of each line of a UTF-8 file (a leading byte-order mark dropped);
    a line that is not UTF-8 is an ``InputError`` naming file, line and column."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                             f"{err.start + 1}); save the file as UTF-8") from None


def read_jsonl(path, check: Optional[PromptCheck] = None) -> List[dict]:
    """Read prompt records from a JSONL file, one ``{"prompt": str, "answer": str | int}`` object a
    line (the answer optional; blank lines skipped); errors are ``InputError`` naming the file and line.

    Args:
      path: the JSONL file (UTF-8).
      check: when given, every prompt must pass it (characters the tokenizer knows, fits the context).
    Returns:
      [{"prompt": str, "answer": str or None}], at least one.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"prompts file {path} is a folder; expected a JSONL file")
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    records = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise InputError(f"{path}:{lineno}: missing or empty string field 'prompt'")
        answer = rec.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int))):
            raise InputError(f"{path}:{lineno}: field 'answer' must be a string or an integer (\"579\" or 579), "
                             f"got {json.dumps(answer)}")
        if check is not None:
            check(rec["prompt"], f"{path}:{lineno}")
        records.append({"prompt": rec["prompt"],
                        "answer": None if rec.get("answer") is None else str(rec["answer"])})
    if not records:
        raise InputError(f"{path}: no prompts found (the file is empty or blank)")
    return records
