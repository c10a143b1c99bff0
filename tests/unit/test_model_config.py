"""ModelConfig.from_hf and resolve_dtype on broken config values: every bad value is a
ModelLoadError of one line naming the file, the key and the value, raised at load (before a
request could trip over it); the valid spellings real checkpoints use still load."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from kiln.config.model import GPTJ_ACTIVATIONS, LLAMA_ACTIVATIONS, ModelConfig
from kiln.errors import ModelLoadError
from kiln.models import llama
from kiln.models.loader import resolve_dtype

# stories260K's config.json, trimmed to the keys kiln reads.
LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 5,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "torch_dtype": "float32",
}
# What transformers' GPTJConfig writes for the parity tests' tiny GPT-J.
GPTJ: dict[str, Any] = {
    "model_type": "gptj",
    "vocab_size": 512,
    "n_positions": 256,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": None,
    "rotary_dim": 8,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-05,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _error(hf: dict[str, Any], generation_config: dict[str, Any] | None = None) -> str:
    with pytest.raises(ModelLoadError) as info:
        ModelConfig.from_hf(hf, generation_config)
    message = str(info.value)
    assert "\n" not in message, message  # one line: the CLI prints it as is
    return message


# The defects found by trying kiln as a new user, with the exact message each now gives.
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "num_hidden_layers",
            "five",
            "config.json: num_hidden_layers must be a positive integer, got 'five'",
        ),
        (
            "vocab_size",
            "512",
            "config.json: vocab_size must be a positive integer, got '512' "
            "(a string; write the number without quotes)",
        ),
        (
            "hidden_size",
            64.0,
            "config.json: hidden_size must be a positive integer, got 64.0 "
            "(a float; write 64 without the decimal point)",
        ),
        ("rope_theta", None, "config.json: rope_theta must be a positive number, got null"),
        (
            "eos_token_id",
            "x",
            "config.json: eos_token_id must be a non-negative integer or a list of them, got 'x'",
        ),
        (
            "max_position_embeddings",
            -1,
            "config.json: max_position_embeddings must be a positive integer, got -1",
        ),
        ("rms_norm_eps", "x", "config.json: rms_norm_eps must be a positive number, got 'x'"),
    ],
)
def test_reported_defects_have_exact_messages(key: str, value: Any, message: str) -> None:
    assert _error({**LLAMA, key: value}) == message


# (key, bad value, how the value is shown in the message)
LLAMA_BAD = [
    ("vocab_size", 0, "0"),
    ("vocab_size", True, "true"),
    ("hidden_size", -64, "-64"),
    ("hidden_size", "64", "'64'"),
    ("intermediate_size", 0, "0"),
    ("intermediate_size", 172.5, "172.5"),
    ("num_hidden_layers", 0, "0"),
    ("num_hidden_layers", None, "null"),
    ("num_attention_heads", [8], "[8]"),
    ("num_key_value_heads", 0, "0"),
    ("num_key_value_heads", "4", "'4'"),
    ("head_dim", 0, "0"),
    ("head_dim", 8.0, "8.0"),
    ("max_position_embeddings", 0, "0"),
    ("max_position_embeddings", None, "null"),
    ("max_position_embeddings", "512", "'512'"),
    ("rms_norm_eps", 0, "0"),
    ("rms_norm_eps", -1e-5, "-1e-05"),
    ("rms_norm_eps", None, "null"),
    ("rms_norm_eps", float("nan"), "nan"),
    ("rms_norm_eps", True, "true"),
    ("rope_theta", 0, "0"),
    ("rope_theta", "10000", "'10000'"),
    ("rope_theta", float("inf"), "inf"),
    ("rope_scaling", "linear", "'linear'"),
    ("rope_scaling", [2.0], "[2.0]"),
    ("attention_bias", "false", "'false'"),
    ("mlp_bias", 0, "0"),
    ("tie_word_embeddings", None, "null"),
    ("hidden_act", "relu", "'relu'"),
    ("hidden_act", 1, "1"),
    ("bos_token_id", -1, "-1"),
    ("bos_token_id", "1", "'1'"),
    ("eos_token_id", -2, "-2"),
    ("eos_token_id", 2.0, "2.0"),
    ("eos_token_id", [2, "x"], "[2, 'x']"),
    ("eos_token_id", [2, None], "[2, None]"),
    ("pad_token_id", -5, "-5"),
    ("pad_token_id", "0", "'0'"),
    ("torch_dtype", 16, "16"),
    ("torch_dtype", "", "''"),
]


@pytest.mark.parametrize(("key", "value", "shown"), LLAMA_BAD)
def test_bad_llama_value_names_file_key_and_value(key: str, value: Any, shown: str) -> None:
    message = _error({**LLAMA, key: value})
    assert message.startswith(f"config.json: {key} must be "), message
    assert f"got {shown}" in message, message


def test_absent_required_key_is_named() -> None:
    config = {k: v for k, v in LLAMA.items() if k != "hidden_size"}
    assert _error(config) == "config.json: missing key 'hidden_size' for llama"


@pytest.mark.parametrize(
    ("scaling", "needles"),
    [
        ({"type": "linear", "factor": "2"}, ["rope_scaling.factor", "'2'"]),
        ({"type": "linear", "factor": 0}, ["rope_scaling.factor", "got 0"]),
        ({"type": "linear", "factor": None}, ["rope_scaling.factor", "got null"]),
        ({"type": "linear"}, ["rope_scaling", "'factor'", "'linear'"]),
        ({"rope_type": "llama3", "factor": 8.0}, ["rope_scaling", "'low_freq_factor'", "llama3"]),
        (
            LLAMA3_SCALING | {"original_max_position_embeddings": 8192.0},
            ["rope_scaling.original_max_position_embeddings", "8192.0"],
        ),
        (LLAMA3_SCALING | {"high_freq_factor": "4"}, ["rope_scaling.high_freq_factor", "'4'"]),
        (
            LLAMA3_SCALING | {"high_freq_factor": 1.0},
            ["rope_scaling.high_freq_factor (1.0)", "low_freq_factor (1.0)"],
        ),
        ({"rope_type": "yarn", "factor": 4.0}, ["rope_scaling type 'yarn' is not supported"]),
        ({"type": 3}, ["rope_scaling type 3 is not supported"]),
    ],
)
def test_bad_rope_scaling(scaling: dict[str, Any], needles: list[str]) -> None:
    message = _error({**LLAMA, "rope_scaling": scaling})
    assert message.startswith("config.json: rope_scaling"), message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("model_type", "extra", "key", "value", "shown"),
    [
        ("mistral", {}, "sliding_window", 0, "0"),
        ("mistral", {}, "sliding_window", "4096", "'4096'"),
        ("mistral", {}, "sliding_window", 4096.0, "4096.0"),
        ("qwen2", {"use_sliding_window": True}, "sliding_window", -1, "-1"),
        ("qwen2", {}, "use_sliding_window", "no", "'no'"),
    ],
)
def test_bad_sliding_window(
    model_type: str, extra: dict[str, Any], key: str, value: Any, shown: str
) -> None:
    message = _error({**LLAMA, "model_type": model_type, **extra, key: value})
    assert message.startswith(f"config.json: {key} must be "), message
    assert f"got {shown}" in message, message


GPTJ_BAD = [
    ("n_embd", "64", "'64'"),
    ("n_embd", 64.0, "64.0"),
    ("n_head", 0, "0"),
    ("n_layer", "two", "'two'"),
    ("n_positions", -1, "-1"),
    ("n_inner", 0, "0"),
    ("rotary_dim", 0, "0"),
    ("rotary_dim", 7, "7"),  # odd: rotary works on pairs of dims
    ("rotary_dim", 32, "32"),  # more than head_dim (16)
    ("layer_norm_epsilon", None, "null"),
    ("activation_function", "silu", "'silu'"),
    ("vocab_size", 512.0, "512.0"),
]


@pytest.mark.parametrize(("key", "value", "shown"), GPTJ_BAD)
def test_bad_gptj_value_names_its_own_key(key: str, value: Any, shown: str) -> None:
    message = _error({**GPTJ, key: value})
    assert message.startswith(f"config.json: {key} must be "), message
    assert f"got {shown}" in message, message


def test_gptj_heads_must_split_n_embd() -> None:
    assert (
        _error({**GPTJ, "n_head": 5}) == "config.json: n_embd (64) is not a multiple of n_head (5)"
    )


def test_derived_head_dim_must_not_be_zero() -> None:
    message = _error({**LLAMA, "hidden_size": 4, "head_dim": None})
    assert message.startswith("config.json: hidden_size (4) is smaller than num_attention_heads")


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("eos_token_id", "x", "'x'"),
        ("eos_token_id", [2, -1], "[2, -1]"),
        ("eos_token_id", {"id": 2}, "{'id': 2}"),
        ("bos_token_id", 1.0, "1.0"),
    ],
)
def test_bad_generation_config_names_that_file(key: str, value: Any, shown: str) -> None:
    config = {k: v for k, v in LLAMA.items() if k != "bos_token_id"}
    message = _error(config, {key: value})
    assert message.startswith(f"generation_config.json: {key} must be "), message
    assert f"got {shown}" in message, message


def test_config_bos_token_id_wins_over_generation_config() -> None:
    # As in transformers: config.json's key is read even when generation_config.json's is bad.
    assert ModelConfig.from_hf(LLAMA, {"bos_token_id": "x"}).bos_token_id == 1


@pytest.mark.parametrize(
    ("changes", "attribute", "expected"),
    [
        ({"rope_theta": 500000}, "rope_theta", 500000.0),  # an int where a float is due
        ({"rms_norm_eps": 1e-6}, "norm_eps", 1e-6),
        ({"head_dim": None}, "head_dim", 8),  # derived, as transformers does
        ({"num_key_value_heads": None}, "num_key_value_heads", 8),
        ({"eos_token_id": [2, 3, 2]}, "eos_token_ids", (2, 3)),
        ({"eos_token_id": None}, "eos_token_ids", ()),
        ({"pad_token_id": -1}, "pad_token_id", None),  # early LLaMA conversions' "no pad"
        ({"pad_token_id": 0}, "pad_token_id", 0),
        ({"rope_scaling": {}}, "rope_scaling", None),
        ({"rope_scaling": {"rope_type": "default"}}, "rope_scaling", None),
        (
            {"rope_scaling": {"type": "linear", "factor": 2}},  # the older key spelling
            "rope_scaling",
            {"rope_type": "linear", "factor": 2},
        ),
        ({"rope_scaling": LLAMA3_SCALING}, "rope_scaling", LLAMA3_SCALING),
        ({"torch_dtype": None, "dtype": "bfloat16"}, "torch_dtype", "bfloat16"),
        ({"torch_dtype": None}, "torch_dtype", None),
    ],
)
def test_valid_spellings_still_load(changes: dict[str, Any], attribute: str, expected: Any) -> None:
    config = ModelConfig.from_hf({**LLAMA, **changes})
    assert getattr(config, attribute) == expected


def test_generation_config_adds_stop_ids() -> None:
    config = ModelConfig.from_hf(LLAMA, {"eos_token_id": [2, 7]})
    assert config.eos_token_ids == (2, 7)


def test_qwen2_ignores_sliding_window_when_switched_off() -> None:
    # Qwen2 configs keep a sliding_window value with use_sliding_window false: not read.
    qwen2 = {k: v for k, v in LLAMA.items() if k != "attention_bias"} | {"model_type": "qwen2"}
    config = ModelConfig.from_hf(qwen2 | {"sliding_window": "off"})
    assert config.sliding_window is None
    assert config.attention_bias  # Qwen2 configs have no attention_bias key: always biased


def test_gptj_defaults() -> None:
    config = ModelConfig.from_hf(GPTJ)
    assert (config.head_dim, config.intermediate_size, config.rotary_dim) == (16, 256, 8)
    assert ModelConfig.from_hf({**GPTJ, "rotary_dim": None}).rotary_dim is None


def test_post_init_guards_derived_configs() -> None:
    config = ModelConfig.from_hf(LLAMA)
    with pytest.raises(ModelLoadError, match="num_hidden_layers must be a positive integer"):
        dataclasses.replace(config, num_hidden_layers=0)
    with pytest.raises(ModelLoadError, match="norm_eps must be a positive number, got 0"):
        dataclasses.replace(config, norm_eps=0)


def test_activation_lists_match_the_models() -> None:
    assert set(LLAMA_ACTIVATIONS) == set(llama._ACTIVATIONS)
    assert "gelu_new" in GPTJ_ACTIVATIONS


# --- dtype ------------------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_unsupported_checkpoint_dtype_names_the_key_under_auto(key: str) -> None:
    config = ModelConfig.from_hf({**LLAMA, "torch_dtype": None, key: "float128"})
    with pytest.raises(ModelLoadError) as info:
        resolve_dtype("auto", config, CPU)
    assert str(info.value) == (
        f"config.json: {key} 'float128' is not supported; use --dtype float32, bfloat16 or float16"
    )


def test_explicit_dtype_overrides_an_unsupported_checkpoint_dtype() -> None:
    config = ModelConfig.from_hf({**LLAMA, "torch_dtype": "float128"})
    assert resolve_dtype("bfloat16", config, CPU) == torch.bfloat16


def test_bad_dtype_flag_keeps_its_message() -> None:
    config = ModelConfig.from_hf({**LLAMA, "torch_dtype": "float128"})
    with pytest.raises(ModelLoadError) as info:
        resolve_dtype("float128", config, CPU)
    assert str(info.value) == "unknown dtype 'float128'; use auto, float32, bfloat16 or float16"


@pytest.mark.parametrize(
    ("torch_dtype", "expected"),
    [(None, torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_auto_follows_the_checkpoint_on_a_gpu(
    torch_dtype: str | None, expected: torch.dtype
) -> None:
    config = ModelConfig.from_hf({**LLAMA, "torch_dtype": torch_dtype})
    assert resolve_dtype("auto", config, torch.device("cuda")) == expected


@pytest.mark.parametrize("torch_dtype", [None, "float32", "bfloat16", "float16"])
def test_auto_on_a_cpu_is_bfloat16_only_where_the_cpu_has_it(torch_dtype: str | None) -> None:
    config = ModelConfig.from_hf({**LLAMA, "torch_dtype": torch_dtype})
    assert resolve_dtype("auto", config, CPU, native_bf16=True) == torch.bfloat16
    assert resolve_dtype("auto", config, CPU, native_bf16=False) == torch.float32
    # Quantized layers compute in float32 whatever the CPU.
    assert resolve_dtype("auto", config, CPU, native_bf16=True, quantized=True) == torch.float32
    # An explicit dtype is kept (float16 still falls back on CPU).
    assert resolve_dtype("bfloat16", config, CPU, native_bf16=False) == torch.bfloat16
    assert resolve_dtype("float16", config, CPU, native_bf16=True) == torch.float32
