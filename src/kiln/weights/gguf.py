"""GGUF files (llama.cpp's single-file format) read into a :class:`Checkpoint`.

Everything comes from the one file: the Hugging Face config is rebuilt from the metadata, the
tokenizer from the ``tokenizer.ggml.*`` arrays (see :mod:`kiln.weights.gguf_tokenizer`), and the
tensors are renamed to Hugging Face names and dequantized to float32 one at a time.

NOTE: we parse the header ourselves instead of using ``gguf.GGUFReader``: the reader builds a
numpy view for every string of every array (~100k for a 49k-token vocabulary). Re-measured with
gguf 0.19.0 on the default model (SmolLM2-135M-Instruct Q4_1, 49,152-token vocabulary; 5 runs
interleaved in one script on the shared 2-core machine): ``GGUFReader(path)`` median 9.4 s
(6.4-12.6 s), and 8.7 s with every field's ``contents()``, against 0.14 s (0.10-0.22 s) for
``read_gguf``, which returns the same metadata values; a second run, 4.8 s (4.4-6.3 s) and 5.1 s
against 0.09 s (0.07-0.17 s): the reader is 55-66x slower. Dequantization is still
``gguf.quants``.
"""

from __future__ import annotations

import functools
import math
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from kiln.errors import ModelLoadError
from kiln.quantization import GroupQuantized
from kiln.weights.checkpoint import Checkpoint, QuantizedWeightIterator
from kiln.weights.gguf_quantized import LOSSLESS_BITS, group_quantized
from kiln.weights.gguf_tokenizer import build_tokenizer

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF value type id -> (struct format, numpy dtype) for fixed-size scalars (little-endian).
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("B", "<u1"),
    1: ("b", "<i1"),
    2: ("H", "<u2"),
    3: ("h", "<i2"),
    4: ("I", "<u4"),
    5: ("i", "<i4"),
    6: ("f", "<f4"),
    7: ("?", "<u1"),
    10: ("Q", "<u8"),
    11: ("q", "<i8"),
    12: ("d", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7

# general.architecture -> HF model_type and class name. llama.cpp labels Mistral models "llama"
# (same tensors, same maths), so they load as Llama.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors llama.cpp adds that have no HF parameter. rope_freqs holds Llama 3.1's per-dimension
# rope factors; they are turned back into config["rope_scaling"] instead.
_SKIPPED_TENSORS = {"rope_freqs.weight"}

# Plain float types are read directly; everything else goes through gguf.quants.
_FLOAT_DTYPES = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]
    """Row-major (numpy / PyTorch) shape: GGUF's dims reversed, which is the HF shape."""
    qtype: GGMLQuantizationType
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]


def load_gguf(path: Path, name: str) -> Checkpoint:
    """Read a GGUF file's header into a Checkpoint; tensors are dequantized lazily."""
    path = Path(path)
    gguf_file = read_gguf(path)
    meta = gguf_file.metadata
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; kiln reads "
            f"{', '.join(_ARCHITECTURES)} GGUF files"
        )
    if meta.get(f"{arch}.expert_count", 0):
        raise ModelLoadError(f"{path}: mixture-of-experts GGUF models are not supported")
    tensors = {t.name: t for t in gguf_file.tensors}
    _check_tensors(path, gguf_file.tensors)
    tokenizer, tokenizer_config = build_tokenizer(meta, architecture=arch, source=str(path))
    config = _hf_config(path, meta, arch, tensors, len(meta["tokenizer.ggml.tokens"]))
    if "model_max_length" not in tokenizer_config:
        tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    return Checkpoint(
        name=name,
        path=path,
        config=config,
        tokenizer=tokenizer,
        tokenizer_config=tokenizer_config,
        load_weights=_weight_loader(gguf_file, config, keep_quantized=False),
        load_quantized_weights=_weight_loader(gguf_file, config, keep_quantized=True),
        weight_formats={
            name: t.qtype.name
            for t in gguf_file.tensors
            if (name := hf_tensor_name(t.name)) is not None
        },
        generation_config=_generation_config(meta, config),
        num_weights=sum(hf_tensor_name(t.name) is not None for t in gguf_file.tensors),
    )


# --- header -------------------------------------------------------------------------------


def read_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF header: metadata key/values and tensor descriptions (no tensor data)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelLoadError(f"{path}: not a GGUF file (only {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read GGUF file ({e.strerror or e})") from e


