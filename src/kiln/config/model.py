"""ModelConfig: the architecture facts kiln needs, read once from a Hugging Face config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from kiln.errors import ModelLoadError

# model_type -> the family whose config keys it uses. GPT-J names its fields differently.
_LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*_LLAMA_LIKE, "gptj")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# The activations each family's MLP implements. NOTE: these mirror models/llama.py's
# _ACTIVATIONS and models/gptj.py's check (a unit test keeps them in step); checking here turns
# an unsupported one into a load error instead of a ValueError while the model is built.
LLAMA_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")
GPTJ_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a causal LM, normalised across model families.

    Built from a Hugging Face ``config.json`` dict by :meth:`from_hf`; validated once, never
    mutated (use :func:`dataclasses.replace` to derive a variant).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    """RMSNorm epsilon (Llama family) or LayerNorm epsilon (GPT-J)."""
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """HF ``rope_scaling`` with ``rope_type`` normalised; None means plain RoPE."""
    rotary_dim: int | None = None
    """Rotary dims per head when only part of the head rotates (GPT-J); None means all."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (Qwen2 has it)."""
    mlp_bias: bool = False
    sliding_window: int | None = None
    """Attend only to the last N positions (Mistral); None means full causal attention."""
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    """The dtype the checkpoint was saved in, as named in config.json (``bfloat16``...)."""
    torch_dtype_key: str = field(default="torch_dtype", compare=False, repr=False)
    """The config.json key ``torch_dtype`` came from: transformers >= 4.56 writes ``dtype``, so
    an error about it names the key the user will find in the file."""

    def __post_init__(self) -> None:
        # from_hf has checked every value under its config.json key already; this guards
        # configs built directly or derived with dataclasses.replace, under the field names.
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {self.model_type!r}; kiln supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        fields = _Values(vars(self), CONFIG_FILE)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            fields.positive_int(name)
        fields.positive_number("norm_eps")
        fields.positive_number("rope_theta")
        for name in ("rotary_dim", "sliding_window"):
            fields.optional_positive_int(name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, CONFIG_FILE)

    @classmethod
    def from_hf(
        cls,
        hf: dict[str, Any],
        generation_config: dict[str, Any] | None = None,
        *,
        source: str = CONFIG_FILE,
    ) -> ModelConfig:
        """Normalise a Hugging Face config dict (plus generation_config.json, whose
        ``eos_token_id`` list, when present, adds stop ids).

        Every value kiln reads is checked for type and range here, so a broken config fails at
        load with one line naming ``source``, the key and the value, not in the middle of a
        request. ``source`` names the dict in those messages (``config.json`` unless the dict
        was rebuilt from another format).
        """
        model_type = hf.get("model_type")
        if model_type is None:
            raise ModelLoadError(f"{source} has no 'model_type'")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{source}: unsupported model_type {model_type!r}; kiln supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        config = _Values(hf, source, model_type)
        generation = _Values(generation_config or {}, GENERATION_CONFIG_FILE)
        fields = _gptj_fields(config) if model_type == "gptj" else _llama_fields(config)
        eos = config.token_ids("eos_token_id") + generation.token_ids("eos_token_id")
        # config.json's bos_token_id wins even when null, as in transformers.
        bos_from = config if "bos_token_id" in hf else generation
        dtype_key = "torch_dtype" if hf.get("torch_dtype") is not None else "dtype"
        return cls(
            model_type=model_type,
            bos_token_id=bos_from.token_id("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            pad_token_id=config.token_id("pad_token_id", allow_minus_one=True),
            torch_dtype=config.optional_string(dtype_key),
            torch_dtype_key=dtype_key,
            **fields,
        )


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


# --- typed reads ------------------------------------------------------------------------------

_REQUIRED: Any = object()
"""Default meaning "the key must be present"."""


def _show(value: Any) -> str:
    """A value as the user wrote it: JSON spelling for null/true/false (the file is JSON),
    Python repr otherwise (quotes show that '512' is a string), cut short to stay one line."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` for a size is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_hint(value: Any) -> str:
    """Why a value that looks like an integer is still refused."""
    if isinstance(value, float) and value.is_integer():
        # transformers would pass 64.0 on to torch, which refuses a float size; kiln refuses it
        # here rather than round a value the file may have meant differently.
        return f" (a float; write {int(value)} without the decimal point)"
    return _string_hint(value)


def _string_hint(value: Any) -> str:
    """A number written in quotes: JSON reads it as a string, which kiln does not convert."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (a string; write the number without quotes)"


class _Values:
    """Typed reads of one JSON file's keys: every failure is a ModelLoadError of one line that
    names the file, the key and the value found."""

    def __init__(self, data: dict[str, Any], source: str, model_type: str | None = None) -> None:
        self.data = data
        self.source = source
        self.model_type = model_type

    def fail(self, key: str, expected: str, value: Any, hint: str = "") -> NoReturn:
        raise ModelLoadError(f"{self.source}: {key} must be {expected}, got {_show(value)}{hint}")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            family = f" for {self.model_type}" if self.model_type else ""
            raise ModelLoadError(f"{self.source}: missing key {key!r}{family}")
        return default

    def positive_int(self, key: str, default: Any = _REQUIRED) -> int:
        value = self.get(key, default)
        if not _is_int(value) or value <= 0:
            self.fail(key, "a positive integer", value, _int_hint(value))
        return value

    def optional_positive_int(self, key: str) -> int | None:
        """Null or absent means "not set", as transformers reads head_dim,
        num_key_value_heads, sliding_window, rotary_dim and n_inner."""
        value = self.get(key, None)
        if value is None:
            return None
        if not _is_int(value) or value <= 0:
            self.fail(key, "a positive integer or null", value, _int_hint(value))
        return value

    def positive_number(self, key: str, default: Any = _REQUIRED) -> float:
        value = self.get(key, default)
        # NaN and infinity parse from JSON (Python's json accepts them) but are never valid here.
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            self.fail(key, "a positive number", value, _string_hint(value))
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            # bool("false") is True: a quoted or numeric flag is refused, not guessed at.
            self.fail(key, "true or false", value)
        return value

    def string(self, key: str, default: Any = _REQUIRED) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value:
            self.fail(key, "a non-empty string", value)
        return value

    def optional_string(self, key: str) -> str | None:
        value = self.get(key, None)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, "a non-empty string or null", value)
        return value

    def token_id(self, key: str, *, allow_minus_one: bool = False) -> int | None:
        value = self.get(key, None)
        if value is None:
            return None
        if allow_minus_one and value == -1 and _is_int(value):
            # Early LLaMA conversions write pad_token_id: -1 for "no pad token"; transformers
            # loads them, and kiln never pads with it, so it reads as unset.
            return None
        if not _is_int(value) or value < 0:
            self.fail(key, "a non-negative integer or null", value, _int_hint(value))
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        """An id or a list of ids (eos_token_id in newer checkpoints lists every stop token)."""
        value = self.get(key, None)
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not _is_int(item) or item < 0:
                expected = "a non-negative integer or a list of them"
                self.fail(key, expected, value, _int_hint(item))
        return tuple(items)


