"""Single-stream decode speed: kiln vs transformers.generate, same model, dtype and threads."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.llm import LLM
from kiln.sampling import SamplingParams

PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"


@dataclass
class DecodeResult:
    name: str
    tokens_per_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)


def _decode_rate(run: Callable[[int], int], num_tokens: int) -> float:
    """Tokens/s of decoding alone: time(N tokens) - time(1 token) removes prefill and setup."""
    start = time.perf_counter()
    run(1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    produced = run(num_tokens)
    total = time.perf_counter() - start
    return (produced - 1) / (total - prefill)


def compare(
    runners: dict[str, Callable[[int], int]], num_tokens: int, repeats: int
) -> list[DecodeResult]:
    """Measure each runner ``repeats`` times, interleaved so that drift in the machine's speed
    (other tenants, frequency) hits every side alike; one warm-up run each first."""
    for run in runners.values():
        run(num_tokens)
    results = {name: DecodeResult(name, []) for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            results[name].tokens_per_s.append(_decode_rate(run, num_tokens))
    return list(results.values())


def kiln_runner(llm: LLM) -> Callable[[int], int]:
    def run(n: int) -> int:
        params = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
        return len(llm.generate(PROMPT, params)[0].token_ids)

    return run


def load_transformers(path: Path, dtype: torch.dtype) -> tuple[object, object]:
    """The same checkpoint through transformers' own loaders (GGUF included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.suffix == ".gguf":
        kwargs = dict(gguf_file=path.name)
        path = path.parent
    else:
        kwargs = {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    return model, tokenizer


def transformers_runner(model: object, tokenizer: object) -> Callable[[int], int]:
    inputs = tokenizer(PROMPT, return_tensors="pt")  # type: ignore[operator]

    @torch.inference_mode()
    def run(n: int) -> int:
        out = model.generate(  # type: ignore[attr-defined]
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        )
        return out.shape[1] - inputs["input_ids"].shape[1]

    return run