def _parse(path: Path, buf: mmap.mmap, size: int) -> GGUFFile:
    if buf[:4] != _MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:
        raise ModelLoadError(f"{path}: big-endian GGUF files are not supported")
    if version not in _SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    reader = _HeaderReader(buf, 8)
    try:
        num_tensors, num_kv = reader.unpack("<QQ")
        metadata = {}
        for _ in range(num_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I")[0])
        infos = [reader.tensor_info() for _ in range(num_tensors)]
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as e:
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF header ({e})") from e
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"{path}: invalid general.alignment {alignment!r}")
    data_start = -(-reader.pos // alignment) * alignment
    tensors = [_tensor(path, data_start, size, *info) for info in infos]
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors)


class _HeaderReader:
    """Sequential reader over the header bytes."""

    def __init__(self, buf: mmap.mmap, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = struct.unpack_from("<Q", self.buf, self.pos)
        start = self.pos + 8
        if start + length > len(self.buf):
            raise ValueError("string runs past the end of the file")
        self.pos = start + length
        return self.buf[start : self.pos].decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<IQ")
            return self.array(item_type, count)
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        (value,) = self.unpack("<" + _SCALARS[vtype][0])
        return value

    def array(self, item_type: int, count: int) -> list[Any]:
        if item_type in _SCALARS:
            # Numeric arrays (token types, scores) are read in one go.
            dtype = np.dtype(_SCALARS[item_type][1])
            if self.pos + count * dtype.itemsize > len(self.buf):
                raise ValueError("array runs past the end of the file")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values.astype(bool).tolist() if item_type == _BOOL else values.tolist()
        if item_type == _STRING:
            return [self.string() for _ in range(count)]
        return [self.value(item_type) for _ in range(count)]

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        (num_dims,) = self.unpack("<I")
        dims = self.unpack(f"<{num_dims}Q")
        qtype, offset = self.unpack("<IQ")
        return name, dims, qtype, offset


def _tensor(
    path: Path,
    data_start: int,
    size: int,
    name: str,
    dims: tuple[int, ...],
    qtype: int,
    offset: int,
) -> GGUFTensorInfo:
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise ModelLoadError(f"{path}: tensor {name!r} has unknown GGML type {qtype}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise ModelLoadError(f"{path}: tensor {name!r} has unsupported GGML type {qtype.name}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    num_elements = math.prod(dims)
    if dims and dims[0] % block_size:
        raise ModelLoadError(
            f"{path}: tensor {name!r} row length {dims[0]} is not a multiple of the "
            f"{qtype.name} block size {block_size}"
        )
    nbytes = num_elements // block_size * type_size
    start = data_start + offset
    if start + nbytes > size:
        raise ModelLoadError(
            f"{path}: file is truncated (tensor {name!r} ends at byte {start + nbytes}, "
            f"file has {size})"
        )
    # GGUF lists dims fastest-varying first (ne[0] = row length); PyTorch lists them last.
    return GGUFTensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)


# --- tensors ------------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF parameter name for a llama/qwen2 GGUF tensor, or None if HF has no such tensor."""
    if gguf_name in _SKIPPED_TENSORS:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS and suffix in ("weight", "bias"):
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match[2] in _BLOCK_TENSORS:
        return f"model.layers.{match[1]}.{_BLOCK_TENSORS[match[2]]}.{match[3]}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent")


def _check_tensors(path: Path, tensors: list[GGUFTensorInfo]) -> None:
    """Fail before any model is built: unknown tensor names or types we cannot dequantize."""
    for tensor in tensors:
        try:
            hf_tensor_name(tensor.name)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        if tensor.qtype not in _FLOAT_DTYPES and not _can_dequantize(tensor.qtype):
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} uses GGML type {tensor.qtype.name}, which kiln "
                "cannot dequantize"
            )


@functools.cache
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf.quants implements ``qtype`` (probed on one zero block)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _weight_loader(
    gguf_file: GGUFFile, config: dict[str, Any], keep_quantized: bool
) -> Callable[[], QuantizedWeightIterator]:
    # llama.cpp reorders q/k rows for its rotary kernel only for the llama architecture.
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    permuted = config["model_type"] == "llama"

    def load_weights() -> QuantizedWeightIterator:
        data = np.memmap(gguf_file.path, dtype=np.uint8, mode="r")
        for tensor in gguf_file.tensors:
            hf_name = hf_tensor_name(tensor.name)
            if hf_name is None:
                continue
            kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
            num_heads = heads[kind] if permuted and kind in heads else None
            quantized = _group_quantized(data, tensor) if keep_quantized else None
            if quantized is not None:
                if num_heads is not None:  # the permutation moves whole rows
                    quantized = GroupQuantized(
                        quantized.bits,
                        *(
                            None
                            if t is None
                            else torch.from_numpy(unpermute_rotary(t.numpy(), num_heads))
                            for t in (quantized.codes, quantized.scales, quantized.offsets)
                        ),
                        source=quantized.source,
                    )
                yield hf_name, quantized
                continue
            array = dequantize_tensor(data, tensor)
            if num_heads is not None:
                array = unpermute_rotary(array, num_heads)
            yield hf_name, torch.from_numpy(array)

    return load_weights


