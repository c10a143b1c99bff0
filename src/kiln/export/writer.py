"""``kiln export``: load a checkpoint once (cast, quantize, pack) and write the result as a
self-contained artifact that later loads with no quantization work; with ``--tp N``, the
weights pre-sharded into one file per tensor-parallel rank, which each rank loads as stored.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import save_file

import kiln
from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.export.manifest import (
    MANIFEST_KEY,
    RANK_WEIGHTS_FILE,
    WEIGHTS_FILE,
    ArtifactManifest,
    file_sha256,
    files_sha256,
    make_readable,
    write_files_manifest,
)
from kiln.models.base import CausalLM
from kiln.models.loader import build_model
from kiln.parallel.group import TensorParallelGroup
from kiln.parallel.shard import check_tp_degree, load_rank_model
from kiln.text.compiled_tokenizer import COMPILED_TOKENIZER_FILE, compile_tokenizer
from kiln.text.tokenizer import Tokenizer
from kiln.weights.checkpoint import Checkpoint
from kiln.weights.resolve import resolve_checkpoint

logger = logging.getLogger(__name__)

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
EXPORT_QUANTIZE = ("none", "int8", "int4")
EXPORT_DEVICES = ("cpu", "cuda")
_METADATA = {"format": "pt", "producer": "kiln"}


@dataclass(frozen=True)
class ExportOptions:
    """The shapes and layout an artifact is exported for."""

    batch_size: int
    sequence_length: int
    dtype: str
    quantize: str | None = None
    device: str = "cpu"
    tp_degree: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.sequence_length < 2:
            raise ConfigError(f"--sequence-length must be >= 2, got {self.sequence_length}")
        if self.dtype not in EXPORT_DTYPES:
            raise ConfigError(
                f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {self.dtype!r}"
            )
        if self.quantize not in (None, *EXPORT_QUANTIZE):
            raise ConfigError(
                f"--quantize must be one of {', '.join(EXPORT_QUANTIZE)}, got {self.quantize!r}"
            )
        if self.device not in EXPORT_DEVICES:
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if isinstance(self.tp_degree, bool) or not isinstance(self.tp_degree, int):
            raise ConfigError(f"--tp must be an integer >= 1, got {self.tp_degree!r}")
        if self.tp_degree < 1:
            raise ConfigError(f"--tp must be >= 1, got {self.tp_degree}")
        if self.tp_degree > 1 and self.quantize in ("int8", "int4"):
            # As EngineArgs refuses it at load: the ranks shard float weights.
            raise ConfigError(
                f"--quantize {self.quantize} does not combine with --tp {self.tp_degree}: tensor "
                "parallelism shards float weights (leave --quantize unset, or none)"
            )
        if self.device == "cpu" and self.dtype == "fp16":
            # kiln runs float16 as float32 on CPUs (see models.loader.resolve_dtype); an
            # artifact that says fp16 but loads as fp32 would be a lie.
            raise ConfigError("--dtype fp16 is not supported on --device cpu; use fp32 or bf16")
        if self.device == "cuda" and self.quantize in ("int8", "int4"):
            raise ConfigError(f"--quantize {self.quantize} runs on the CPU only; use --device cpu")

    @property
    def quantization(self) -> str:
        """The manifest's (and a registry lookup's) ``quantization``: what was asked, or
        ``source`` for the checkpoint's own; pre-sharded ranks always hold floats (a GGUF's
        quantized tensors are dequantized), so with ``--tp`` > 1 the default is ``none``."""
        if self.quantize is None and self.tp_degree > 1:
            return "none"
        return self.quantize or "source"


@dataclass(frozen=True)
class _Weights:
    """What an export wrote for the weights: the files, and the layers stored quantized."""

    files: list[str]
    quantized_layers: dict[str, int]
    tied_head_bits: int | None
    embedding_from_head: bool = False


def export_artifact(model: str | None, output: Path, options: ExportOptions) -> ArtifactManifest:
    """Export ``model`` (anything ``--model`` takes) into the new directory ``output``.

    Written into a temporary sibling first and renamed at the end, so an interrupted export
    never leaves something that looks like an artifact.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{output}: already exists and is not an empty directory")
    checkpoint = resolve_checkpoint(model)
    config = ModelConfig.from_hf(checkpoint.config, checkpoint.generation_config)
    if options.sequence_length > config.max_position_embeddings:
        raise ConfigError(
            f"--sequence-length {options.sequence_length} exceeds the model's maximum "
            f"({config.max_position_embeddings} positions)"
        )
    if options.tp_degree > 1:
        # Up front, before any weight is read: the same rule and message as --tp at load.
        check_tp_degree(config, options.tp_degree)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    try:
        if options.tp_degree > 1:
            weights = _write_rank_files(staging, checkpoint, config, options)
        else:
            weights = _write_whole_model(staging, checkpoint, config, options)
        manifest = _write(staging, weights, checkpoint, options)
        make_readable(staging)
        if output.exists():
            output.rmdir()  # empty (checked above)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_whole_model(
    directory: Path, checkpoint: Checkpoint, config: ModelConfig, options: ExportOptions
) -> _Weights:
    """One rank: the whole model, cast, quantized and packed, in :data:`WEIGHTS_FILE`."""
    dtype = EXPORT_DTYPES[options.dtype]
    # A GPU artifact holds floats: GGUF tensors are dequantized, as kiln does on a GPU.
    quantize = "none" if options.device == "cuda" else options.quantize
    # NOTE: built on the CPU whatever the target: the weights are the same bytes; only CPU
    # packing (oneDNN's opaque layout) is left to load time, as it cannot be saved.
    net = build_model(
        checkpoint,
        config,
        dtype,
        torch.device("cpu"),
        max_positions=options.sequence_length,
        quantize=quantize,
        inference=False,
    )
    save_file(_runtime_tensors(net), str(directory / WEIGHTS_FILE), metadata=_METADATA)
    layers = {name: layer.bits for name, layer in net.linear_layers().items() if layer.bits}
    tied_head_bits = None
    if net.config.tie_word_embeddings and "lm_head" in layers:
        tied_head_bits = layers["lm_head"]  # made by quantize_tied_head: not in the checkpoint
    return _Weights([WEIGHTS_FILE], layers, tied_head_bits, net.embeds_from_head)


