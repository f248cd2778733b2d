"""A small teacher/student pair of Qwen2 language models with an 8,192-token vocabulary.

The tiny addition pair has 16 tokens and a near-deterministic teacher; this pair's
next-token distributions look like a language model's: thousands of tokens, long tails, a
teacher that is not sure. It is committed with the package (``vopd_analysis/lm/pairs/small``):

* ``corpus/python_docs.jsonl.gz``: the corpus, one ``{"name", "text"}`` document per line:
  the sections of the standard library's ``pydoc_data.topics`` (the language reference
  topics ``help()`` shows) and the docstrings of the public classes, functions and methods
  of a pinned list of standard library modules (``STDLIB_MODULES``). Python's
  documentation is under the PSF licence (Python Software Foundation License Version 2).
  The text differs between Python versions, so it was extracted once (``extract_corpus``,
  the card says by which Python) and the file is what every machine reads.
* ``teacher/``, ``student/``: ``save_pretrained`` Qwen2 models with tied embeddings and the
  byte-level BPE tokenizer trained on the training documents (``tokenizers``, vocabulary
  8,192, of which ``<pad>`` and ``<eos>`` are special; ``<eos>`` never occurs in training, so
  continuations run to ``max_new_tokens``).
* ``card.json``: config, training steps and times, versions, held-out per-token
  cross-entropy and perplexity of both models, and the sha256 of every file.

A document is held out iff the sha256 of its name is 0 mod 10 (``is_held_out``): about a
tenth of the documents, never seen by the tokenizer, the models or the training prompts.
The teacher trains by next-token prediction on random windows of the training documents; the
smaller student trains on the same stream for fewer steps, so it starts clearly worse.

The distillation task (``vopd distill --preset small``): a prompt is ``PROMPT_TOKENS`` tokens
of a document, cut back to a whole word (``train_prompts``: training documents;
``eval_prompts``: held-out ones), and the student continues it for ``RESPONSE_TOKENS`` tokens.
There is no verifier: the metrics are the reverse KL to the teacher and the teacher's
log-likelihood of the continuation.

    python -m vopd_analysis.lm.small              # check the committed pair against its card
    python -m vopd_analysis.lm.small --retrain    # train it again (minutes on 2 cores)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import random
import re
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import InputError, exit_with
from . import loading, pair_card
from .tiny import ModelSize

COMMITTED = Path(__file__).resolve().parent / "pairs" / "small"   # the pair every machine uses
CARD = pair_card.CARD
PAIR = pair_card.CommittedPair("small", "vopd_analysis.lm.small", COMMITTED, ".cache/vopd_small",
                               {"held_out_cross_entropy": "held-out cross-entropy"})
CORPUS = "corpus/python_docs.jsonl.gz"      # relative to a pair folder
PROMPT_TOKENS = 24       # a prompt is at most this many tokens of a document, cut back to a whole word
RESPONSE_TOKENS = 32     # the student's continuation (no EOS: it never occurs in training)
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer, which AutoTokenizer builds for a folder holding
# a Qwen2 config, replaces a tokenizer's normalizer and pre-tokenizer by NFC and this split): training with
# the same ones makes the saved tokenizer tokenize alike however it is loaded (tests/test_small.py checks)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

# modules whose public docstrings join pydoc_data.topics in the corpus (extract_corpus)
STDLIB_MODULES = (
    "builtins", "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmd",
    "codecs", "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email.message", "enum", "fnmatch", "fractions", "ftplib", "functools",
    "gettext", "glob", "gzip", "hashlib", "heapq", "html.parser", "http.client", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "platform", "pprint", "queue", "random", "re",
    "sched", "selectors", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "types", "typing", "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
)
MIN_DOC_CHARS = 200      # shorter docstrings are left out
MIN_SECTION_CHARS = 1000  # pydoc topics are cut into runs of whole sections at least this long
CORPUS_PYTHON = "3.11.7"  # the Python whose pydoc_data and docstrings the committed corpus holds


# ----------------------------------------------------------------------------- the corpus

def _topic_sections(text: str) -> List[str]:
    """A pydoc topic cut at its blank-line runs (section breaks) into pieces of >= MIN_SECTION_CHARS."""
    pieces, current = [], ""
    for part in re.split(r"\n{3,}", text.strip()):
        current = f"{current}\n\n\n{part}" if current else part
        if len(current) >= MIN_SECTION_CHARS:
            pieces.append(current)
            current = ""
    if current:
        if pieces and len(current) < MIN_SECTION_CHARS:
            pieces[-1] = f"{pieces[-1]}\n\n\n{current}"
        else:
            pieces.append(current)
    return pieces


def extract_corpus(modules: Sequence[str] = STDLIB_MODULES) -> List[dict]:
    """The corpus documents from the running Python: [{"name", "text"}], sorted by name.

    ``topics/<topic>/<i>``: the sections of ``pydoc_data.topics``; ``doc/<module>[.<name>[.<member>]]``:
    ``inspect.getdoc`` of each module, of its public classes and functions defined in it, and of
    the classes' public methods (and ``__init__``), if at least ``MIN_DOC_CHARS`` long. A text
    already taken under another name (inherited or shared docstrings) is left out.

    Args:
      modules: the standard-library modules whose docstrings are taken.

    Returns:
      [{"name": str, "text": str}], sorted by name. The result depends on the Python version;
      the committed corpus was made under ``CORPUS_PYTHON``.
    """
    import importlib
    import inspect
    import pydoc_data.topics

    docs = {}
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        for i, section in enumerate(_topic_sections(text)):
            docs[f"topics/{topic}/{i}"] = section

    def add(name, obj):
        text = inspect.getdoc(obj)
        if text and len(text) >= MIN_DOC_CHARS:
            docs[f"doc/{name}"] = text

    for module_name in modules:
        module = importlib.import_module(module_name)
        add(module_name, module)
        defined_in = (module.__name__, "_" + module.__name__.rsplit(".", 1)[-1])   # C accelerators: _json, ...
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if module_name != "builtins" and getattr(obj, "__module__", None) not in defined_in:
                continue
            add(f"{module_name}.{name}", obj)
            if inspect.isclass(obj):
                for member, value in sorted(vars(obj).items()):
                    if not member.startswith("_") or member == "__init__":
                        add(f"{module_name}.{name}.{member}", value)
    out, seen = [], set()
    for name in sorted(docs):
        if docs[name] not in seen:
            seen.add(docs[name])
            out.append({"name": name, "text": docs[name]})
    return out


def write_corpus(docs: Sequence[dict], path) -> Path:
    """Write the documents as gzipped JSON lines, byte-identical for identical documents (no timestamp).

    Args:
      docs: [{"name", "text"}]; other keys are not written.
      path: the ``.jsonl.gz`` file (parent folders are created).

    Returns:
      ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = "".join(json.dumps({"name": d["name"], "text": d["text"]}, ensure_ascii=False) + "\n" for d in docs)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as fh:
        fh.write(raw.encode("utf-8"))
    path.write_bytes(buffer.getvalue())
    return path


