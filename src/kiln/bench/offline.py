"""Offline throughput: many prompts of random lengths at once, kiln vs transformers.generate.

Workload in the style of vLLM's ``benchmark_throughput`` / nano-vllm's bench: random prompt
token ids, random output lengths, ``ignore_eos`` so every request produces exactly its length.
transformers gets the best batching ``generate`` offers for a fixed workload: prompts sorted by
length and run in left-padded batches of ``batch_size`` (one batch of all prompts by default),
each batch generating its longest requested output; only requested tokens are counted.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

from kiln.engine.engine import Engine
from kiln.llm import LLM
from kiln.sampling import SamplingParams


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @classmethod
    def random(
        cls,
        num_prompts: int,
        input_len: tuple[int, int],
        output_len: tuple[int, int],
        vocab_size: int,
        seed: int = 0,
    ) -> Workload:
        rng = random.Random(seed)
        prompts = [
            [rng.randrange(100, vocab_size) for _ in range(rng.randint(*input_len))]
            for _ in range(num_prompts)
        ]
        return cls(prompts, [rng.randint(*output_len) for _ in range(num_prompts)])


@dataclass
class RunResult:
    name: str
    seconds: float
    num_output_tokens: int
    ttft: list[float]
    tpot: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.seconds


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[int, float]:
    if len(values) < 2:
        return {p: values[0] if values else 0.0 for p in points}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {p: cuts[p - 1] for p in points}


def run_kiln(engine: Engine, workload: Workload, name: str = "kiln") -> RunResult:
    """Submit everything at once and step the engine until done, timing each request."""
    start = time.perf_counter()
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
        params = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
        engine.add_request(f"bench-{i}", prompt, params)
    produced = 0
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            produced += len(out.token_ids)
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = now
    seconds = time.perf_counter() - start
    ttft = [first[r] - start for r in first]
    tpot = [
        (done[r] - first[r]) / (n - 1)
        for r, n in zip(
            (f"bench-{i}" for i in range(len(workload.prompts))), workload.output_lens, strict=True
        )
        if n > 1
    ]
    return RunResult(name, seconds, produced, ttft, tpot)


def run_transformers(
    model: object, workload: Workload, pad_token_id: int, batch_size: int | None = None
) -> RunResult:
    """Sorted, left-padded static batches through ``generate``; counts requested tokens only.

    Batches run one after another, so a request's TTFT is the time of the batches before its
    own plus its batch's prefill (timed by a separate 1-token ``generate`` of the same batch,
    which is left out of the throughput time); its TPOT is the batch's decode time per step.
    """
    order = sorted(range(len(workload.prompts)), key=lambda i: len(workload.prompts[i]))
    batch_size = batch_size or len(order)
    elapsed = 0.0
    ttft: list[float] = []
    tpot: list[float] = []
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        prompts = [workload.prompts[i] for i in batch]
        width = max(len(p) for p in prompts)
        inputs = dict(
            input_ids=torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts]),
            attention_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
            do_sample=False,
            pad_token_id=pad_token_id,
        )
        max_new = max(workload.output_lens[i] for i in batch)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(max_new_tokens=1, min_new_tokens=1, **inputs)  # type: ignore[attr-defined]
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(max_new_tokens=max_new, min_new_tokens=max_new, **inputs)  # type: ignore[attr-defined]
            total = time.perf_counter() - t0
        ttft.extend([elapsed + prefill] * len(batch))
        if max_new > 1:
            tpot.extend([(total - prefill) / (max_new - 1)] * len(batch))
        elapsed += total
    return RunResult("transformers", elapsed, workload.num_output_tokens, ttft, tpot)


def prefix_ttft(
    llm: LLM, prefix_len: int, suffix_len: int = 16, seed: int = 1
) -> tuple[float, float]:
    """TTFT of a prompt whose ``prefix_len``-token prefix was seen before vs of its first run.

    Returns (cold seconds, warm seconds). The prefix and both suffixes are random token ids.
    """
    rng = random.Random(seed)
    vocab = llm.config.vocab_size
    prefix = [rng.randrange(100, vocab) for _ in range(prefix_len)]
    times = []
    for _ in range(2):
        suffix = [rng.randrange(100, vocab) for _ in range(suffix_len)]
        params = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([prefix + suffix], params)
        times.append(time.perf_counter() - start)
    return times[0], times[1]
