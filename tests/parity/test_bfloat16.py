"""kiln in bfloat16 against transformers in bfloat16, on stories260K.

bfloat16 keeps 8 bits of mantissa, so two correct implementations that round at different
points disagree by more than float32's 1e-4. The check: kiln's bfloat16 logits are as close to
the float32 reference as transformers' own bfloat16 logits are (within a small factor), and
close to transformers' bfloat16 logits themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kiln import LLM
from prefill_logits import kiln_prefill_logits

PROMPT = "The little dog ran to the park and saw a big red ball. He was very happy and"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hf_logits(stories_dir: Path, dtype: torch.dtype, prompt_ids: list[int]) -> torch.Tensor:
    model: Any = AutoModelForCausalLM.from_pretrained(stories_dir, torch_dtype=dtype).eval()
    with torch.inference_mode():
        return model(torch.tensor([prompt_ids])).logits[0].float()  # [T, vocab]


def test_bfloat16_prefill_is_as_close_to_float32_as_transformers_bfloat16(stories_dir: Path):
    llm = LLM(str(stories_dir), dtype="bfloat16", device="cpu", kv_cache_memory=32 << 20)
    assert llm.dtype == torch.bfloat16
    prompt_ids = llm.tokenizer.encode(PROMPT)
    reference = _hf_logits(stories_dir, torch.float32, prompt_ids)
    hf_bf16 = _hf_logits(stories_dir, torch.bfloat16, prompt_ids)
    kiln_bf16 = kiln_prefill_logits(llm, prompt_ids)

    hf_error = (hf_bf16 - reference).abs().max().item()
    kiln_error = (kiln_bf16 - reference).abs().max().item()
    assert hf_error > 1e-4  # bfloat16 really is coarser: the comparison below means something
    assert kiln_error <= 2 * hf_error, (kiln_error, hf_error)
    assert (kiln_bf16 - hf_bf16).abs().max().item() <= 2 * hf_error
    # Both agree on the next token at (almost) every position.
    agree = (kiln_bf16.argmax(-1) == hf_bf16.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