def read_corpus(path=None) -> List[dict]:
    """The documents of a corpus file.

    Args:
      path: a ``.jsonl.gz`` written by ``write_corpus`` (default: the committed corpus); a
        missing file raises ``InputError``.

    Returns:
      [{"name", "text"}] in file order.
    """
    path = Path(path) if path is not None else COMMITTED / CORPUS
    if not path.is_file():
        raise InputError(f"small pair corpus {path} is missing; restore it with git checkout")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def is_held_out(name: str) -> bool:
    """Whether a document is in the evaluation split: int(sha256(name), 16) mod 10 == 0 (about 10%).

    Args:
      name: the document's name.

    Returns:
      True for a held-out document.
    """
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0


def split_documents(docs: Sequence[dict]) -> Tuple[List[dict], List[dict]]:
    """Split documents by ``is_held_out`` of their name, keeping their order.

    Args:
      docs: [{"name", "text", ...}].

    Returns:
      (training documents, held-out documents).
    """
    return [d for d in docs if not is_held_out(d["name"])], [d for d in docs if is_held_out(d["name"])]


@lru_cache(maxsize=2)
def _committed_split(split: str) -> Tuple[dict, ...]:
    train, held_out = split_documents(read_corpus())
    return tuple(train if split == "train" else held_out)


