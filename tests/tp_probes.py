"""Functions a test runs on every tensor-parallel rank (``MultiprocExecutor.collective_rpc``):
module-level so the worker processes can unpickle them by name."""

from __future__ import annotations

from typing import Any

import torch

from kiln.engine.runner import ModelRunner
from kiln.models.layers.attention import AttentionMetadata


def packed_logits(runner: ModelRunner, prompts: list[list[int]]) -> dict[str, Any]:
    """Logits of every position of ``prompts`` (whole sequences laid back to back, no KV cache,
    so the engine's cache is untouched), and what this rank holds."""
    with torch.inference_mode():
        input_ids = torch.tensor([t for p in prompts for t in p])
        positions = torch.cat([torch.arange(len(p)) for p in prompts])
        metadata = AttentionMetadata.packed([len(p) for p in prompts])
        caches = [None] * len(runner.kv_caches)
        hidden = runner.model(input_ids, positions, caches, metadata)
        logits = runner.model.compute_logits(hidden).float()
    return {
        "logits": logits,
        "kv_cache_shape": tuple(runner.kv_caches[0].shape),
        "embedding_rows": next(
            m.weight.shape[0]
            for m in runner.model.modules()
            if type(m).__name__ in ("Embedding", "VocabParallelEmbedding")
        ),
    }