def _write_rank_files(
    directory: Path, checkpoint: Checkpoint, config: ModelConfig, options: ExportOptions
) -> _Weights:
    """``--tp N``: one file per rank holding exactly that rank's tensors in their sharded
    shapes, made by the function a TP worker loads a checkpoint with (so an artifact's rank
    and a checkpoint's rank hold the same bytes). One rank at a time: the exporter holds one
    shard, and reads each safetensors tensor's parts, not the whole model at once."""
    dtype = EXPORT_DTYPES[options.dtype]
    n = options.tp_degree
    files = []
    for rank in range(n):
        shard = load_rank_model(
            checkpoint, config, dtype, TensorParallelGroup(rank, n), options.sequence_length
        )
        name = RANK_WEIGHTS_FILE.format(rank=rank, world_size=n)
        metadata = {**_METADATA, "tp_rank": str(rank), "tp_degree": str(n)}
        save_file(_runtime_tensors(shard), str(directory / name), metadata=metadata)
        files.append(name)
        del shard
    return _Weights(files, {}, None)


def _write(
    directory: Path,
    weights: _Weights,
    checkpoint: Checkpoint,
    options: ExportOptions,
) -> ArtifactManifest:
    manifest = ArtifactManifest(
        batch_size=options.batch_size,
        sequence_length=options.sequence_length,
        dtype=_DTYPE_NAMES[EXPORT_DTYPES[options.dtype]],
        quantization=options.quantization,
        quantized_layers=weights.quantized_layers,
        tied_head_bits=weights.tied_head_bits,
        embedding_from_head=weights.embedding_from_head,
        device=options.device,
        tp_degree=options.tp_degree,
        kiln_version=kiln.__version__,
        torch_version=torch.__version__,
        source=checkpoint.name,
        source_path=str(checkpoint.path),
        source_sha256=source_sha256(checkpoint.path),
        weights_sha256=(
            file_sha256(directory / WEIGHTS_FILE)
            if options.tp_degree == 1
            else files_sha256([directory / name for name in weights.files])
        ),
        rank_files=weights.files if options.tp_degree > 1 else [],
    )
    config = {
        **checkpoint.config,
        "torch_dtype": manifest.dtype,
        MANIFEST_KEY: manifest.to_json(),
    }
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json", checkpoint.generation_config)
    _write_tokenizer(checkpoint.tokenizer, directory / "tokenizer.json")
    tokenizer_config = dict(checkpoint.tokenizer_config)
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str):
        # As save_pretrained writes it; a list of named templates stays in the JSON.
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
        del tokenizer_config["chat_template"]
    _write_json(directory / "tokenizer_config.json", tokenizer_config)
    # The tokenizer as the loader adjusts it to its config, compiled: it loads in ~1 ms where
    # parsing tokenizer.json takes 60-100 ms (kiln.text.compiled_tokenizer).
    adjusted = Tokenizer(checkpoint.tokenizer, checkpoint.tokenizer_config).backend
    unsupported = compile_tokenizer(adjusted, directory / COMPILED_TOKENIZER_FILE)
    if unsupported is not None:
        logger.info("tokenizer not compiled (%s): loads parse tokenizer.json", unsupported)
    # Every file, rank files included: the artifact's content id and a pull's checks cover them.
    write_files_manifest(directory)
    return manifest


