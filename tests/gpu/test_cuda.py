"""The same model and engine on a CUDA device: parity with transformers and with the CPU.

Run where a GPU is present (`make test-all`, or `pytest -m gpu`); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln import LLM, SamplingParams
from kiln.models.layers.attention import AttentionMetadata

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def pair(stories_dir):
    llm = LLM(str(stories_dir), device="cuda", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(stories_dir).to("cuda").eval()
    return llm, hf


def test_prefill_logits_match_transformers_on_cuda(pair) -> None:
    llm, hf = pair
    prompts = [[1, 45, 300, 12, 9, 77, 410, 23, 5], [1, 88, 19]]
    metadata = AttentionMetadata.build(
        [0, 0], [9, 3], [[3, 1], [0]], llm.engine.block_size, None, "cuda"
    )
    ids = torch.tensor([t for p in prompts for t in p], device="cuda")
    positions = torch.cat([torch.arange(len(p)) for p in prompts]).cuda()
    with torch.inference_mode():
        logits = llm.model.compute_logits(
            llm.model(ids, positions, llm.engine.runner.kv_caches, metadata)
        )
        expected = torch.cat([hf(torch.tensor([p], device="cuda")).logits[0] for p in prompts])
    assert (logits - expected).abs().max().item() <= 1e-3


def test_engine_batch_equals_alone_on_cuda(pair) -> None:
    llm, _ = pair
    prompts = ["Once upon a time", "The little dog", "Lily and Tom went to the park and"]
    params = SamplingParams(temperature=0.0, max_new_tokens=48)
    batched = llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched, strict=True):
        assert llm.generate(prompt, params)[0].token_ids == out.token_ids


def test_bfloat16_generates_on_cuda(stories_dir) -> None:
    llm = LLM(str(stories_dir), device="cuda", dtype="bfloat16")
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_new_tokens=16))[0]
    assert len(out.token_ids) == 16 and out.text.strip()
