"""Hugging Face model directories (what ``save_pretrained`` writes) read into a Checkpoint."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import SafetensorError, safe_open

from kiln.config import ModelConfig
from kiln.config.model import read_json
from kiln.errors import ModelLoadError
from kiln.text.compiled_tokenizer import CompiledTokenizer
from kiln.weights.checkpoint import Checkpoint, WeightIterator

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
_LOOKED_FOR = (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "*.safetensors", TORCH_INDEX, TORCH_SINGLE)


def load_hf_dir(path: Path, name: str, tokenizer: CompiledTokenizer | None = None) -> Checkpoint:
    """Read config, tokenizer and the list of weight files; weights themselves load lazily.
    ``tokenizer``: one already loaded (an artifact's compiled tokenizer), instead of parsing
    ``tokenizer.json``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file}: not found (a Hugging Face model needs config.json)")
    config = read_json(config_file)
    generation_config = _optional_json(path / "generation_config.json")
    try:  # an unsupported or broken config is the real blocker: say so before anything else
        ModelConfig.from_hf(config, generation_config)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    if tokenizer is None:
        tokenizer = _load_tokenizer(path / "tokenizer.json")
    tokenizer_config = _optional_json(path / "tokenizer_config.json")
    template = _chat_template(path)
    if template is not None:
        tokenizer_config["chat_template"] = template
    files, read_file = _weight_files(path)
    return Checkpoint(
        name=name,
        path=path,
        config=config,
        tokenizer=tokenizer,
        tokenizer_config=tokenizer_config,
        load_weights=_weight_loader(files, read_file),
        generation_config=generation_config,
        num_weights=_count_safetensors(files) if read_file is _read_safetensors else None,
    )


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _load_tokenizer(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: not found (kiln needs the fast tokenizer file tokenizer.json; "
            "tokenizer.model alone is not supported)"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ModelLoadError(f"{path}: cannot load tokenizer ({e})") from e


def _chat_template(path: Path) -> str | None:
    """A separate chat template file overrides tokenizer_config.json's, as in transformers."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = path / "chat_template.json"
    if json_file.is_file():
        template = read_json(json_file).get("chat_template")
        if not isinstance(template, str):
            raise ModelLoadError(f"{json_file}: expected a 'chat_template' string")
        return template
    return None


# --- weights ------------------------------------------------------------------------------

FileReader = Callable[[Path], WeightIterator]


def _weight_files(path: Path) -> tuple[list[Path], FileReader]:
    """The weight files to read, in preference order safetensors > pytorch .bin."""
    if (path / SAFETENSORS_INDEX).is_file():
        return _indexed_shards(path / SAFETENSORS_INDEX), _read_safetensors
    if (path / SAFETENSORS_SINGLE).is_file():
        return [path / SAFETENSORS_SINGLE], _read_safetensors
    safetensors_files = sorted(path.glob("*.safetensors"))
    if safetensors_files:
        return safetensors_files, _read_safetensors
    if (path / TORCH_INDEX).is_file():
        return _indexed_shards(path / TORCH_INDEX), _read_torch_bin
    if (path / TORCH_SINGLE).is_file():
        return [path / TORCH_SINGLE], _read_torch_bin
    hint = ""
    if any(path.glob("*.gguf")):
        hint = "; to use its GGUF file, pass the .gguf file itself"
    raise ModelLoadError(
        f"{path}: no model weights found (looked for {', '.join(_LOOKED_FOR)}){hint}"
    )


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files a Hugging Face directory's weights are read from (empty when they
    are PyTorch .bin files): for readers of parts of tensors (a tensor-parallel rank)."""
    files, read_file = _weight_files(path)
    return files if read_file is _read_safetensors else []


def _indexed_shards(index_file: Path) -> list[Path]:
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_file}: no 'weight_map'")
    # First appearance order, so shards are read 00001, 00002, ... as the index lists them.
    shards = [index_file.parent / shard for shard in dict.fromkeys(weight_map.values())]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise ModelLoadError(
            f"{index_file}: shard {', '.join(missing)} listed in the index is missing from "
            f"{index_file.parent}"
        )
    return shards


def _weight_loader(files: list[Path], read_file: FileReader) -> Callable[[], WeightIterator]:
    def load_weights() -> WeightIterator:
        for file in files:
            yield from read_file(file)

    return load_weights


@contextlib.contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{file}: cannot read safetensors file ({e})") from e


def _count_safetensors(files: list[Path]) -> int:
    """Tensors in the files, from their headers alone."""
    count = 0
    for file in files:
        with _open_safetensors(file) as f:
            count += len(f.keys())
    return count


def _read_safetensors(file: Path) -> WeightIterator:
    with _open_safetensors(file) as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            yield key, f.get_tensor(key)


def _read_torch_bin(file: Path) -> WeightIterator:
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ModelLoadError(f"{file}: cannot read PyTorch weights ({e})") from e
    if not isinstance(state_dict, dict):
        raise ModelLoadError(f"{file}: expected a state dict, got {type(state_dict).__name__}")
    # Pop as we go so each tensor's memory can be freed once the model has copied it.
    for key in list(state_dict):
        yield key, state_dict.pop(key)
