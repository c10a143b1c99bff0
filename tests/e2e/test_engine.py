"""The engine end to end on stories260K: continuous batching gives the same greedy tokens as
each request run alone and as ``transformers``, whatever the batching, chunking, block size,
prefix caching or preemption; the prefix cache is reused across calls; metrics add up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kiln import LLM, SamplingParams
from kiln.engine.kv_cache import kv_bytes_per_block
from kiln.engine.outputs import CompletionOutput
from kiln.engine.request import FinishReason

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her dog, Max. One day, Lily and Max found a big red ball under a tree."
)
OTHER_STORY = "Tom and Sue were friends. They liked to play with their toys in the garden."


def _llm(stories_dir: Path, **kwargs: Any) -> LLM:
    kwargs.setdefault("kv_cache_memory", 16 << 20)
    return LLM(str(stories_dir), dtype="float32", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def base(stories_dir: Path) -> LLM:
    return _llm(stories_dir)


@pytest.fixture(scope="module")
def workload(base: LLM) -> list[tuple[list[int], SamplingParams]]:
    """Eight prompts of 1 to ~60 tokens, four sharing a long prefix, each with its own length."""
    encode = base.tokenizer.encode
    shared = encode(STORY)
    assert len(shared) > 40  # several blocks of 16 in common

    def cont(text: str) -> list[int]:
        return encode(text, add_special_tokens=False)

    prompts = [
        shared + cont(" Lily kicked the ball"),
        shared + cont(" Max barked"),
        shared[:37],
        shared,
        encode("Lily"),
        encode("Once upon a time"),
        encode(OTHER_STORY),
        shared[:1],  # BOS alone
    ]
    max_new = [20, 9, 33, 5, 40, 1, 12, 26]
    # min_new_tokens == max_new_tokens goes through the sampler's logits processors (and
    # blocks EOS, as transformers' min_new_tokens does); the others take the bare argmax.
    exact = [True, False, False, True, False, True, True, False]
    return [
        (p, SamplingParams(temperature=0.0, max_new_tokens=n, min_new_tokens=n if e else 0))
        for p, n, e in zip(prompts, max_new, exact, strict=True)
    ]


@pytest.fixture(scope="module")
def alone_outputs(stories_dir: Path, workload) -> list[CompletionOutput]:
    """Each request generated on its own by a fresh LLM with the default settings."""
    return [_llm(stories_dir).generate([p], params)[0] for p, params in workload]


@pytest.fixture(scope="module")
def alone(alone_outputs) -> list[list[int]]:
    return [o.token_ids for o in alone_outputs]


@pytest.fixture(scope="module")
def hf_tokens(stories_dir: Path, base: LLM, workload) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    eos = sorted(base.engine.eos_token_ids)
    out = []
    for prompt, params in workload:
        with torch.inference_mode():
            ids = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.min_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
        out.append(ids[0, len(prompt) :].tolist())
    return out


def test_alone_matches_transformers(alone, hf_tokens, workload) -> None:
    assert alone == hf_tokens
    assert [len(t) for t in alone] == [params.max_new_tokens for _, params in workload]


def _kv_memory_for(llm: LLM, workload, block_size: int, num_spare_blocks: int) -> int:
    """A KV budget holding the largest single request plus a few blocks: too little for all
    of them at once, so the scheduler has to preempt."""
    largest = max(len(p) + params.max_new_tokens for p, params in workload)
    num_blocks = -(-largest // block_size) + num_spare_blocks
    return num_blocks * kv_bytes_per_block(llm.config, block_size, llm.dtype)


CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "no_prefix_caching": {"enable_prefix_caching": False},
    "chunked_prefill_7": {"max_num_batched_tokens": 7},
    "preemption": {"spare_blocks": 3},
    "block_size_1": {"block_size": 1},
    "block_size_7": {"block_size": 7},
    "preemption_chunked_block_size_7": {
        "block_size": 7,
        "max_num_batched_tokens": 5,
        "spare_blocks": 2,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_greedy_matches_alone_and_transformers(
    name: str, stories_dir: Path, base: LLM, workload, alone, alone_outputs, hf_tokens
) -> None:
    kwargs = dict(CONFIGS[name])
    spare_blocks = kwargs.pop("spare_blocks", None)
    if spare_blocks is not None:
        block_size = kwargs.get("block_size", 16)
        kwargs["kv_cache_memory"] = _kv_memory_for(base, workload, block_size, spare_blocks)
    llm = _llm(stories_dir, **kwargs)
    prompts = [p for p, _ in workload]
    params = [s for _, s in workload]

    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == alone
    assert [o.token_ids for o in outputs] == hf_tokens
    assert [o.text for o in outputs] == [o.text for o in alone_outputs]
    assert [o.finish_reason for o in outputs] == [o.finish_reason for o in alone_outputs]

    # Again: the shared prefixes (and, with caching, whole prompts) now come from the cache.
    again = llm.generate(prompts, params)
    assert [o.token_ids for o in again] == alone

    engine = llm.engine
    stats = engine.stats()
    if spare_blocks is not None:
        assert stats.num_preemptions > 0, "the KV budget was meant to force preemption"
    if llm.engine.kv_cache.enable_prefix_caching:
        assert stats.prefix_cache_hits > 0
        assert 0 < stats.prefix_cache_hit_rate <= 1
    else:
        assert stats.prefix_cache_hits == 0
    _assert_idle(llm)


def _assert_idle(llm: LLM) -> None:
    engine = llm.engine
    kv = engine.kv_cache
    assert not engine.has_unfinished()
    assert not engine.scheduler.requests
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_kv_blocks_used) == (0, 0, 0)


# --- prefix caching across calls -----------------------------------------------------------


def test_prefix_cache_reused_across_calls(stories_dir: Path) -> None:
    llm = _llm(stories_dir)
    no_cache = _llm(stories_dir, enable_prefix_caching=False)
    block_size = llm.engine.block_size
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    prompt = llm.tokenizer.encode(STORY)
    suffix = llm.tokenizer.encode(" Lily was happy", add_special_tokens=False)

    first = list(llm.stream(prompt, params))
    assert first[0].num_cached_tokens == 0
    generated = [t for o in first for t in o.token_ids]

    def check(new_prompt: list[int], min_cached: int) -> None:
        outs = list(llm.stream(new_prompt, params))
        cached = outs[0].num_cached_tokens
        assert min_cached <= cached < len(new_prompt)
        assert cached % block_size == 0
        assert all(o.num_cached_tokens == cached for o in outs)
        (expected,) = no_cache.generate([new_prompt], params)
        assert [t for o in outs for t in o.token_ids] == expected.token_ids
        assert "".join(o.text for o in outs) == expected.text

    # The prompt's full blocks are reused for a longer prompt...
    check(prompt + suffix, len(prompt) // block_size * block_size)
    # ... and so are the blocks holding generated tokens (all but the last one were computed).
    check(
        prompt + generated + suffix, (len(prompt) + len(generated) - 1) // block_size * block_size
    )
    # The same prompt again: the last token is always computed, for its logits.
    aligned = prompt[: 3 * block_size]
    list(llm.stream(aligned, params))
    check(aligned, 2 * block_size)
    assert llm.engine.stats().prefix_cache_hit_rate > 0
    _assert_idle(llm)


# --- metrics -------------------------------------------------------------------------------


def test_metrics_and_gauges(stories_dir: Path) -> None:
    llm = _llm(stories_dir, max_num_seqs=2)
    engine = llm.engine
    encode = llm.tokenizer.encode
    prompts = [encode(STORY), encode(OTHER_STORY), encode("Lily"), encode("Once upon a time")]
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"m{i}", prompt, params)
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_kv_blocks_used) == (4, 0, 0)
    assert stats.num_kv_blocks == engine.kv_cache.num_blocks
    engine.step()
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running) == (2, 2)
    assert 0 < stats.num_kv_blocks_used < stats.num_kv_blocks
    assert 0 < stats.kv_cache_usage < 1
    while engine.has_unfinished():
        engine.step()

    m = engine.metrics
    assert m.num_requests_finished == {"length": 4}
    assert m.num_prompt_tokens == sum(len(p) for p in prompts)
    assert m.num_generation_tokens == 4 * 6
    assert m.time_to_first_token.count == 4
    assert m.time_per_output_token.count == 4
    assert m.queue_time.count == 4
    assert m.e2e_latency.count == 4
    assert m.tokens_per_step.count == m.num_steps > 0
    # No prefix was shared: every token but each request's last was computed exactly once.
    assert m.tokens_per_step.total == sum(len(p) + 6 - 1 for p in prompts)
    assert m.time_to_first_token.total > 0 and m.time_per_output_token.total > 0
    # Two requests had to wait for the first two to finish.
    assert m.queue_time.total > 0
    assert m.time_to_first_token.quantile(0.5) > 0
    assert engine.stats().prefix_cache_hits == 0

    llm.generate([prompts[0]], params)  # the same long prompt again: its blocks are cached
    stats = engine.stats()
    assert stats.num_kv_blocks_cached > 0
    assert stats.prefix_cache_hits > 0 and 0 < stats.prefix_cache_hit_rate < 1
    assert m.num_requests_finished == {"length": 5}

    # A stop string completed by the last allowed token: counted as the caller saw it.
    (free,) = llm.generate(["Once upon a time"], params)
    stop = free.text[-3:]
    assert free.text.find(stop) == len(free.text) - 3  # only there
    (out,) = llm.generate(["Once upon a time"], params.replace(stop=[stop]))
    assert out.finish_reason is FinishReason.STOP_SEQUENCE
    assert out.text == free.text[:-3]
    assert m.num_requests_finished == {"length": 6, "stop_sequence": 1}

    # An abort is counted as such and frees everything.
    stream = llm.stream(prompts[1], SamplingParams(temperature=0.0, max_new_tokens=50))
    next(stream)
    assert engine.stats().num_running == 1 and engine.stats().num_kv_blocks_used > 0
    stream.close()
    assert m.num_requests_finished == {"length": 6, "stop_sequence": 1, "abort": 1}
    _assert_idle(llm)
