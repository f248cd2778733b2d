"""A tiny teacher/student pair of Qwen2 models for the built-in addition task.

The pair every machine uses is committed with the package (``vopd_analysis/lm/pairs/tiny``:
``teacher/``, ``student/``, each a ``save_pretrained`` model with the task tokenizer, and
``card.json`` with the sha256 of every file, the accuracies and how it was trained).
``load_or_train_pair()`` loads it after checking the hashes: training the same config twice
on two machines gives different weights (float round-off compounds over 1,500 steps), so a
retrained pair would change every real-model number downstream.

``train_pair`` (``python -m vopd_analysis.lm.tiny --retrain``) trains the teacher by supervised
next-token training on worked solutions (cross-entropy on the response tokens only) until it
is near-perfect, and a smaller student on the same data for only a few steps, so that it
starts clearly worse. No weights are downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..errors import exit_with
from . import loading, pair_card, tasks


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A Qwen2 model's widths: hidden size, layers, attention heads, MLP (intermediate) size."""

    hidden: int
    layers: int
    heads: int
    intermediate: int


TEACHER = ModelSize(hidden=64, layers=2, heads=4, intermediate=256)
STUDENT = ModelSize(hidden=48, layers=2, heads=4, intermediate=128)


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """Everything that determines the cached pair (its hash names the cache directory)."""

    digits: int = 3
    teacher: ModelSize = TEACHER
    student: ModelSize = STUDENT
    chars: str = tasks.TASK_CHARS          # vocabulary: the task's alphabet only (no untrained tokens)
    teacher_max_steps: int = 1500
    teacher_target_accuracy: Optional[float] = None  # None: the whole cosine schedule (no early stop)
    teacher_label_smoothing: float = 0.01  # keeps the teacher's log-probs finite-ish (~ -7 nats off-answer)
    student_max_steps: int = 600
    student_target_accuracy: float = 0.3   # the student stops training once it reaches this
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        """12 hex digits of the sha256 of the config (names the cache directory)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + "|v3"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def qwen2_config(size: ModelSize, tokenizer=None, max_positions: int = 64, vocab_size: Optional[int] = None,
                 kv_heads: Optional[int] = None, tie_word_embeddings: bool = True):
    """The ``Qwen2Config`` of every model this package builds from a config (no bos token).

    Args:
      size: hidden width, layers, attention heads and MLP width.
      tokenizer: gives the default vocabulary (``len(tokenizer)``) and the pad and EOS ids;
        None: no pad or EOS id (then ``vocab_size`` is required).
      max_positions: ``max_position_embeddings``.
      vocab_size: output rows V_out, if not ``len(tokenizer)`` (more: padded rows beyond the
        tokenizer, fewer: a model that does not fit its tokenizer).
      kv_heads: key/value heads (grouped-query attention); None: ``size.heads``.
      tie_word_embeddings: share the input embedding and the output layer.

    Returns:
      A ``transformers.Qwen2Config``.
    """
    from transformers import Qwen2Config
    if vocab_size is None and tokenizer is None:
        raise ValueError("qwen2_config needs a tokenizer or a vocab_size")
    return Qwen2Config(vocab_size=len(tokenizer) if vocab_size is None else vocab_size, hidden_size=size.hidden,
                       intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                       num_attention_heads=size.heads, num_key_value_heads=kv_heads or size.heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
                       pad_token_id=None if tokenizer is None else tokenizer.pad_token_id,
                       eos_token_id=None if tokenizer is None else tokenizer.eos_token_id, bos_token_id=None)


def random_model(size: ModelSize, tokenizer=None, seed: int = 0, **config):
    """A randomly initialised Qwen2 causal LM (float32, eval mode): tests, smoke runs, training starts.

    The weights are drawn by transformers' initialiser after ``torch.manual_seed(seed)``, so
    the same arguments give the same weights.

    Args:
      size: the model's widths (``ModelSize``).
      tokenizer: its tokenizer (vocabulary size, pad and EOS ids; also set in the model's
        generation config), or None (then pass ``vocab_size``).
      seed: the initialisation seed.
      **config: further ``qwen2_config`` arguments (max_positions, vocab_size, kv_heads,
        tie_word_embeddings).

    Returns:
      A ``Qwen2ForCausalLM``.
    """
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(size, tokenizer, **config)).eval()
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def supervised_batch(task: tasks.Addition, tokenizer, n: int, rng_seed: int):
    """A supervised batch: ``n`` training prompts with their worked solutions.

    Args:
      task: the addition task (every prompt has the same length).
      tokenizer: the task tokenizer.
      n: batch size.
      rng_seed: seeds ``task.sample``.

    Returns:
      (input_ids, labels), each [n, L] long: prompt + solution + EOS, and the same with -100
      on the prompt (a response-only loss).
    """
    records = task.sample(n, rng_seed, "train")
    prompt_len = len(records[0]["prompt"])
    texts = [r["prompt"] + r["solution"] for r in records]
    ids = torch.tensor(tokenizer(texts, add_special_tokens=False)["input_ids"])
    ids = torch.cat([ids, torch.full((n, 1), tokenizer.eos_token_id)], 1)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids, labels


def train_supervised(model, tokenizer, task: tasks.Addition, steps: int, batch_size: int, lr: float,
                     seed: int, desc: str = "train", stop=None, check_every: int = 25, cosine: bool = True,
                     label_smoothing: float = 0.0) -> int:
    """Next-token cross-entropy on the response tokens, AdamW (weight decay 0.01, clip 1) with linear
    warm-up over steps/20 and, if ``cosine``, the decay lr_s = lr (1 + cos(pi s / steps)) / 2, on fresh
    training prompts every step (``supervised_batch``).

    Args:
      model: trained in place (left in eval mode).
      tokenizer, task: the task tokenizer and task.
      steps, batch_size, lr, seed: the schedule's length, the batch, the peak rate, the data seed.
      desc: the progress bar's label.
      stop: ``stop(model) -> bool``, checked every ``check_every`` steps: training ends when true.
      cosine: decay the rate (else constant after warm-up).
      label_smoothing: of the cross-entropy.

    Returns:
      The number of steps taken.
    """
    from tqdm.auto import tqdm
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    decay = (lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) if cosine else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * decay(s))
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=2)
    for step in bar:
        ids, labels = supervised_batch(task, tokenizer, batch_size, rng_seed=seed * 1_000_003 + step)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if stop is not None and (step + 1) % check_every == 0:
            done = stop(model)
            model.train()
            if done:
                break
    bar.close()
    model.eval()
    return step + 1


@torch.no_grad()
def greedy_accuracy(model, tokenizer, records, batch_size: int = 512, max_new_tokens: Optional[int] = None) -> float:
    """Fraction of ``records`` whose greedy response ``tasks.verify`` accepts.

    Args:
      model, tokenizer: the model (put in eval mode) and its tokenizer.
      records: prompt records.
      batch_size: prompts per ``generate`` call.
      max_new_tokens: default: the built-in task's response length.

    Returns:
      Accuracy in [0, 1] (0 for no records).
    """
    model.eval()
    max_new_tokens = max_new_tokens or tasks.DEFAULT_TASK.response_tokens
    correct = 0
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(bool(tasks.verify(r, t)) for r, t in zip(chunk, texts))
    return correct / max(1, len(records))


COMMITTED = Path(__file__).resolve().parent / "pairs" / "tiny"   # the pair every machine uses
CARD = pair_card.CARD
file_sha256 = pair_card.file_sha256
pair_files = pair_card.pair_files
PAIR = pair_card.CommittedPair("tiny", "vopd_analysis.lm.tiny", COMMITTED, ".cache/vopd_tiny",
                               {"eval_accuracy": "accuracy"})


def verify_pair(root=COMMITTED) -> dict:
    """The pair's card, after checking every file it lists against its sha256.

    A missing card, a missing file or a file whose bytes changed raises ``InputError``
    naming the file and the hash the card expects.
    """
    return PAIR.verify(root)


def train_pair(root, config: TinyConfig = TinyConfig(), num_threads: Optional[int] = None,
               verbose: bool = True) -> dict:
    """Train the pair into ``root`` (``teacher/``, ``student/`` and ``card.json``); return the card.

    The teacher trains (cosine schedule over ``teacher_max_steps``, label smoothing), stopping
    early only if its greedy accuracy on 200 training prompts reaches ``teacher_target_accuracy``
    (None: never; that 200-prompt check stopped a teacher at 87% held-out accuracy); the smaller student trains at a
    constant learning rate only until its greedy accuracy on 200 training prompts reaches
    ``student_target_accuracy``, so it starts clearly worse than the teacher but already
    knows the answer format. The card, written last (it marks the pair complete), holds the
    config, its hash, accuracies on 1000 held-out prompts, training steps and times, the
    package versions and the sha256 of every file.
    """
    import transformers
    root = Path(root)
    torch.set_num_threads(num_threads or 1)  # tiny matmuls: extra threads only add contention
    tokenizer = tasks.build_tokenizer(config.chars)
    task = tasks.Addition(config.digits)
    held_out = task.sample(1000, seed=config.seed + 12345, split="eval")
    card = {"config": dataclasses.asdict(config), "key": config.key(),
            "how": "python -m vopd_analysis.lm.tiny --retrain (vopd_analysis.lm.tiny.train_pair)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    probe = task.sample(200, seed=config.seed + 777, split="train")
    teacher_done = None if config.teacher_target_accuracy is None else (  # noqa: E731
        lambda m: greedy_accuracy(m, tokenizer, probe) >= config.teacher_target_accuracy)
    student_done = lambda m: greedy_accuracy(m, tokenizer, probe) >= config.student_target_accuracy  # noqa: E731
    for name, size in (("teacher", config.teacher), ("student", config.student)):
        start = time.perf_counter()
        model = random_model(size, tokenizer, seed=config.seed + (0 if name == "teacher" else 1))
        if name == "teacher":
            steps = train_supervised(model, tokenizer, task, config.teacher_max_steps, config.batch_size, config.lr,
                                     seed=config.seed, desc="tiny teacher", stop=teacher_done, check_every=50,
                                     label_smoothing=config.teacher_label_smoothing)
        else:
            steps = train_supervised(model, tokenizer, task, config.student_max_steps, config.batch_size,
                                     config.lr, seed=config.seed + 7, desc="tiny student", stop=student_done,
                                     cosine=False)
        seconds = time.perf_counter() - start
        card[name] = {"params": sum(p.numel() for p in model.parameters()), "train_steps": steps,
                      "train_seconds": round(seconds, 1), "eval_accuracy": greedy_accuracy(model, tokenizer, held_out)}
        if verbose:
            print(f"tiny {name}: {card[name]}")
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return pair_card.write_card(root, card)


def differences(card: dict, reference: dict) -> list:
    """What differs between two pair cards: accuracies and file hashes (empty when identical)."""
    return PAIR.differences(card, reference)


def load_or_train_pair(cache_dir=".cache/vopd_tiny", config: TinyConfig = TinyConfig(),
                       num_threads: Optional[int] = None, verbose: bool = True,
                       retrain: bool = False) -> Tuple[str, str, object]:
    """(student_path, teacher_path, tokenizer) of the tiny pair.

    By default this is the pair committed with the package (``vopd_analysis/lm/pairs/tiny``),
    checked file by file against the sha256 in its card, so every machine uses the same
    models. ``retrain=True`` (or a ``config`` other than the default) trains a pair into
    ``cache_dir/<config hash>`` instead (cached: a second call loads it) and, for the default
    config, says whether it differs from the committed pair.

    Args:
      cache_dir: where retrained pairs are kept.
      config: the pair's ``TinyConfig``.
      num_threads: torch threads while training (default 1).
      verbose: print progress and the accuracies.
      retrain: train even for the default config.

    Returns:
      (student directory, teacher directory, the teacher's tokenizer).
    """
    root, card = PAIR.load_or_train(Path(cache_dir) / config.key(),
                                    lambda r: train_pair(r, config, num_threads, verbose),
                                    default=config == TinyConfig(), retrain=retrain, verbose=verbose)
    if verbose:
        print(f"tiny pair: {root} (teacher accuracy {card['teacher']['eval_accuracy']}, "
              f"student {card['student']['eval_accuracy']})")
    return str(root / "student"), str(root / "teacher"), loading.load_tokenizer(root / "teacher", "teacher")


def save_random_pair(directory, seed: int = 0, student: ModelSize = ModelSize(16, 1, 2, 32),
                     teacher: ModelSize = ModelSize(24, 1, 2, 48), chars: str = tasks.TASK_CHARS,
                     student_vocab: Optional[int] = None, teacher_vocab: Optional[int] = None,
                     **config) -> Tuple[str, str]:
    """Save an untrained student/teacher pair sharing a character tokenizer (fast tests, smoke runs).

    Args:
      directory: written to: ``student/`` and ``teacher/``, each a ``save_pretrained`` model
        with the tokenizer.
      seed: the student's initialisation seed; the teacher's is ``seed + 1``.
      student, teacher: the models' sizes.
      chars: the tokenizer's characters (``tasks.build_tokenizer``).
      student_vocab, teacher_vocab: output rows, if not the tokenizer's size (larger ones
        test padded output layers).
      **config: further ``qwen2_config`` arguments, for both models.

    Returns:
      (student_path, teacher_path).
    """
    tokenizer = tasks.build_tokenizer(chars)
    paths = []
    for role, size, vocab, s in (("student", student, student_vocab, seed),
                                 ("teacher", teacher, teacher_vocab, seed + 1)):
        path = Path(directory) / role
        random_model(size, tokenizer, seed=s, vocab_size=vocab, **config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def main(argv=None) -> int:
    """``python -m vopd_analysis.lm.tiny [--retrain] [--out DIR]``: check the committed pair, or retrain it."""
    return PAIR.main(argv, main.__doc__, train_pair, lambda: load_or_train_pair(retrain=True))


if __name__ == "__main__":
    exit_with(main)
