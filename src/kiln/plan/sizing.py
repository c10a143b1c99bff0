"""Sizing maths from a model's architecture alone: parameters, weight bytes, KV cache, activations.

Everything here is a pure function of a :class:`~kiln.config.ModelConfig` (built from
``config.json``) and a few numbers; nothing reads weights or touches a device.

Counts follow the tensors a Hugging Face checkpoint stores (``model.safetensors``), so the
parameter count of a real checkpoint is matched exactly (``tests/unit/test_plan.py`` checks it
against ``../shared/models`` and published counts). Bytes follow how kiln holds the weights:
floats in ``dtype``; with ``quantize`` every linear layer whose input size is a multiple of 32
in kiln's group format (see :mod:`kiln.quantization`): 20 bytes per 32 weights for int4 (16 of
codes, float16 scale and offset) and 34 for int8 (32 of codes, float16 scale), with the LM head
at 8 bits (and a head tied to the embedding given its own 8-bit copy), as
``kiln.models.quantization_plan`` decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from kiln.config import ConfigError, ModelConfig, SchedulerConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANTIZE_CHOICES = ("none", "int8", "int4")
GROUP_SIZE = 32
"""Weights per quantization group (kiln.quantization.GROUP_SIZE)."""
BLOCK_BYTES = {4: 20, 8: 34}
"""Bytes per group of 32 weights in kiln's kernels (kiln.kernels.native.BLOCK_BYTES); restated
here because ``plan`` imports nothing that imports torch. A unit test keeps them in step."""
KV_BLOCK_SIZE = 16
"""Tokens per KV block (kiln.config.CacheConfig's default): a sequence takes whole blocks."""
LOGITS_BYTES = 4
"""Logits are computed in float32 whatever the weights' dtype."""

Kind = Literal["embedding", "linear", "head", "norm", "bias"]
Shard = Literal["split", "replicated"]


@dataclass(frozen=True)
class ParamGroup:
    """One kind of tensor, summed over the layers that hold it."""

    name: str
    kind: Kind
    numel: int
    """Parameters (a head tied to the embedding has none of its own)."""
    in_features: int = 0
    """For a matrix: its input size (quantization groups run along it)."""
    shard: Shard = "split"
    """How tensor parallelism places it: split across ranks or a full copy on each."""
    read_per_token: bool = True
    """Whether a decode step reads all of it (an embedding table is only indexed)."""


def normalise_dtype(dtype: str) -> str:
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPE_BYTES:
        choices = ", ".join([*DTYPE_BYTES, *DTYPE_ALIASES])
        raise ConfigError(f"dtype must be one of {choices}, got {dtype!r}")
    return name


def check_quantize(quantize: str) -> str:
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(
            f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}"
        )
    return quantize


def param_groups(config: ModelConfig) -> list[ParamGroup]:
    """The model's tensors, grouped by kind, as its Hugging Face checkpoint stores them."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    vocab = config.vocab_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    groups = [
        ParamGroup("embedding", "embedding", vocab * hidden, hidden, read_per_token=False),
        ParamGroup("attention q/k/v", "linear", layers * hidden * (q_dim + 2 * kv_dim), hidden),
        ParamGroup("attention out", "linear", layers * q_dim * hidden, q_dim),
    ]
    if config.model_type == "gptj":
        # GPT-J: one LayerNorm (weight and bias) per block, a biased 2-matrix MLP, a biased
        # LM head and a final LayerNorm.
        groups += [
            ParamGroup("mlp in", "linear", layers * hidden * inter, hidden),
            ParamGroup("mlp out", "linear", layers * inter * hidden, inter),
            ParamGroup("mlp in bias", "bias", layers * inter),
            ParamGroup("mlp out bias", "bias", layers * hidden, shard="replicated"),
            ParamGroup("norms", "norm", (layers + 1) * 2 * hidden, shard="replicated"),
            ParamGroup("lm head bias", "bias", vocab),
        ]
    else:
        groups += [
            ParamGroup("mlp gate/up", "linear", layers * 2 * hidden * inter, hidden),
            ParamGroup("mlp down", "linear", layers * inter * hidden, inter),
            ParamGroup("norms", "norm", (2 * layers + 1) * hidden, shard="replicated"),
        ]
        if config.attention_bias:
            groups.append(ParamGroup("attention q/k/v bias", "bias", layers * (q_dim + 2 * kv_dim)))
            if config.model_type == "llama":
                # transformers' Llama puts attention_bias on o_proj too; Qwen2 does not.
                groups.append(
                    ParamGroup("attention out bias", "bias", layers * hidden, shard="replicated")
                )
        if config.mlp_bias:
            groups += [
                ParamGroup("mlp gate/up bias", "bias", layers * 2 * inter),
                ParamGroup("mlp down bias", "bias", layers * hidden, shard="replicated"),
            ]
    if not config.tie_word_embeddings:
        groups.append(ParamGroup("lm head", "head", vocab * hidden, hidden))
    return groups


def num_parameters(config: ModelConfig) -> int:
    return sum(g.numel for g in param_groups(config))


def group_bytes(group: ParamGroup, dtype: str, quantize: str) -> int:
    """Bytes ``group`` takes in kiln: floats in ``dtype``, or kiln's group-quantized format."""
    bits = _bits(group, quantize)
    if bits is None:
        return group.numel * DTYPE_BYTES[dtype]
    return group.numel // GROUP_SIZE * BLOCK_BYTES[bits]


