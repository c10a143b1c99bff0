"""kiln's logits for a whole prompt, computed by the model alone (no engine, no sampler)."""

from __future__ import annotations

import torch

from kiln import LLM
from kiln.models.layers.attention import AttentionMetadata


def kiln_prefill_logits(llm: LLM, prompt_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """``[T, vocab]`` float32 logits of ``prompt_ids`` from ``llm``'s model, returned on the
    CPU. They are computed on ``llm``'s device over a private KV cache in the layout the attention
    layer documents (``[2, slots, kv_heads, head_dim]`` per layer) with its blocks in reverse
    order, so a wrong slot mapping cannot go unnoticed."""
    config = llm.config
    device = llm.device
    num_blocks = -(-len(prompt_ids) // block_size)
    kv_caches = [
        torch.zeros(
            2,
            num_blocks * block_size,
            config.num_key_value_heads,
            config.head_dim,
            dtype=llm.dtype,
            device=device,
        )
        for _ in range(config.num_hidden_layers)
    ]
    metadata = AttentionMetadata.build(
        [0], [len(prompt_ids)], [list(reversed(range(num_blocks)))], block_size, None, device
    )
    with torch.inference_mode():
        hidden = llm.model(
            torch.tensor(prompt_ids, device=device),
            torch.arange(len(prompt_ids), device=device),
            kv_caches,
            metadata,
        )
        return llm.model.compute_logits(hidden).float().cpu()