def _group_quantized(data: np.ndarray, tensor: GGUFTensorInfo) -> GroupQuantized | None:
    """A 2-D tensor of a type kiln keeps quantized, read without a detour through floats."""
    if tensor.qtype not in LOSSLESS_BITS or len(tensor.shape) != 2:
        return None
    raw = data[tensor.offset : tensor.offset + tensor.nbytes]
    return group_quantized(raw.reshape(tensor.shape[0], -1), tensor.qtype)


def dequantize_tensor(data: np.ndarray, tensor: GGUFTensorInfo) -> np.ndarray:
    """One tensor as a float32 array of its HF shape; ``data`` is the whole file as uint8."""
    raw = data[tensor.offset : tensor.offset + tensor.nbytes]
    if tensor.qtype in _FLOAT_DTYPES:
        values = raw.view(_FLOAT_DTYPES[tensor.qtype]).reshape(tensor.shape)
        # astype copies, so the result never aliases the read-only file mapping.
        return values.astype(np.float32)
    *rows, row_length = tensor.shape or (1,)
    block_size, type_size = GGML_QUANT_SIZES[tensor.qtype]
    blocks = raw.reshape(*rows, row_length // block_size * type_size)
    try:
        values = dequantize(blocks, tensor.qtype)
    except NotImplementedError as e:
        raise ModelLoadError(
            f"tensor {tensor.name!r}: GGML type {tensor.qtype.name} cannot be dequantized ({e})"
        ) from e
    return np.ascontiguousarray(values, dtype=np.float32).reshape(tensor.shape)


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (also for biases: dim 0 is what moves).

    HF's rotary embedding pairs dim ``i`` with ``i + head_dim/2`` (rotate_half); ggml pairs
    ``2i`` with ``2i+1``. convert_hf_to_gguf.py therefore reorders each head's rows with
    ``w.reshape(heads, 2, head_dim // 2, ...).swapaxes(1, 2)``; swapping back with the other
    split restores HF's order exactly.
    """
    half = weight.shape[0] // num_heads // 2
    restored = weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(restored.reshape(weight.shape))


# --- config -------------------------------------------------------------------------------


def _hf_config(
    path: Path,
    meta: dict[str, Any],
    arch: str,
    tensors: dict[str, GGUFTensorInfo],
    num_tokens: int,
) -> dict[str, Any]:
    """The config.json transformers would build from this file (plus rope scaling it drops)."""

    def need(key: str) -> Any:
        full_key = f"{arch}.{key}"
        if full_key not in meta:
            raise ModelLoadError(f"{path}: GGUF metadata has no {full_key!r}")
        return meta[full_key]

    hidden = need("embedding_length")
    num_heads = need("attention.head_count")
    num_kv_heads = meta.get(f"{arch}.attention.head_count_kv", num_heads)
    # head_dim: explicit key length if given; llama.cpp's rope dims equal head_dim for llama.
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = meta.get(f"{arch}.rope.dimension_count")
    head_dim = head_dim or hidden // num_heads
    vocab_size = meta.get(f"{arch}.vocab_size") or num_tokens
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(path, meta, arch, tensors, rope_theta, head_dim),
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        # No separate output matrix means the embedding doubles as the LM head.
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "pad", "unk"):
        config[f"{key}_token_id"] = _token_id(meta, key, num_tokens)
    return config


def _token_id(meta: dict[str, Any], kind: str, num_tokens: int) -> int | None:
    key = "unknown" if kind == "unk" else "padding" if kind == "pad" else kind
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    return value if isinstance(value, int) and 0 <= value < num_tokens else None


def _generation_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp also stops on end-of-turn / end-of-message tokens (Llama 3's <|eot_id|>...);
    # HF repos list those in generation_config.json's eos_token_id.
    stop_ids = [config["eos_token_id"]]
    for key in ("eot", "eom"):
        stop_ids.append(_token_id(meta, key, config["vocab_size"]))
    eos = list(dict.fromkeys(i for i in stop_ids if i is not None))
    generation: dict[str, Any] = {"bos_token_id": config["bos_token_id"]}
    if eos:
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if config["pad_token_id"] is not None:
        generation["pad_token_id"] = config["pad_token_id"]
    return generation


# --- rope scaling -------------------------------------------------------------------------


def _rope_scaling(
    path: Path,
    meta: dict[str, Any],
    arch: str,
    tensors: dict[str, GGUFTensorInfo],
    rope_theta: float,
    head_dim: int,
) -> dict[str, Any] | None:
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if "rope_freqs.weight" in tensors:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        factors = dequantize_tensor(data, tensors["rope_freqs.weight"]).astype(np.float64)
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        return llama3_rope_scaling(factors, rope_theta, head_dim, original, source=str(path))
    if scaling_type in (None, "none") or not factor:
        return None
    scaling: dict[str, Any] = {"rope_type": scaling_type, "factor": float(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = original
    return scaling


def llama3_rope_factors(scaling: dict[str, Any], rope_theta: float, head_dim: int) -> np.ndarray:
    """Per-dimension divisors of the rotary frequencies, as llama.cpp's converter computes them
    for ``rope_type: llama3`` (the inverse of :func:`llama3_rope_scaling`)."""
    inv_freq = rope_theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    smooth = (old_context / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < old_context / high, 1.0, factors)
    return np.where(wavelen > old_context / low, factor, factors)


def llama3_rope_scaling(
    factors: np.ndarray,
    rope_theta: float,
    head_dim: int,
    original_context: int | None = None,
    *,
    source: str = "GGUF",
) -> dict[str, Any] | None:
    """Recover HF's ``rope_scaling`` (llama3 type) from llama.cpp's ``rope_freqs`` tensor.

    The factors only pin down two ratios of the three parameters: in the smooth band,
    ``smooth = old_context / wavelen * a - b`` with ``a = 1 / (high - low)`` and
    ``b = low / (high - low)``. Any (old_context, low, high) with those ratios gives the same
    frequencies, so we fix old_context from metadata when present, else low_freq_factor = 1
    (Meta's value), and check that the result reproduces the tensor.
    """
    if factors.shape != (head_dim // 2,):
        raise ModelLoadError(
            f"{source}: rope_freqs has shape {factors.shape}, not ({head_dim // 2},)"
        )
    factor = float(factors.max())
    if np.allclose(factors, 1.0):
        return None
    inv_freq = rope_theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv_wavelen = inv_freq / (2 * math.pi)
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    band = ~np.isclose(factors, 1.0, rtol=1e-6) & ~np.isclose(factors, factor, rtol=1e-6)
    if band.sum() >= 2:
        # smooth = slope * inv_wavelen - intercept, slope = old_context / (high - low).
        slope, neg_intercept = np.polyfit(inv_wavelen[band], smooth[band], 1)
        intercept = -neg_intercept
    else:
        slope, intercept = None, 1 / 3  # Meta's low=1, high=4
        if band.sum() == 1:
            slope = (smooth[band][0] + intercept) / inv_wavelen[band][0]
    if slope is None:
        scaling = _llama3_from_boundaries(factors, inv_wavelen, factor, original_context)
    elif original_context:
        spread = original_context / slope
        scaling = _llama3(factor, intercept * spread, intercept * spread + spread, original_context)
    else:
        spread = 1 / intercept  # high - low with low = 1
        scaling = _llama3(factor, 1.0, 1.0 + spread, round(slope * spread))
    if scaling is None or not np.allclose(
        llama3_rope_factors(scaling, rope_theta, head_dim), factors, rtol=1e-4
    ):
        raise ModelLoadError(
            f"{source}: the rope_freqs tensor does not match Llama 3 rope scaling; kiln cannot "
            "reproduce this model's rotary embedding"
        )
    return scaling


def _llama3(factor: float, low: float, high: float, old_context: int) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": round(low, 4),
        "high_freq_factor": round(high, 4),
        "original_max_position_embeddings": int(old_context),
    }


def _llama3_from_boundaries(
    factors: np.ndarray, inv_wavelen: np.ndarray, factor: float, original_context: int | None
) -> dict[str, Any] | None:
    """No smooth band: pick low=1, high=4 and an old context that puts the step in place."""
    if original_context:
        return _llama3(factor, 1.0, 4.0, original_context)
    wavelen = 1 / inv_wavelen
    unscaled = wavelen[np.isclose(factors, 1.0)]
    scaled = wavelen[~np.isclose(factors, 1.0)]
    for exponent in range(8, 24):
        context = 2**exponent
        if (unscaled.size == 0 or unscaled.max() < context / 4) and scaled.min() > context:
            return _llama3(factor, 1.0, 4.0, context)
    return None