# ----------------------------------------------------------------------------- the tokenizer

def train_tokenizer(texts: Sequence[str], vocab_size: int = 8192):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``, Qwen2's normalizer (NFC) and
    pre-tokenizer, ``vocab_size`` ids of which ``<pad>`` = 0, ``<eos>`` = 1 and ``<unk>`` = 2 are special
    (the latter two never occur in encoded text), left padding, no prefix space: decoding the ids of
    an NFC text gives the text back. Training is deterministic (same texts, same tokenizer.json).

    Args:
      texts: the training texts.
      vocab_size: the number of ids, special ones included (BPE merges need ``min_frequency`` 2,
        so a small corpus can give fewer).

    Returns:
      A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left", clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- the models and their training

TEACHER = ModelSize(hidden=192, layers=3, heads=6, intermediate=512)
STUDENT = ModelSize(hidden=128, layers=2, heads=4, intermediate=384)


@dataclasses.dataclass(frozen=True)
class SmallConfig:
    """Everything that determines a trained pair; ``key()`` (its hash) names the cache directory.

    Attributes:
      vocab_size: the tokenizer's vocabulary.
      teacher, student: the two ``ModelSize``s (hidden, layers, heads, intermediate).
      max_positions: the models' context length.
      seq_len: tokens per training window.
      batch_size: windows per training step.
      teacher_steps, student_steps: training steps of each model.
      lr, weight_decay: AdamW's peak learning rate and weight decay (see ``train_lm``).
      eval_windows: held-out cross-entropy over the first this many windows (None: all).
      seed: the teacher's init seed (the student's is seed + 1; the windows', seed + 1000 and + 1001).
    """

    vocab_size: int = 8192
    teacher: ModelSize = TEACHER
    student: ModelSize = STUDENT
    max_positions: int = 128
    seq_len: int = 64              # training windows: a prompt (<= 24 tokens) and its 32-token continuation fit
    batch_size: int = 8            # windows per step (smaller batches, more steps: lower loss for the same time)
    teacher_steps: int = 1200
    student_steps: int = 600       # the student trains on the same stream for half the steps
    lr: float = 3e-3
    weight_decay: float = 0.1
    eval_windows: Optional[int] = None   # held-out cross-entropy on the first windows of seq_len tokens (None: all)
    seed: int = 0

    def key(self) -> str:
        """The first 12 hex digits of the sha256 of the config as sorted JSON (plus a version tag)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + "|small-v1"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def random_model(size: ModelSize, tokenizer, max_positions: int = 128, seed: int = 0):
    """A randomly initialised Qwen2 causal LM with tied embeddings over ``tokenizer``'s vocabulary.

    Args:
      size: hidden size, layers, heads and MLP width.
      tokenizer: gives the vocabulary size and the pad and eos ids (also set in its generation config).
      max_positions: the context length.
      seed: ``torch.manual_seed`` before initialisation (this sets the global torch RNG).

    Returns:
      A ``transformers.Qwen2ForCausalLM`` (float32).
    """
    from . import tiny
    return tiny.random_model(size, tokenizer, seed, max_positions=max_positions).train()


def token_stream(tokenizer, docs: Sequence[dict]) -> torch.Tensor:
    """The documents' token ids, each followed by the ids of a blank line ("\\n\\n").

    Args:
      tokenizer: the pair's tokenizer.
      docs: [{"text", ...}].

    Returns:
      [N] long tensor.
    """
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: List[int] = []
    for enc in tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]:
        ids += enc + sep
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` windows of ``length`` consecutive tokens at uniformly drawn starts.

    Args:
      stream: token ids, [N] with N >= length.
      n: number of windows.
      length: tokens per window.
      generator: the torch generator the starts come from.

    Returns:
      [n, length] long tensor.
    """
    starts = torch.randint(0, len(stream) - length + 1, (n,), generator=generator)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def train_lm(model, stream: torch.Tensor, steps: int, batch_size: int, seq_len: int, lr: float,
             weight_decay: float, seed: int, desc: str = "train", block: int = 50) -> List[float]:
    """Next-token training on random windows of ``stream``: AdamW, linear warm-up over the first 5%
    of the steps, cosine decay to 0, gradients clipped at norm 1.

    The learning rate at step s is lr min(1, (s + 1) / w) (1 + cos(pi s / steps)) / 2, with
    w = max(1, steps // 20); weight decay applies to the parameters of dimension >= 2 only;
    AdamW betas (0.9, 0.98). The loss is the mean cross-entropy of tokens 2..length of each window.

    Args:
      model: a causal LM (trained in place, left in eval mode).
      stream: token ids, [N].
      steps: optimisation steps.
      batch_size: windows per step.
      seq_len: tokens per window.
      lr: peak learning rate.
      weight_decay: AdamW weight decay.
      seed: seed of the generator that draws the windows.
      desc: the progress bar's label.
      block: steps per reported loss.

    Returns:
      The mean training loss (nats per token) of each run of ``block`` steps, rounded to 4
      decimals (the last run possibly shorter).
    """
    from tqdm.auto import tqdm
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses, running = [], []
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=2)
    for step in bar:
        ids = random_windows(stream, batch_size, seq_len, generator)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if len(running) == block or step == steps - 1:
            losses.append(round(sum(running) / len(running), 4))
            running = []
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def cross_entropy(model, stream: torch.Tensor, seq_len: int, max_windows: Optional[int] = None,
                  batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats per token) over consecutive non-overlapping windows of ``stream``.

    The windows are stream[i L : (i + 1) L] for the first n = min(max_windows, N // L) of them;
    each window's first token is context only, so the mean is over n (L - 1) predictions.

    Args:
      model: a causal LM (set to eval mode).
      stream: token ids, [N].
      seq_len: L, tokens per window.
      max_windows: n at most (None: every whole window).
      batch_size: windows per forward pass.

    Returns:
      The cross-entropy as a float; exp of it is the perplexity.
    """
    model.eval()
    n = len(stream) // seq_len if max_windows is None else min(max_windows, len(stream) // seq_len)
    windows = stream[:n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        ids = windows[i:i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


def train_pair(root, config: SmallConfig = SmallConfig(), num_threads: Optional[int] = None, verbose: bool = True,
               corpus=None) -> dict:
    """Train the pair into ``root`` (``corpus/``, ``teacher/``, ``student/`` and ``card.json``); return the card.

    The tokenizer trains on the training documents of ``corpus`` (default: the committed
    corpus file, copied into ``root``); the teacher for ``teacher_steps`` and the smaller student
    for ``student_steps`` on random windows of the same token stream. The card, written last (it
    marks the pair complete), holds the config, its hash, the per-token cross-entropy (nats) and
    perplexity of both models on the held-out documents, training steps, losses and times, the
    package and Python versions and the sha256 of every file.

    Args:
      root: the new pair's folder.
      config: what to train.
      num_threads: torch CPU threads (None: 1; set for the rest of the process).
      verbose: print each model's numbers.
      corpus: a corpus ``.jsonl.gz`` (None: the committed one).

    Returns:
      The card (as written to ``root/card.json``).
    """
    import platform

    import tokenizers
    import transformers
    root = Path(root)
    torch.set_num_threads(num_threads or 1)   # small matmuls on a shared CPU: one thread was fastest
    source = Path(corpus) if corpus is not None else COMMITTED / CORPUS
    (root / CORPUS).parent.mkdir(parents=True, exist_ok=True)
    if source.resolve() != (root / CORPUS).resolve():
        shutil.copyfile(source, root / CORPUS)
    train_docs, held_out = split_documents(read_corpus(root / CORPUS))
    start = time.perf_counter()
    tokenizer = train_tokenizer([d["text"] for d in train_docs], config.vocab_size)
    stream, held_stream = token_stream(tokenizer, train_docs), token_stream(tokenizer, held_out)
    card = {"config": dataclasses.asdict(config), "key": config.key(),
            "how": "python -m vopd_analysis.lm.small --retrain (vopd_analysis.lm.small.train_pair)",
            "corpus": {"file": CORPUS, "documents": len(train_docs) + len(held_out),
                       "held_out_documents": len(held_out),
                       "characters": sum(len(d["text"]) for d in train_docs + held_out),
                       "train_tokens": len(stream), "held_out_tokens": len(held_stream),
                       "source": "pydoc_data.topics sections and docstrings of vopd_analysis.lm.small.STDLIB_MODULES, "
                                 f"extracted by vopd_analysis.lm.small.extract_corpus under Python {CORPUS_PYTHON}",
                       "licence": "Python documentation: PSF License Version 2 (Python Software Foundation)"},
            "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                          "train_seconds": round(time.perf_counter() - start, 1)},
            "weights": "float32 safetensors",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for name, size, steps, seed in (("teacher", config.teacher, config.teacher_steps, config.seed),
                                    ("student", config.student, config.student_steps, config.seed + 1)):
        start = time.perf_counter()
        model = random_model(size, tokenizer, config.max_positions, seed=seed)
        losses = train_lm(model, stream, steps, config.batch_size, config.seq_len, config.lr, config.weight_decay,
                          seed=seed + 1000, desc=f"small {name}")
        seconds = time.perf_counter() - start
        ce = cross_entropy(model, held_stream, config.seq_len, config.eval_windows)
        card[name] = {"params": sum(p.numel() for p in model.parameters()), "train_steps": steps,
                      "train_tokens": steps * config.batch_size * config.seq_len, "train_seconds": round(seconds, 1),
                      "held_out_cross_entropy": round(ce, 4), "held_out_perplexity": round(math.exp(ce), 2),
                      "train_loss_per_50_steps": losses}
        if verbose:
            print(f"small {name}: " + ", ".join(f"{k} {v}" for k, v in card[name].items()
                                                if k != "train_loss_per_50_steps"))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    card["train_seconds_total"] = round(card["tokenizer"]["train_seconds"] + card["teacher"]["train_seconds"]
                                        + card["student"]["train_seconds"], 1)
    return pair_card.write_card(root, card)


def verify_pair(root=COMMITTED) -> dict:
    """The pair's card, after checking every file it lists (corpus included) against its sha256.

    Args:
      root: the pair folder (default: the committed one); a missing or changed file raises
        ``InputError`` naming it.

    Returns:
      The card (a dict).
    """
    return PAIR.verify(root)


def differences(card: dict, reference: dict) -> list:
    """What differs between two pair cards: held-out cross-entropies and file hashes.

    Returns:
      Human-readable lines, empty when identical (``pair_card.differences``).
    """
    return PAIR.differences(card, reference)


def load_or_train_pair(cache_dir=".cache/vopd_small", config: SmallConfig = SmallConfig(),
                       num_threads: Optional[int] = None, verbose: bool = True,
                       retrain: bool = False) -> Tuple[str, str, object]:
    """(student_path, teacher_path, tokenizer) of the small pair.

    By default the pair committed with the package (``vopd_analysis/lm/pairs/small``), checked file
    by file against the sha256 in its card. ``retrain=True`` (or a ``config`` other than the
    default) trains a pair into ``cache_dir/<config hash>`` instead (cached: a second call loads
    it) and, for the default config, says whether it differs from the committed pair.

    Args:
      cache_dir: parent folder of trained pairs.
      config: the pair's config.
      num_threads: torch threads while training.
      verbose: print the pair's folder and cross-entropies.
      retrain: train even for the default config.

    Returns:
      (student folder, teacher folder, tokenizer loaded from the teacher folder).
    """
    root, card = PAIR.load_or_train(Path(cache_dir) / config.key(),
                                    lambda r: train_pair(r, config, num_threads, verbose),
                                    default=config == SmallConfig(), retrain=retrain, verbose=verbose)
    if verbose:
        print(f"small pair: {root} (held-out cross-entropy: teacher {card['teacher']['held_out_cross_entropy']}, "
              f"student {card['student']['held_out_cross_entropy']} nats per token)")
    return str(root / "student"), str(root / "teacher"), loading.load_tokenizer(root / "teacher", "teacher")


# ----------------------------------------------------------------------------- prompts

@lru_cache(maxsize=1)
def _prompt_tokenizer():
    return loading.load_tokenizer(COMMITTED / "teacher", "teacher")


def document_prompt(text: str, start: int, tokenizer, max_tokens: int = PROMPT_TOKENS) -> Optional[str]:
    """A prompt: the first ``max_tokens`` tokens of ``text[start:]``, cut back to the end of its last whole word.

    Only the first 16 ``max_tokens`` characters are tokenized. If the decoded tokens do not reach
    the end of the text, the prefix is cut at its last whitespace (the last word may be partial);
    trailing whitespace is stripped.

    Args:
      text: the document.
      start: character offset of the prompt's start.
      tokenizer: the pair's tokenizer.
      max_tokens: tokens at most.

    Returns:
      The prompt, or None if it holds no word character.
    """
    ids = tokenizer(text[start:start + 16 * max_tokens], add_special_tokens=False)["input_ids"][:max_tokens]
    prefix = tokenizer.decode(ids)
    if len(prefix) < len(text) - start:          # the window ends inside the text: drop its last partial word
        prefix = prefix[:max((m.start() for m in re.finditer(r"\s", prefix)), default=0)]
    prefix = prefix.rstrip()
    return prefix if re.search(r"\w", prefix) else None


def word_starts(text: str) -> List[int]:
    """Character offsets where a word starts after whitespace, with 0 first (even if text starts with a space).

    Args:
      text: the document.

    Returns:
      [0, offsets of every non-space character that follows a run of whitespace].
    """
    return [0] + [m.end() for m in re.finditer(r"\s+(?=\S)", text)]


def sample_prompts(docs: Sequence[dict], n: int, seed: int, tag: str, tokenizer=None) -> List[dict]:
    """``n`` prompts: a document drawn with probability proportional to its length, a word start drawn
    uniformly in it, and the ``document_prompt`` there; draws giving None or fewer than 20
    characters are redrawn.

    Args:
      docs: the documents to draw from.
      n: number of prompts.
      seed, tag: seed the draws (``random.Random(f"small-{tag}-{seed}")``): deterministic in both.
      tokenizer: the pair's tokenizer (default: the committed teacher's).

    Returns:
      [{"prompt": str, "document": its name}] of length ``n`` (documents may repeat).
    """
    tokenizer = tokenizer or _prompt_tokenizer()
    rng = random.Random(f"small-{tag}-{seed}")
    weights = [len(d["text"]) for d in docs]
    out = []
    while len(out) < n:
        doc = rng.choices(docs, weights)[0]
        prompt = document_prompt(doc["text"], rng.choice(word_starts(doc["text"])), tokenizer)
        if prompt is not None and len(prompt) >= 20:
            out.append({"prompt": prompt, "document": doc["name"]})
    return out


def train_prompts(n: int, seed: int = 0) -> List[dict]:
    """``n`` prompts from the committed corpus's training documents (``sample_prompts``, deterministic in ``seed``).

    Returns:
      [{"prompt", "document"}].
    """
    return sample_prompts(_committed_split("train"), n, seed, "train")


def eval_prompts(n: int, seed: int = 0) -> List[dict]:
    """``n`` prompts from the committed corpus's held-out documents (``sample_prompts``, deterministic in ``seed``).

    Returns:
      [{"prompt", "document"}].
    """
    return sample_prompts(_committed_split("eval"), n, seed, "eval")


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    """``python -m vopd_analysis.lm.small [--retrain] [--out DIR]``: check the committed pair, or retrain it."""
    return PAIR.main(argv, main.__doc__, train_pair, lambda: load_or_train_pair(retrain=True))


if __name__ == "__main__":
    exit_with(main)