# --- rope scaling -----------------------------------------------------------------------------

# The keys each supported rope_type needs, and what kind of value each is.
_ROPE_KEYS: dict[str, dict[str, str]] = {
    "linear": {"factor": "number"},
    "llama3": {
        "factor": "number",
        "low_freq_factor": "number",
        "high_freq_factor": "number",
        "original_max_position_embeddings": "int",
    },
}


def _normalise_rope_scaling(config: _Values) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling", None)
    if scaling is None or scaling == {}:
        return None
    if not isinstance(scaling, dict):
        config.fail("rope_scaling", "an object or null", scaling)
    scaling = dict(scaling)
    # Older configs spell it "type"; newer ones "rope_type".
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling["rope_type"] = rope_type
    if rope_type == "default":
        return None
    _check_rope_scaling(scaling, config.source)
    return scaling


def _check_rope_scaling(scaling: dict[str, Any], source: str) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope_scaling type {rope_type!r} is not supported; kiln supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    # Nested keys are named as rope_scaling.<key> so the user can find them in the file.
    values = _Values({f"rope_scaling.{k}": v for k, v in scaling.items()}, source)
    for key, kind in _ROPE_KEYS.get(rope_type, {}).items():
        full_key = f"rope_scaling.{key}"
        if full_key not in values.data:
            raise ModelLoadError(
                f"{source}: rope_scaling has no {key!r}, which rope_type {rope_type!r} needs"
            )
        if kind == "int":
            values.positive_int(full_key)
        else:
            values.positive_number(full_key)
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        # The llama3 blend divides by (high - low): equal factors give NaN frequencies.
        raise ModelLoadError(
            f"{source}: rope_scaling.high_freq_factor ({scaling['high_freq_factor']}) must be "
            f"greater than rope_scaling.low_freq_factor ({scaling['low_freq_factor']})"
        )