def _bits(group: ParamGroup, quantize: str) -> int | None:
    if quantize == "none" or group.kind not in ("linear", "head"):
        return None
    if group.in_features % GROUP_SIZE:
        return None  # kiln keeps such layers float (no whole groups along the input)
    # The head is the layer most sensitive to error: kiln keeps it 8-bit under int4.
    return 8 if group.kind == "head" or quantize == "int8" else 4


def weight_groups(config: ModelConfig, quantize: str) -> list[ParamGroup]:
    """:func:`param_groups` plus what kiln adds in memory: under ``quantize`` a head tied to the
    embedding gets its own 8-bit copy (the float table stays for the lookup)."""
    groups = param_groups(config)
    tied = config.tie_word_embeddings
    if quantize != "none" and tied and config.hidden_size % GROUP_SIZE == 0:
        copy = ParamGroup(
            "lm head (8-bit copy of the tied embedding)", "head", 0, config.hidden_size
        )
        groups.append(copy)
    elif tied:
        # The head reads the embedding table itself: every decode step reads all of it.
        groups[0] = ParamGroup(
            "embedding (tied head)", "embedding", groups[0].numel, config.hidden_size
        )
    return groups


def weight_bytes(
    config: ModelConfig, dtype: str, quantize: str = "none", *, tp: int = 1, read_only: bool = False
) -> int:
    """Bytes of weights on one of ``tp`` ranks (all of them for ``tp=1``).

    ``read_only`` counts only what a decode step reads (leaves out an embedding table that is
    only indexed), for the bandwidth estimate.
    """
    total = 0
    for group in weight_groups(config, quantize):
        if read_only and not group.read_per_token:
            continue
        nbytes = _copy_bytes(group, config, dtype, quantize)
        total += nbytes if group.shard == "replicated" else math.ceil(nbytes / tp)
    return total


def _copy_bytes(group: ParamGroup, config: ModelConfig, dtype: str, quantize: str) -> int:
    if group.numel == 0 and group.kind == "head":
        # The tied head's 8-bit copy: vocab x hidden weights in 34-byte groups.
        return config.vocab_size * config.hidden_size // GROUP_SIZE * BLOCK_BYTES[8]
    return group_bytes(group, dtype, quantize)


def kv_bytes_per_token(config: ModelConfig, dtype: str, *, tp: int = 1) -> int:
    """Keys and values of one token over all layers (kiln's cache holds them in ``dtype``)."""
    kv_heads = config.num_key_value_heads // tp if config.num_key_value_heads % tp == 0 else None
    if kv_heads is None:
        raise ConfigError(f"{tp} ranks do not split {config.num_key_value_heads} KV heads")
    return 2 * config.num_hidden_layers * kv_heads * config.head_dim * DTYPE_BYTES[dtype]


def kv_cache_bytes(
    config: ModelConfig, dtype: str, batch_size: int, sequence_length: int, *, tp: int = 1
) -> int:
    """KV cache of ``batch_size`` sequences of ``sequence_length`` tokens, in whole blocks."""
    blocks = math.ceil(sequence_length / KV_BLOCK_SIZE)
    return batch_size * blocks * KV_BLOCK_SIZE * kv_bytes_per_token(config, dtype, tp=tp)


def step_tokens(batch_size: int, sequence_length: int, max_num_batched_tokens: int | None) -> int:
    """Tokens one engine step computes at most: the whole batch's prompts, capped by kiln's
    token budget (prefills are chunked to it)."""
    budget = max_num_batched_tokens or SchedulerConfig().max_num_batched_tokens
    return min(batch_size * sequence_length, budget)


def activation_bytes(
    config: ModelConfig,
    dtype: str,
    batch_size: int,
    sequence_length: int,
    *,
    tp: int = 1,
    max_num_batched_tokens: int | None = None,
) -> int:
    """Headroom for one step's activations on one rank. The rule (an upper-bound estimate, not a
    measurement): for the T tokens of the largest step (:func:`step_tokens`), one decoder layer's
    live tensors at once -- four hidden-size vectors per token (residual, normed input,
    attention output, MLP output; replicated on every rank), q/k/v and three intermediate-size
    vectors (gate, up, their product; split across ranks) -- in ``dtype``, plus float32 logits
    for one token per sequence. Layers run one after another, so one layer's worth is the peak;
    attention scores are not materialised (kiln uses scaled_dot_product_attention)."""
    tokens = step_tokens(batch_size, sequence_length, max_num_batched_tokens)
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    split = (q_dim + 2 * kv_dim + 3 * config.intermediate_size) / tp
    per_token = 4 * config.hidden_size + split
    logits = batch_size * config.vocab_size * LOGITS_BYTES
    return math.ceil(tokens * per_token * DTYPE_BYTES[dtype]) + logits


def valid_tp_degrees(config: ModelConfig, max_degree: int | None = None) -> list[int]:
    """The tensor-parallel degrees kiln's sharding allows: N must divide the attention heads,
    the KV heads and the vocabulary (each rank holds whole heads and an equal slice of the
    vocabulary; nothing is padded or replicated)."""
    common = math.gcd(config.num_attention_heads, config.num_key_value_heads, config.vocab_size)
    limit = common if max_degree is None else min(common, max_degree)
    return [n for n in range(1, limit + 1) if common % n == 0]
