"""The perplexity quality guard: kiln's per-token log-probabilities against transformers' loss,
and the Dolly texts it scores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kiln import LLM
from kiln.bench.perplexity import dolly_texts, perplexity, token_logprobs

DOLLY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dolly"
DOLLY_FILE = DOLLY / "databricks-dolly-15k.head.jsonl"


def test_dolly_texts_use_the_tutorial_layout():
    texts = dolly_texts(DOLLY_FILE, 3)
    assert len(texts) == 3
    assert texts[0].startswith("### Instruction:\nWhen did Virgin Australia start operating?")
    assert "\n\n### Context:\nVirgin Australia" in texts[0]
    assert "\n\n### Answer:\n" in texts[0]
    # A record without context has no context section.
    assert all(t.count("### Answer:") == 1 for t in dolly_texts(DOLLY_FILE, 40))
    assert any("### Context:" not in t for t in dolly_texts(DOLLY_FILE, 40))


def test_token_logprobs_match_transformers_loss(stories_dir: Path):
    llm = LLM(str(stories_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 20)
    text = dolly_texts(DOLLY_FILE, 1)[0]
    ids = llm.tokenizer.encode(text)[:200]
    ours = token_logprobs(llm, ids)
    hf = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert ours.shape == (len(ids) - 1,)
    assert -ours.mean().item() == pytest.approx(loss, rel=1e-5)
    result = perplexity(llm, [text], max_tokens=200)
    assert result.tokens == len(ids) - 1
    assert result.value == pytest.approx(math.exp(loss), rel=1e-5)


def test_int8_perplexity_stays_within_one_percent_of_float(stories_dir: Path):
    texts = dolly_texts(DOLLY_FILE, 4)
    dense = LLM(str(stories_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 20)
    int8 = LLM(str(stories_dir), device="cpu", quantize="int8", kv_cache_memory=1 << 20)
    assert int8.model.linear_layers()["model.layers.0.self_attn.qkv_proj"].bits == 8
    reference, quantized = perplexity(dense, texts), perplexity(int8, texts)
    assert reference.tokens == quantized.tokens
    assert quantized.value != reference.value
    assert abs(quantized.value / reference.value - 1) < 0.01
