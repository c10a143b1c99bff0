"""ModelConfig: the architecture facts kiln needs, read once from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ModelLoadError

# model_type -> the family whose config keys it uses. GPT-J names its fields differently.
_LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*_LLAMA_LIKE, "gptj")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {self.model_type!r}; kiln supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(
                    f"config.json: {name} must be positive, got {getattr(self, name)}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ModelLoadError(
                    f"config.json: rope_scaling type {rope_type!r} is not supported; kiln supports "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}"
                )

    @classmethod
    def from_hf(
        cls, hf: dict[str, Any], generation_config: dict[str, Any] | None = None
    ) -> ModelConfig:
        """Normalise a Hugging Face config dict (plus generation_config.json, whose
        ``eos_token_id`` list, when present, adds stop ids)."""
        model_type = hf.get("model_type")
        if model_type is None:
            raise ModelLoadError("config.json has no 'model_type'")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"config.json: unsupported model_type {model_type!r}; kiln supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            fields = _gptj_fields(hf) if model_type == "gptj" else _llama_fields(hf)
        except KeyError as e:
            raise ModelLoadError(f"config.json: missing key {e.args[0]!r} for {model_type}") from e
        eos = _as_id_tuple(hf.get("eos_token_id")) + _as_id_tuple(
            (generation_config or {}).get("eos_token_id")
        )
        bos = hf.get("bos_token_id", (generation_config or {}).get("bos_token_id"))
        return cls(
            model_type=model_type,
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos)),
            pad_token_id=hf.get("pad_token_id"),
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
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


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _normalise_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    # Older configs spell it "type"; newer ones "rope_type".
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling["rope_type"] = rope_type
    return None if rope_type == "default" else scaling


def _llama_fields(hf: dict[str, Any]) -> dict[str, Any]:
    num_heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    model_type = hf["model_type"]
    sliding_window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        # Qwen2 configs carry a sliding_window value even when it is switched off.
        sliding_window = None
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rope_scaling=_normalise_rope_scaling(hf.get("rope_scaling")),
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=sliding_window,
        hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _gptj_fields(hf: dict[str, Any]) -> dict[str, Any]:
    hidden = hf["n_embd"]
    num_heads = hf["n_head"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        num_hidden_layers=hf["n_layer"],
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden // num_heads,
        max_position_embeddings=hf.get("n_positions", 2048),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        rope_theta=10000.0,
        rotary_dim=hf.get("rotary_dim"),
        hidden_act=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
