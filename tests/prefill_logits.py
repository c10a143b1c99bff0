"""kiln's logits for a whole prompt, computed by the model alone (no engine, no sampler)."""

from __future__ import annotations

import torch

from kiln import LLM
from kiln.bench.perplexity import prompt_hidden


def kiln_prefill_logits(llm: LLM, prompt_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """``[T, vocab]`` float32 logits of ``prompt_ids`` from ``llm``'s model, returned on the
    CPU. They are computed on ``llm``'s device over a private KV cache in the layout the attention
    layer documents (``[2, slots, kv_heads, head_dim]`` per layer) with its blocks in reverse
    order, so a wrong slot mapping cannot go unnoticed."""
    num_blocks = -(-len(prompt_ids) // block_size)
    blocks = list(reversed(range(num_blocks)))
    hidden = prompt_hidden(llm, prompt_ids, blocks, block_size)
    with torch.inference_mode():
        return llm.model.compute_logits(hidden).float().cpu()
