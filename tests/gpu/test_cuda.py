"""The same model and engine on a CUDA device: parity with transformers and with the CPU.

Run where a GPU is present (`make test-all`, or `pytest -m gpu`); skipped elsewhere. CPU parity:
both devices load the same checkpoint; in float32 their greedy tokens must be the same and their
logits close, in bfloat16 the CUDA logits must be as close to the CPU's float32 logits as the
CPU's own bfloat16 logits are (bfloat16 keeps 8 bits of mantissa, so two devices that round at
different points cannot agree to float32's tolerance).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln import LLM, SamplingParams
from kiln.models.layers.attention import AttentionMetadata
from prefill_logits import kiln_prefill_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park and"]
# Long enough to cross several KV blocks (16 tokens each) on both devices.
LONG_PROMPT = "The little dog ran to the park and saw a big red ball. He was very happy and"


@pytest.fixture(scope="module")
def cpu_llm(stories_dir) -> LLM:
    return LLM(str(stories_dir), device="cpu", dtype="float32")


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


def test_greedy_tokens_equal_the_cpu(pair, cpu_llm: LLM) -> None:
    llm, _ = pair
    assert llm.device.type == "cuda" and cpu_llm.device.type == "cpu"
    params = SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)
    on_cuda = llm.generate(PROMPTS, params)
    on_cpu = cpu_llm.generate(PROMPTS, params)
    for cuda_out, cpu_out in zip(on_cuda, on_cpu, strict=True):
        assert len(cpu_out.token_ids) == 48
        assert cuda_out.token_ids == cpu_out.token_ids
        assert cuda_out.text == cpu_out.text


def test_float32_logits_match_the_cpu(pair, cpu_llm: LLM) -> None:
    llm, _ = pair
    prompt_ids = cpu_llm.tokenizer.encode(LONG_PROMPT)
    on_cuda = kiln_prefill_logits(llm, prompt_ids)
    on_cpu = kiln_prefill_logits(cpu_llm, prompt_ids)
    assert on_cuda.shape == on_cpu.shape == (len(prompt_ids), cpu_llm.config.vocab_size)
    assert (on_cuda - on_cpu).abs().max().item() <= 1e-3
    assert torch.equal(on_cuda.argmax(-1), on_cpu.argmax(-1))


def test_bfloat16_logits_within_bfloat16_tolerance_of_the_cpu(stories_dir, cpu_llm: LLM) -> None:
    cuda_bf16 = LLM(str(stories_dir), device="cuda", dtype="bfloat16")
    cpu_bf16 = LLM(str(stories_dir), device="cpu", dtype="bfloat16", kv_cache_memory=32 << 20)
    assert cuda_bf16.dtype == cpu_bf16.dtype == torch.bfloat16
    prompt_ids = cpu_llm.tokenizer.encode(LONG_PROMPT)
    reference = kiln_prefill_logits(cpu_llm, prompt_ids)  # the CPU in float32
    cpu_error = (kiln_prefill_logits(cpu_bf16, prompt_ids) - reference).abs().max().item()
    on_cuda = kiln_prefill_logits(cuda_bf16, prompt_ids)
    cuda_error = (on_cuda - reference).abs().max().item()
    assert cpu_error > 1e-4  # bfloat16 really is coarser: the comparison below means something
    assert cuda_error <= 2 * cpu_error, (cuda_error, cpu_error)
    # Both devices pick the float32 CPU's next token at (almost) every position.
    agree = (on_cuda.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