# --- families ---------------------------------------------------------------------------------


def _head_dim(config: _Values, hidden: int, num_heads: int) -> int:
    head_dim = config.optional_positive_int("head_dim")
    if head_dim is not None:
        return head_dim
    if hidden < num_heads:
        # hidden // num_heads would be 0: every head empty.
        raise ModelLoadError(
            f"{config.source}: hidden_size ({hidden}) is smaller than num_attention_heads "
            f"({num_heads}), so there is no head_dim to derive; set head_dim"
        )
    return hidden // num_heads


def _activation(config: _Values, key: str, default: str, supported: tuple[str, ...]) -> str:
    act = config.string(key, default)
    if act not in supported:
        config.fail(key, f"one of {', '.join(supported)} for {config.model_type}", act)
    return act


def _llama_fields(config: _Values) -> dict[str, Any]:
    num_heads = config.positive_int("num_attention_heads")
    hidden = config.positive_int("hidden_size")
    if config.model_type == "qwen2" and not config.flag("use_sliding_window", False):
        # Qwen2 configs carry a sliding_window value even when it is switched off.
        sliding_window = None
    else:
        sliding_window = config.optional_positive_int("sliding_window")
    return dict(
        vocab_size=config.positive_int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=config.positive_int("intermediate_size"),
        num_hidden_layers=config.positive_int("num_hidden_layers"),
        num_attention_heads=num_heads,
        # null or absent means one kv head per query head (no GQA), as in transformers.
        num_key_value_heads=config.optional_positive_int("num_key_value_heads") or num_heads,
        head_dim=_head_dim(config, hidden, num_heads),
        max_position_embeddings=config.positive_int("max_position_embeddings", 2048),
        norm_eps=config.positive_number("rms_norm_eps", 1e-6),
        rope_theta=config.positive_number("rope_theta", 10000.0),
        rope_scaling=_normalise_rope_scaling(config),
        attention_bias=config.flag("attention_bias", config.model_type == "qwen2"),
        mlp_bias=config.flag("mlp_bias", False),
        sliding_window=sliding_window,
        hidden_act=_activation(config, "hidden_act", "silu", LLAMA_ACTIVATIONS),
        tie_word_embeddings=config.flag("tie_word_embeddings", False),
    )


def _gptj_fields(config: _Values) -> dict[str, Any]:
    hidden = config.positive_int("n_embd")
    num_heads = config.positive_int("n_head")
    if hidden % num_heads:
        # GPT-J has no head_dim key: the heads must split n_embd exactly.
        raise ModelLoadError(
            f"{config.source}: n_embd ({hidden}) is not a multiple of n_head ({num_heads})"
        )
    head_dim = hidden // num_heads
    rotary_dim = config.optional_positive_int("rotary_dim")
    if rotary_dim is not None and (rotary_dim > head_dim or rotary_dim % 2):
        # Rotary pairs up dims within a head: an even count, at most the whole head.
        config.fail(
            "rotary_dim", f"an even integer no larger than head_dim ({head_dim})", rotary_dim
        )
    return dict(
        vocab_size=config.positive_int("vocab_size"),
        hidden_size=hidden,
        # null or absent n_inner means 4 * n_embd, as in transformers.
        intermediate_size=config.optional_positive_int("n_inner") or 4 * hidden,
        num_hidden_layers=config.positive_int("n_layer"),
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=config.positive_int("n_positions", 2048),
        norm_eps=config.positive_number("layer_norm_epsilon", 1e-5),
        rope_theta=10000.0,
        rotary_dim=rotary_dim,
        hidden_act=_activation(config, "activation_function", "gelu_new", GPTJ_ACTIVATIONS),
        tie_word_embeddings=config.flag("tie_word_embeddings", False),
    )
