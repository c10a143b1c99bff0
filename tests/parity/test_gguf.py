"""kiln's GGUF reader against transformers' GGUF support and gguf-py's reference dequantizers.

Real files only: the SmolLM2 GGUF from PyPI, stories260K rewritten as a SentencePiece GGUF the
way llama.cpp's converter would, and small GGUFs written here with gguf.GGUFWriter.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from kiln import LLM
from kiln.config.model import ModelConfig
from kiln.errors import ModelLoadError
from kiln.quantization import GroupQuantized
from kiln.weights.gguf import llama3_rope_scaling, load_gguf

SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "multiple   spaces   inside",
    "Once upon a time, there was a little girl named Lily.",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "numbers 12345, 3.14159 and 1,000,000",
    "中文：你好，世界！",
    "한국어 텍스트입니다",
    "emoji 🤗🚀 and café naïve résumé",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "it's we're they'll I'd DON'T",
    "https://example.com/a?b=c&d=e",
    "",
]
CONFIG_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _weights(checkpoint: Any) -> dict[str, torch.Tensor]:
    weights = {}
    for name, tensor in checkpoint.load_weights():
        assert name not in weights, f"{name} yielded twice"
        weights[name] = tensor
    return weights


def _assert_same_weights(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32, name
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name


def _transformers_state_dict(directory: Path, filename: str) -> tuple[dict[str, torch.Tensor], Any]:
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename)
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the same tensor as the embedding; GGUF stores it once
    return state, model.config


def _assert_config_matches(config: dict[str, Any], reference: Any) -> None:
    for field in CONFIG_FIELDS:
        expected = getattr(reference, field, None)
        if field == "head_dim" and expected is None:  # Qwen2Config derives it
            expected = reference.hidden_size // reference.num_attention_heads
        assert config[field] == expected, field
    ModelConfig.from_hf(config)


def write_gguf(
    path: Path,
    arch: str,
    metadata: dict[str, Any],
    tensors: list[tuple[str, np.ndarray, Q | None]],
) -> Path:
    """A GGUF file; ints are written as uint32, floats as float32, lists as arrays."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- SmolLM2 (gpt2 byte-level BPE, Q4_1 / Q8_0) against transformers ------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Any:
    return load_gguf(smollm2_gguf, "smollm2")


@pytest.fixture(scope="module")
def smollm2_transformers_tokenizer(smollm2_gguf: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_smollm2_weights_and_config_match_transformers(smollm2, smollm2_gguf):
    reference, config = _transformers_state_dict(smollm2_gguf.parent, smollm2_gguf.name)
    _assert_same_weights(_weights(smollm2), reference)
    _assert_config_matches(smollm2.config, config)
    assert smollm2.config["tie_word_embeddings"] is True
    assert ModelConfig.from_hf(smollm2.config, smollm2.generation_config).eos_token_ids == (2,)


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_transformers_tokenizer):
    reference = smollm2_transformers_tokenizer
    assert smollm2.tokenizer.get_vocab() == reference.get_vocab()
    for text in TEXTS:
        ids = smollm2.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text, add_special_tokens=False), text
        decoded = smollm2.tokenizer.decode(ids, skip_special_tokens=False)
        # transformers' llama-3 style GGUF path turns on clean_up_tokenization_spaces; the
        # byte-level round trip itself is what must agree.
        assert decoded == reference.decode(ids, clean_up_tokenization_spaces=False), text
        assert decoded == text
        assert smollm2.tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
    im_start = smollm2.tokenizer.encode("<|im_start|>", add_special_tokens=False).ids
    assert im_start == [1]


def test_smollm2_tokenizer_matches_upstream_tokenizer_json(smollm2):
    # The shared copy was converted by transformers 5 from the same metadata.
    upstream_file = SHARED_MODELS / "smollm2-135m-instruct-gguf" / "tokenizer.json"
    if not upstream_file.is_file():
        pytest.fail("shared smollm2 tokenizer.json not available")
    from tokenizers import Tokenizer

    upstream = Tokenizer.from_file(str(upstream_file))
    for text in TEXTS:
        assert (
            smollm2.tokenizer.encode(text, add_special_tokens=False).ids
            == upstream.encode(text, add_special_tokens=False).ids
        ), text