def _write_tokenizer(tokenizer: tokenizers.Tokenizer, path: Path) -> None:
    """``tokenizer.json`` in the form that parses fastest, for the tokenizers that cannot be
    compiled (kiln.text.compiled_tokenizer), whose warm start parses it (SmolLM2's, 2 cores:
    0.14 s of ~0.27 s before it was compiled; the parse holds the GIL): compact, and a BPE's
    merges as ``"a b"`` strings rather than ``["a", "b"]`` pairs (measured: ~15% less
    parsing). Both merge forms are read by ``tokenizers`` into the same model; the string
    form cannot hold a token with a space, so a tokenizer with one keeps its pairs."""
    data = json.loads(tokenizer.to_str())
    model = data.get("model") or {}
    merges = model.get("merges")
    if (
        model.get("type") == "BPE"
        and isinstance(merges, list)
        and all(
            isinstance(m, list)
            and len(m) == 2
            and all(isinstance(part, str) and part and " " not in part for part in m)
            for m in merges
        )
    ):
        model["merges"] = [f"{a} {b}" for a, b in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _runtime_tensors(net: CausalLM) -> dict[str, torch.Tensor]:
    """Every persistent tensor of the loaded model, by state_dict name: float weights in the
    artifact's dtype and each quantized layer's packed ``qblocks`` (uint8)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in net.state_dict().items():
        # The unpacked loading buffers are gone after finish_loading; skip any left (None).
        if tensor is None or name.endswith((".qcodes", ".qscales", ".qoffsets")):
            continue
        # NOTE: clone: safetensors refuses tensors that share storage (a tied embedding).
        tensors[name] = tensor.detach().contiguous().clone()
    return tensors


def source_sha256(path: Path) -> str:
    """sha256 over a checkpoint's weight files (a GGUF file, or a directory's safetensors or
    pytorch .bin files)."""
    path = Path(path)
    if path.is_file():
        return files_sha256([path])
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not weights:
        weights = sorted(path.glob("*.gguf"))
    return files_sha256(weights)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
