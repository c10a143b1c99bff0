"""Engine configuration: the KV cache and the scheduler's limits."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import ConfigError

__all__ = ["DEFAULT_CPU_KV_CACHE_MEMORY", "CacheConfig", "ConfigError", "SchedulerConfig"]


@dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is sized.

    Args:
        block_size: tokens per KV block; prefix caching shares whole blocks.
        kv_cache_memory: bytes for the KV cache; None sizes it from ``gpu_memory_utilization``
            on a GPU and uses ``DEFAULT_CPU_KV_CACHE_MEMORY`` on CPU.
        gpu_memory_utilization: fraction of the GPU's free memory (after loading weights) the
            KV cache may take when ``kv_cache_memory`` is None.
        enable_prefix_caching: reuse cached blocks for a prompt's longest cached prefix.
    """

    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30  # 1 GiB: ~22k tokens of SmolLM2-135M in float32


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step and of the queue.

    Args:
        max_num_seqs: most requests running (holding KV blocks) at once.
        max_num_batched_tokens: most tokens computed in one step (decodes + prefill chunks);
            long prompts are prefilled in chunks of at most this size.
        max_waiting_requests: most requests queued (not yet running) by online submission
            (``AsyncEngine``, the server); more are refused, which is the engine's
            back-pressure. None means unbounded. A batch given to ``LLM.generate`` is never
            refused: it is all queued at once, by design.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int | None = 1024

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ConfigError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