def test_smollm2_tokenizer_config(smollm2, smollm2_transformers_tokenizer):
    config = smollm2.tokenizer_config
    assert config["chat_template"] == smollm2_transformers_tokenizer.chat_template
    # NOTE: transformers 4.57's GGUF llama converter reports <|im_start|> as eos and adds a BOS
    # despite tokenizer.ggml.add_bos_token = false; kiln follows the file (and llama.cpp).
    assert config["bos_token"] == "<|im_start|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["unk_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False
    assert (
        smollm2.tokenizer.encode("Hi").ids
        == smollm2.tokenizer.encode("Hi", add_special_tokens=False).ids
    )
    assert config["added_tokens_decoder"]["2"]["content"] == "<|im_end|>"
    assert all(token["special"] for token in config["added_tokens_decoder"].values())
    assert len(config["added_tokens_decoder"]) == 17


# --- stories260K as a SentencePiece ("llama" vocabulary) GGUF -------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _protobuf_fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message: enough for tokenizer.model."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield field, wire, value


def read_sentencepiece(path: Path) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types (sentencepiece's enum = GGUF's token_type) of a .model file."""
    tokens, scores, types = [], [], []
    for field, _, message in _protobuf_fields(path.read_bytes()):
        if field != 1:  # ModelProto.pieces
            continue
        piece, score, kind = "", 0.0, 1
        for sub_field, _, value in _protobuf_fields(message):
            if sub_field == 1:
                piece = value.decode("utf-8")
            elif sub_field == 2:
                (score,) = struct.unpack("<f", value)
            elif sub_field == 3:
                kind = value
        tokens.append(piece)
        scores.append(score)
        types.append(kind)
    return tokens, scores, types


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate_half rows -> ggml's pairs."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, *module, suffix = hf_name.split(".")
        return f"blk.{layer}.{_HF_TO_GGUF['.'.join(module)]}.{suffix}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf_name]


@pytest.fixture(scope="module")
def stories_gguf(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted the way llama.cpp's convert_hf_to_gguf.py converts a Llama."""
    import json

    config = json.loads((stories_dir / "config.json").read_text())
    tokens, scores, types = read_sentencepiece(stories_dir / "tokenizer.model")
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = []
    for hf_name, tensor in load_file(stories_dir / "model.safetensors").items():
        name = _gguf_name(hf_name)
        array = tensor.numpy()
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if kind in heads:
            array = llama_cpp_permute(array, heads[kind])
        tensors.append((name, np.ascontiguousarray(array), None))
    metadata = {
        "general.name": "stories260K",
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        "llama.rope.freq_base": config["rope_theta"],
        "llama.rope.dimension_count": config["head_dim"],
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    directory = tmp_path_factory.mktemp("stories_gguf")
    return write_gguf(directory / "stories260K.F32.gguf", "llama", metadata, tensors)


def test_stories_gguf_weights_are_the_original_hf_weights(stories_gguf, stories_dir):
    checkpoint = load_gguf(stories_gguf, "stories")
    # Exact: F32 tensors, and the q/k permutation undone bit for bit.
    _assert_same_weights(_weights(checkpoint), load_file(stories_dir / "model.safetensors"))
    reference, config = _transformers_state_dict(stories_gguf.parent, stories_gguf.name)
    _assert_same_weights(_weights(checkpoint), reference)
    _assert_config_matches(checkpoint.config, config)


def test_stories_gguf_tokenizer(stories_gguf, stories_dir):
    from tokenizers import Tokenizer

    checkpoint = load_gguf(stories_gguf, "stories")
    ours = checkpoint.tokenizer
    reference = AutoTokenizer.from_pretrained(stories_gguf.parent, gguf_file=stories_gguf.name)
    # stories260K's own tokenizer.json reproduces SentencePiece, whose model for this vocab
    # also strips and collapses spaces (llama.cpp never does): compare on texts without those.
    original = Tokenizer.from_file(str(stories_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
            ids, skip_special_tokens=True
        ), text
        if text == " ".join(text.split()) and "<|" not in text:
            assert ids == original.encode(text).ids, text
            assert ours.decode(ids) == original.decode(ids)
    assert ours.encode("<s>hello</s>", add_special_tokens=False).ids[0] == 1
    assert ours.encode("<unk>", add_special_tokens=False).ids == [0]
    config = checkpoint.tokenizer_config
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
    )
    assert config["add_bos_token"] is True
    assert "chat_template" not in config


# --- synthetic GGUFs: every quantization type, qwen2 names, rope scaling ---------------------

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 512, 2


def _byte_level_vocab() -> dict[str, Any]:
    """A minimal gpt2 vocabulary: 3 control tokens, the 256 byte symbols and a few merges."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *symbols]
    tokens += ["".join(m.split()) for m in merges]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }


def _arch_metadata(arch: str) -> dict[str, Any]:
    return {
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.block_count": LAYERS,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.rope.dimension_count": HIDDEN // HEADS,
    }


# Offsets of the float16 scale fields inside one block of the K-quants, which gguf-py cannot
# quantize: random bytes elsewhere are valid quants, random scales could be inf/nan.
_F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _quantized(rng: np.random.Generator, shape: tuple[int, int], qtype: Q) -> np.ndarray:
    values = rng.standard_normal(shape, dtype=np.float32)
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype not in _F16_FIELDS:
        return gguf.quants.quantize(values, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    num_blocks = shape[0] * shape[1] // block_size
    blocks = rng.integers(0, 256, (num_blocks, type_size), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype]:
        scales = rng.uniform(0.001, 0.05, num_blocks).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(num_blocks, 2)
    return blocks.reshape(shape[0], -1)


def _synthetic_tensors(
    types: dict[str, Q], vocab_size: int, biases: bool = False, tied: bool = True
) -> list[tuple[str, np.ndarray, Q | None]]:
    rng = np.random.default_rng(0)
    shapes = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
        "attn_v": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }

    def tensor(name: str, shape: tuple[int, ...], qtype: Q) -> tuple[str, np.ndarray, Q | None]:
        array = _quantized(rng, shape, qtype) if len(shape) == 2 else rng.standard_normal(shape)
        array = array.astype(np.float32) if len(shape) == 1 else array
        return name, array, None if qtype in (Q.F32, Q.F16) else qtype

    tensors = [tensor("token_embd.weight", (vocab_size, HIDDEN), types.get("token_embd", Q.F32))]
    for layer in range(LAYERS):
        tensors.append(tensor(f"blk.{layer}.attn_norm.weight", (HIDDEN,), Q.F32))
        for kind, shape in shapes.items():
            qtype = types.get(f"{kind}.{layer}", types.get(kind, Q.F32))
            tensors.append(tensor(f"blk.{layer}.{kind}.weight", shape, qtype))
            if biases and kind in ("attn_q", "attn_k", "attn_v"):
                tensors.append(tensor(f"blk.{layer}.{kind}.bias", (shape[0],), Q.F32))
        tensors.append(tensor(f"blk.{layer}.ffn_norm.weight", (HIDDEN,), Q.F32))
    tensors.append(tensor("output_norm.weight", (HIDDEN,), Q.F32))
    if not tied:
        tensors.append(tensor("output.weight", (vocab_size, HIDDEN), types.get("output", Q.F32)))
    return tensors


QUANT_TYPES = {
    "token_embd": Q.Q8_0,
    "attn_q.0": Q.Q4_K,
    "attn_k.0": Q.Q6_K,
    "attn_v.0": Q.Q4_0,
    "attn_output.0": Q.Q4_1,
    "ffn_gate.0": Q.BF16,
    "ffn_up.0": Q.F16,
    "ffn_down.0": Q.Q8_0,
    "attn_q.1": Q.Q4_0,
    "attn_k.1": Q.Q8_0,
    "attn_v.1": Q.Q5_K,
    "attn_output.1": Q.Q2_K,
    "ffn_gate.1": Q.Q3_K,
    "ffn_up.1": Q.Q5_0,
    "ffn_down.1": Q.Q5_1,
    "output": Q.Q6_K,
}


@pytest.fixture(scope="module")
def quantized_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = _byte_level_vocab() | {"tokenizer.ggml.pre": "smollm"}
    num_tokens = len(vocab["tokenizer.ggml.tokens"])
    tensors = _synthetic_tensors(QUANT_TYPES, num_tokens, tied=False)
    path = tmp_path_factory.mktemp("quantized") / "tiny-llama.gguf"
    return write_gguf(path, "llama", _arch_metadata("llama") | vocab, tensors)


def test_dequantization_matches_gguf_reference(quantized_llama):
    checkpoint = load_gguf(quantized_llama, "tiny")
    ours = _weights(checkpoint)
    reader = gguf.GGUFReader(quantized_llama)
    assert {t.tensor_type for t in reader.tensors} >= set(QUANT_TYPES.values())
    unpermute = LlamaTensorProcessor(
        {"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}
    )
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output.weight": "lm_head.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for tensor in reader.tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = unpermute.process(expected, tensor.name).weights
        if tensor.name in names:
            name = names[tensor.name]
        else:
            _, layer, kind, suffix = tensor.name.split(".")
            hf = {v: k for k, v in _HF_TO_GGUF.items()}[kind]
            name = f"model.layers.{layer}.{hf}.{suffix}"
        # GGUF dims are reversed: ne = (in, out) is the HF (out, in) shape.
        assert tuple(ours[name].shape) == tuple(int(d) for d in reversed(tensor.shape)), name
        assert torch.equal(ours[name], torch.from_numpy(np.array(expected, np.float32))), name
    assert not checkpoint.config["tie_word_embeddings"]
    ModelConfig.from_hf(checkpoint.config)


def test_quantized_llama_matches_transformers(quantized_llama):
    reference, config = _transformers_state_dict(quantized_llama.parent, quantized_llama.name)
    checkpoint = load_gguf(quantized_llama, "tiny")
    _assert_same_weights(_weights(checkpoint), reference)
    _assert_config_matches(checkpoint.config, config)


def test_qwen2_names_biases_and_tokenizer(tmp_path):
    vocab = _byte_level_vocab()
    num_tokens = len(vocab["tokenizer.ggml.tokens"])
    types = {"token_embd": Q.F16, "attn_q": Q.F32, "attn_k": Q.F16, "ffn_up": Q.Q8_0}
    tensors = _synthetic_tensors(types, num_tokens, biases=True)
    path = write_gguf(
        tmp_path / "tiny-qwen2.gguf", "qwen2", _arch_metadata("qwen2") | vocab, tensors
    )
    checkpoint = load_gguf(path, "qwen")
    ours = _weights(checkpoint)
    assert "model.layers.1.self_attn.k_proj.bias" in ours
    # qwen2 GGUFs are not permuted: q comes back exactly as written.
    written = dict((name, array) for name, array, _ in tensors)
    for kind in ("weight", "bias"):
        expected = torch.from_numpy(written[f"blk.0.attn_q.{kind}"])
        assert torch.equal(ours[f"model.layers.0.self_attn.q_proj.{kind}"], expected)
    reference, config = _transformers_state_dict(path.parent, path.name)
    _assert_same_weights(ours, reference)
    _assert_config_matches(checkpoint.config, config)
    model_config = ModelConfig.from_hf(checkpoint.config)
    assert model_config.model_type == "qwen2" and model_config.attention_bias
    tokenizer = checkpoint.tokenizer
    assert tokenizer.encode(" the<|im_end|>").ids == [num_tokens - 3, 2]
    # Qwen2's pre-tokenizer regex and NFC normalizer, against transformers' Qwen2 converter.
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert tokenizer.encode(text).ids == reference.encode(text), text
    assert tokenizer.decode(tokenizer.encode("héllo 123 the").ids) == "héllo 123 the"
    assert checkpoint.tokenizer_config["chat_template"] == vocab["tokenizer.chat_template"]
    assert checkpoint.tokenizer_config["add_bos_token"] is False


def _llama_cpp_rope_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, for rope_type llama3."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "scaling, original_context",
    [
        (LLAMA31, None),
        (LLAMA31 | {"factor": 32.0, "high_freq_factor": 2.0}, None),
        (LLAMA31 | {"low_freq_factor": 2.0, "original_max_position_embeddings": 4096}, 4096),
    ],
)
def test_llama3_rope_scaling_from_rope_freqs(scaling, original_context):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = _llama_cpp_rope_factors(500000.0, 128, scaling)
    recovered = llama3_rope_scaling(factors.astype(np.float64), 500000.0, 128, original_context)
    assert recovered == scaling
    # And transformers, given the recovered config, rotates exactly as llama.cpp does.
    config = LlamaConfig(hidden_size=128 * 4, num_attention_heads=4, rope_theta=500000.0)
    config.rope_scaling = recovered
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (np.arange(0, 128, 2, dtype=np.float64) / 128))
    np.testing.assert_allclose(inv_freq.numpy(), plain / factors, rtol=1e-5)


def test_rope_freqs_tensor_becomes_rope_scaling(tmp_path):
    vocab = _byte_level_vocab()
    num_tokens = len(vocab["tokenizer.ggml.tokens"])
    head_dim = HIDDEN // HEADS
    scaling = LLAMA31 | {"original_max_position_embeddings": 64, "factor": 4.0}
    factors = _llama_cpp_rope_factors(10000.0, head_dim, scaling)
    tensors = _synthetic_tensors({"token_embd": Q.F16}, num_tokens)
    tensors.append(("rope_freqs.weight", factors, None))
    metadata = _arch_metadata("llama") | vocab
    path = write_gguf(tmp_path / "llama31.gguf", "llama", metadata, tensors)
    checkpoint = load_gguf(path, "llama31")
    assert checkpoint.config["rope_scaling"] == scaling
    assert ModelConfig.from_hf(checkpoint.config).rope_scaling["rope_type"] == "llama3"
    assert not any("rope" in name for name, _ in checkpoint.load_weights())


# --- broken files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = _byte_level_vocab()
    tensors = _synthetic_tensors({}, len(vocab["tokenizer.ggml.tokens"]))
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    return write_gguf(path, "llama", _arch_metadata("llama") | vocab, tensors)


def test_small_gguf_loads(small_gguf):
    assert len(_weights(load_gguf(small_gguf, "small"))) == 2 + LAYERS * 9


@pytest.mark.parametrize("keep", [10, 200, 4000, -1000])
def test_truncated_file(small_gguf, tmp_path, keep):
    data = small_gguf.read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[:keep])
    with pytest.raises(ModelLoadError, match=r"broken\.gguf"):
        load_gguf(broken, "broken")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_gguf(path, "random")


def test_corrupt_header(small_gguf, tmp_path):
    data = bytearray(small_gguf.read_bytes())
    data[24:32] = struct.pack("<Q", 2**62)  # first key's length: far past the end of the file
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_gguf(path, "corrupt")


def test_unsupported_architecture(tmp_path):
    vocab = _byte_level_vocab()
    tensors = _synthetic_tensors({}, len(vocab["tokenizer.ggml.tokens"]))
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", _arch_metadata("mamba") | vocab, tensors)
    with pytest.raises(ModelLoadError, match="architecture 'mamba' is not supported"):
        load_gguf(path, "mamba")


def test_unsupported_tensor_type(tmp_path):
    vocab = _byte_level_vocab()
    tensors = _synthetic_tensors({}, len(vocab["tokenizer.ggml.tokens"]))
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]  # gguf-py has no Q8_1 dequantizer
    raw = np.zeros((HIDDEN, HIDDEN // block_size * type_size), dtype=np.uint8)
    tensors[2] = ("blk.0.attn_q.weight", raw, Q.Q8_1)
    path = write_gguf(tmp_path / "q8_1.gguf", "llama", _arch_metadata("llama") | vocab, tensors)
    with pytest.raises(ModelLoadError, match=r"'blk\.0\.attn_q\.weight'.*Q8_1"):
        load_gguf(path, "q8_1")


def test_unknown_tensor_and_missing_tokenizer(tmp_path):
    vocab = _byte_level_vocab()
    tensors = _synthetic_tensors({}, len(vocab["tokenizer.ggml.tokens"]))
    tensors.append(("blk.0.ffn_gate_exps.weight", np.zeros((4, 4), np.float32), None))
    path = write_gguf(tmp_path / "moe.gguf", "llama", _arch_metadata("llama") | vocab, tensors)
    with pytest.raises(ModelLoadError, match="ffn_gate_exps"):
        load_gguf(path, "moe")
    path = write_gguf(tmp_path / "notok.gguf", "llama", _arch_metadata("llama"), tensors[:-1])
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_gguf(path, "notok")


# --- quantized tensors kept quantized ---------------------------------------------------------


def test_quantized_tensors_load_without_floats_and_dequantize_exactly(quantized_llama):
    """Q4_0, Q4_1, Q4_K and Q8_0 come out as codes + scales (rows unpermuted like the floats);
    their values are exactly the reference dequantization; other types come out as floats."""
    checkpoint = load_gguf(quantized_llama, "tiny")
    floats = _weights(checkpoint)
    kept = dict(checkpoint.load_quantized_weights())
    assert kept.keys() == floats.keys()
    kept_types = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q8_0: 8}
    seen = set()
    for name, tensor in kept.items():
        stored = Q[checkpoint.weight_formats[name]]
        if stored in kept_types:
            assert isinstance(tensor, GroupQuantized), name
            assert tensor.bits == kept_types[stored] and tensor.source == stored.name
            assert torch.equal(tensor.dequantize(), floats[name]), name
            seen.add(stored)
        else:
            assert isinstance(tensor, torch.Tensor), name
            assert torch.equal(tensor, floats[name]), name
    assert seen == set(kept_types)


def test_quantization_plan_follows_the_stored_types(quantized_llama):
    """Default plan: a layer whose tensors are all 4-bit types stays 4-bit; any other quantized
    type makes the (fused) layer 8-bit; all-float layers stay float."""
    llm = LLM(str(quantized_llama), device="cpu", kv_cache_memory=1 << 20)
    bits = {name: layer.bits for name, layer in llm.model.linear_layers().items()}
    assert bits == {
        "model.layers.0.self_attn.qkv_proj": 8,  # Q4_K + Q6_K + Q4_0
        "model.layers.0.self_attn.o_proj": 4,  # Q4_1
        "model.layers.0.mlp.gate_up_proj": None,  # BF16 + F16
        "model.layers.0.mlp.down_proj": 8,  # Q8_0
        "model.layers.1.self_attn.qkv_proj": 8,  # Q4_0 + Q8_0 + Q5_K
        "model.layers.1.self_attn.o_proj": 8,  # Q2_K
        "model.layers.1.mlp.gate_up_proj": 8,  # Q3_K + Q5_0
        "model.layers.1.mlp.down_proj": 8,  # Q5_1
        "lm_head": 8,  # Q6_K
    }
    dense = LLM(str(quantized_llama), device="cpu", quantize="none", kv_cache_memory=1 << 20)
    assert all(layer.bits is None for layer in dense.model.linear_layers().values())
    floats = _weights(llm.checkpoint)
    # Every kept layer holds the float model's weights: exactly where its tensors were all
    # stored in the form it keeps (Q4_1 -> 4-bit, Q8_0 -> 8-bit), else within int8 rounding.
    exact = {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"}
    for name, layer in llm.model.linear_layers().items():
        if layer.bits is None:
            continue
        kept = layer.dense_weight()
        reference = torch.cat([floats[n] for n in llm.model.checkpoint_names(name)])
        if name in exact:
            assert torch.equal(kept, reference), name
        else:
            error = (kept - reference).norm() / reference.norm()
            assert error < 0.01, (name, error)
