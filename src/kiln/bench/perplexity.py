"""Perplexity of a model on fixed text: the quality guard for dtypes and quantization.

Each text is scored in one teacher-forced forward pass of kiln's model over a private KV cache
(no engine, no sampling): the mean negative log-likelihood of every token given the ones
before it, over all texts, and its exponential.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.llm import LLM
from kiln.models.layers.attention import AttentionMetadata

_BLOCK_SIZE = 16


def dolly_texts(path: Path, count: int) -> list[str]:
    """The first ``count`` records of a databricks-dolly-15k JSONL file, in the tutorials'
    instruction / context / answer layout."""
    texts = []
    with open(path) as f:
        for line in f:
            if len(texts) == count:
                break
            record = json.loads(line)
            parts = [f"### Instruction:\n{record['instruction']}"]
            if record.get("context"):
                parts.append(f"### Context:\n{record['context']}")
            parts.append(f"### Answer:\n{record['response']}")
            texts.append("\n\n".join(parts))
    return texts


def prompt_hidden(
    llm: LLM,
    token_ids: list[int],
    block_ids: list[int] | None = None,
    block_size: int = _BLOCK_SIZE,
) -> torch.Tensor:
    """``[len, hidden]`` final hidden states of ``token_ids`` in one forward pass of ``llm``'s
    model over a private KV cache (``[2, slots, kv_heads, head_dim]`` per layer), the sequence
    held in ``block_ids`` (default: blocks 0, 1, ... in order)."""
    config = llm.config
    num_blocks = -(-len(token_ids) // block_size)
    kv_caches = [
        torch.zeros(
            2,
            num_blocks * block_size,
            config.num_key_value_heads,
            config.head_dim,
            dtype=llm.dtype,
            device=llm.device,
        )
        for _ in range(config.num_hidden_layers)
    ]
    blocks = list(range(num_blocks)) if block_ids is None else block_ids
    metadata = AttentionMetadata.build(
        [0], [len(token_ids)], [blocks], block_size, device=llm.device
    )
    positions = torch.arange(len(token_ids), device=llm.device)
    with torch.inference_mode():
        return llm.model(torch.tensor(token_ids, device=llm.device), positions, kv_caches, metadata)


def token_logprobs(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """``[len - 1]`` float64 log-probabilities of tokens 1.. given the ones before them."""
    hidden = prompt_hidden(llm, token_ids)
    ids = torch.tensor(token_ids, device=llm.device)
    with torch.inference_mode():
        logits = llm.model.compute_logits(hidden[:-1]).double()
    return logits.log_softmax(-1).gather(-1, ids[1:, None]).squeeze(-1).cpu()


@dataclass
class Perplexity:
    value: float
    tokens: int


def perplexity(llm: LLM, texts: list[str], max_tokens: int = 512) -> Perplexity:
    """Perplexity over ``texts`` (each cut to its first ``max_tokens`` tokens)."""
    total, count = 0.0, 0
    for text in texts:
        ids = llm.tokenizer.encode(text)[: min(max_tokens, llm.max_model_len)]
        if len(ids) < 2:
            continue
        logprobs = token_logprobs(llm, ids)
        total -= float(logprobs.sum())
        count += len(logprobs)
    if not count:
        raise ValueError("no text has two tokens to score")
    return Perplexity(math.exp(total / count), count)
