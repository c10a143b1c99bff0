"""KV cache storage: one preallocated tensor per layer, split into fixed-size blocks."""

from __future__ import annotations

import torch

from kiln.config import ModelConfig


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    element = torch.empty(0, dtype=dtype).element_size()
    per_token = 2 * config.num_key_value_heads * config.head_dim * element
    return per_token * block_size * config.num_hidden_layers


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """``num_hidden_layers`` tensors ``[2, num_blocks * block_size, num_kv_heads, head_dim]``.

    Slots are stored flat: blocks are a bookkeeping unit, and a flat layout lets attention
    read a sequence's context with one index (or a slice when its blocks are contiguous)."""
    shape = (2, num_blocks * block_size, config.num_key_value_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
