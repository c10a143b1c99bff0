"""AsyncEngine on stories260K: concurrent streams equal ``LLM.generate``, every finish reason,
aborts (by id, by leaving the loop, by cancelling) free the KV cache, back-pressure, errors
before the first output, and no leak of blocks, requests or memory over 1,000 requests.

Plain test functions drive coroutines with ``asyncio.run`` (no pytest plugin needed).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.config import SchedulerConfig
from kiln.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from kiln.engine.engine import Engine
from kiln.engine.kv_cache import kv_bytes_per_block
from kiln.engine.outputs import RequestOutput
from kiln.engine.request import FinishReason
from kiln.errors import ContextLengthError, KilnError
from model_copies import EOS_AT, EOS_PROMPT

T = TypeVar("T")

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her dog, Max. One day, Lily and Max found a big red ball under a tree."
)
TIMEOUT_S = 60.0
# A request that runs until it is stopped: greedy, past any EOS, 400 tokens after STORY.
LONG = SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test coroutine; a hang fails the test instead of the whole run."""
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def _llm(model_dir: Path, **kwargs: Any) -> LLM:
    kwargs.setdefault("kv_cache_memory", 16 << 20)
    return LLM(str(model_dir), dtype="float32", device="cpu", **kwargs)


def _started(engine: Engine) -> AsyncEngine:
    async_engine = AsyncEngine(engine)
    async_engine.start()
    return async_engine


async def _collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [out async for out in stream]


async def _wait_idle(async_engine: AsyncEngine) -> None:
    """Poll the engine's gauges until no request holds a block (aborts are asynchronous)."""
    deadline = asyncio.get_running_loop().time() + 10.0
    while True:
        stats = async_engine.stats()
        if (stats.num_running, stats.num_waiting, stats.num_kv_blocks_used) == (0, 0, 0):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the engine did not free everything: {stats}")
        await asyncio.sleep(0.01)


def _assert_no_leak(async_engine: AsyncEngine) -> None:
    """After the loop thread stopped: every block free, no request or per-request state left."""
    engine = async_engine.engine
    kv = engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    # Blocks left in the prefix cache are fine as long as nobody holds them.
    assert [b.block_id for b in kv.blocks if b.ref_count != 0] == []
    assert not engine.scheduler.requests
    assert not engine.scheduler.running and not engine.scheduler.waiting
    # Private bookkeeping keyed by request id: a leak here grows with every request served.
    assert not engine.output_processor._states
    assert not kv._hashes and not kv._num_registered
    assert not async_engine._streams
    assert async_engine._num_pending == 0


# --- an EOS that greedy decoding reaches ---------------------------------------------------


@pytest.fixture(scope="module")
def reference(eos_dir: Path) -> LLM:
    """Drives ``LLM.generate`` for expected outputs; never shares its runner with an engine."""
    return _llm(eos_dir)


@pytest.fixture(scope="module")
def async_engine(eos_dir: Path) -> Iterator[AsyncEngine]:
    async_engine = _started(_llm(eos_dir).engine)
    yield async_engine
    async_engine.stop()
    assert not async_engine.is_running


# --- streams ---------------------------------------------------------------------------------


def _concurrent_requests(reference: LLM) -> list[tuple[str | list[int], SamplingParams]]:
    encode = reference.tokenizer.encode
    story = encode(STORY)
    greedy = SamplingParams.greedy_params
    requests: list[tuple[str | list[int], SamplingParams]] = [
        (EOS_PROMPT, greedy(max_new_tokens=40)),  # eos_token
        (EOS_PROMPT, greedy(max_new_tokens=3)),  # length, before the EOS
        (EOS_PROMPT, greedy(max_new_tokens=EOS_AT + 1)),  # eos_token on the last allowed token
        ("Lily", greedy(max_new_tokens=1)),
        (story, greedy(max_new_tokens=24, logprobs=True, top_logprobs=3)),
        (story[:20], greedy(max_new_tokens=17)),
        (story[:40], greedy(max_new_tokens=30, logprobs=True)),
        ("Tom and Sue were friends. They", greedy(max_new_tokens=25)),
        ([1], greedy(max_new_tokens=12, top_logprobs=2)),
        (story, SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=20)),
        (story[:33], greedy(max_new_tokens=16, min_new_tokens=16)),
    ]
    # Stop strings and stop tokens taken from what the model really says, so they do stop it.
    for prompt in ("The dog", story[:25], "Max was a big"):
        (free,) = reference.generate([prompt], greedy(max_new_tokens=30))
        stop = free.text[len(free.text) // 2 :][:4]
        requests.append((prompt, greedy(max_new_tokens=30, stop=[stop, "zzzz"])))
    prompt = "Tom and Sue were friends."
    (free,) = reference.generate([prompt], greedy(max_new_tokens=20))
    assert free.finish_reason is FinishReason.LENGTH
    stop_token = free.token_ids[8]
    requests.append((prompt, greedy(max_new_tokens=20, stop_token_ids=[stop_token])))
    requests.append(
        (prompt, greedy(max_new_tokens=20, stop_token_ids=[stop_token], min_new_tokens=12))
    )
    return requests


def test_concurrent_streams_equal_llm_generate(async_engine: AsyncEngine, reference: LLM) -> None:
    requests = _concurrent_requests(reference)
    assert len(requests) == 16
    expected = [reference.generate([prompt], params)[0] for prompt, params in requests]

    async def main() -> list[list[RequestOutput]]:
        streams = [
            _collect(async_engine.generate(prompt, params, request_id=f"concurrent-{i}"))
            for i, (prompt, params) in enumerate(requests)
        ]
        return await asyncio.gather(*streams)

    results = _run(main())
    for (_, params), outs, want in zip(requests, results, expected, strict=True):
        assert outs, "every request streams at least one output"
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason is want.finish_reason
        assert "".join(o.text for o in outs) == want.text
        assert [t for o in outs for t in o.token_ids] == want.token_ids
        assert outs[-1].num_output_tokens == len(want.token_ids)
        if params.wants_logprobs:  # top_logprobs alone also returns the chosen token's
            logprobs = [lp for o in outs for lp in o.logprobs]
            assert len(logprobs) == len(want.token_ids)
            assert logprobs == pytest.approx(want.logprobs, abs=1e-4)
            assert all(lp <= 0 for lp in logprobs)
        else:
            assert all(not o.logprobs for o in outs)
        if params.top_logprobs:
            tops = [t for o in outs for t in o.top_logprobs]
            assert len(tops) == len(want.token_ids)
            for token_id, logprob, top in zip(want.token_ids, logprobs, tops, strict=True):
                assert len(top) == params.top_logprobs
                assert top[0][0] == token_id  # greedy takes the most likely token
                assert top[0][1] == pytest.approx(logprob, abs=1e-5)

    reasons = [outs[-1].finish_reason for outs in results]
    assert reasons[:3] == [FinishReason.EOS_TOKEN, FinishReason.LENGTH, FinishReason.EOS_TOKEN]
    assert reasons[-5:] == [FinishReason.STOP_SEQUENCE] * 4 + [FinishReason.LENGTH]
    assert len(results[0][-1].token_ids) == 1 and sum(len(o.token_ids) for o in results[0]) == 6
    for outs, (prompt, params) in zip(results[-5:-2], requests[-5:-2], strict=True):
        text = "".join(o.text for o in outs)
        assert params.stop[0] not in text  # cut before the stop string
        assert len(text) < len(reference.generate([prompt], params.replace(stop=()))[0].text)
    _run(_wait_idle(async_engine))
    metrics = async_engine.metrics
    assert metrics.time_to_first_token.count >= len(requests)
    assert metrics.num_requests_finished.get("stop_sequence", 0) >= 4


def test_abort_by_id_mid_stream(async_engine: AsyncEngine) -> None:
    async def main() -> int:
        num_outputs = 0
        stream = async_engine.generate(STORY, LONG, "abort-me")
        with pytest.raises(KilnError, match="abort"):
            async for _ in stream:
                num_outputs += 1
                if num_outputs == 3:
                    async_engine.abort("abort-me")
        await _wait_idle(async_engine)
        return num_outputs

    assert 3 <= _run(main()) < LONG.max_new_tokens // 2  # stopped soon after the abort
    assert async_engine.engine.metrics.num_requests_finished.get("abort", 0) >= 1


def _until_the_context_is_full(async_engine: AsyncEngine) -> SamplingParams:
    """``LONG`` stretched to the whole context: hundreds of steps that only an abort cuts short."""
    engine = async_engine.engine
    num_prompt_tokens = len(engine.tokenizer.encode(STORY))
    return LONG.replace(
        max_new_tokens=min(engine.max_model_len, engine.max_cache_tokens) - num_prompt_tokens
    )


def _finished_totals(async_engine: AsyncEngine) -> tuple[dict[str, int], int]:
    metrics = async_engine.metrics
    return dict(metrics.num_requests_finished), metrics.num_generation_tokens


async def _assert_aborted_early(
    async_engine: AsyncEngine,
    request_id: str,
    params: SamplingParams,
    before: tuple[dict[str, int], int],
) -> None:
    """The request the caller left ended as *aborted*, long before it could have finished on
    its own, and gave its blocks back. Without the abort it would run on to ``length`` (the
    engine would then go idle only after all ``max_new_tokens`` steps, and count no abort)."""
    await _wait_idle(async_engine)  # every KV block is back, nothing running or waiting
    finished_before, tokens_before = before
    finished, tokens = _finished_totals(async_engine)
    new_finished = {
        reason: n - finished_before.get(reason, 0)
        for reason, n in finished.items()
        if n != finished_before.get(reason, 0)
    }
    assert new_finished == {"abort": 1}
    num_generated = tokens - tokens_before  # counted by the engine when the request ended
    assert 1 <= num_generated < params.max_new_tokens // 2, (num_generated, params)
    assert request_id not in async_engine.engine.scheduler.requests
    assert request_id not in async_engine._streams


def test_leaving_the_loop_aborts(async_engine: AsyncEngine) -> None:
    params = _until_the_context_is_full(async_engine)
    assert params.max_new_tokens >= 400

    async def main() -> None:
        before = _finished_totals(async_engine)
        num_outputs = 0
        async for _ in async_engine.generate(STORY, params, "leave-the-loop"):
            num_outputs += 1
            if num_outputs == 3:
                break  # the client went away: the generator is closed, the request aborted
        await _assert_aborted_early(async_engine, "leave-the-loop", params, before)

    _run(main())


def test_cancelling_the_consumer_aborts(async_engine: AsyncEngine) -> None:
    params = _until_the_context_is_full(async_engine)
    assert params.max_new_tokens >= 400

    async def main() -> None:
        before = _finished_totals(async_engine)
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in async_engine.generate(STORY, params, "cancel-the-consumer"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _assert_aborted_early(async_engine, "cancel-the-consumer", params, before)

    _run(main())


def test_errors_before_the_first_output(async_engine: AsyncEngine, reference: LLM) -> None:
    params = SamplingParams.greedy_params(max_new_tokens=8)
    max_model_len = async_engine.engine.max_model_len

    async def main() -> None:
        with pytest.raises(ContextLengthError):
            await anext(async_engine.generate([5] * (max_model_len + 1), params))
        with pytest.raises(ContextLengthError):
            await anext(
                async_engine.generate([5] * 500, params.replace(max_new_tokens=max_model_len))
            )
        with pytest.raises(ContextLengthError):
            await anext(async_engine.generate([], params))
        # A request id in use is refused without disturbing the request that holds it.
        first = async_engine.generate(STORY, params, request_id="taken")
        head = await anext(first)
        with pytest.raises(KilnError, match="already in use"):
            await anext(async_engine.generate("Lily", params, request_id="taken"))
        rest = await _collect(first)
        (want,) = reference.generate([STORY], params)
        assert [t for o in [head, *rest] for t in o.token_ids] == want.token_ids
        # The engine keeps serving.
        outs = await _collect(async_engine.generate(STORY, params))
        assert [t for o in outs for t in o.token_ids] == want.token_ids
        await _wait_idle(async_engine)

    _run(main())


def test_back_pressure_bounded_queue(eos_dir: Path) -> None:
    llm = _llm(eos_dir)
    engine = Engine(
        llm.engine.executor,
        llm.tokenizer,
        SchedulerConfig(max_num_seqs=1, max_waiting_requests=2),
        llm.engine.kv_cache.num_blocks,
        llm.max_model_len,
        llm.engine.eos_token_ids,
    )
    del llm.engine  # the runner (and its KV cache) now belongs to `engine` alone
    async_engine = _started(engine)
    short = SamplingParams.greedy_params(max_new_tokens=4)

    async def main() -> None:
        running = async_engine.generate(STORY, LONG, "running")
        await anext(running)  # it holds the only running slot
        # The gauges a caller sees include the step whose output woke it.
        assert (async_engine.stats().num_running, async_engine.stats().num_waiting) == (1, 0)
        waiting = [
            asyncio.create_task(_collect(async_engine.generate("Lily", short, f"waiting-{i}")))
            for i in range(2)
        ]
        await asyncio.sleep(0)  # both are queued now
        for i in range(3):
            with pytest.raises(QueueFullError):
                await anext(async_engine.generate("Lily", short, f"refused-{i}"))
        assert not any(t.done() for t in waiting)
        await running.aclose()  # frees the slot: the queued requests run
        for outs in await asyncio.gather(*waiting):
            assert outs[-1].finish_reason is FinishReason.LENGTH
        outs = await _collect(async_engine.generate("Lily", short))  # room again
        assert outs[-1].finish_reason is FinishReason.LENGTH
        await _wait_idle(async_engine)

    try:
        _run(main())
        assert engine.metrics.num_requests_finished == {"abort": 1, "length": 3}
    finally:
        async_engine.stop()
    _assert_no_leak(async_engine)


def test_stop_fails_every_request_and_restarts(eos_dir: Path) -> None:
    engine = _llm(eos_dir).engine
    execute = engine.runner.execute
    # NOTE: a step held open by the test, not a timed one: on a loaded machine a 0.2 s step
    # could end before the test looked, and the stop with it.
    armed, inside, release = threading.Event(), threading.Event(), threading.Event()

    def held_execute(scheduler_output: Any) -> Any:
        if armed.is_set():
            inside.set()
            release.wait(30)  # a long step: stop() waits for it, and requests arrive meanwhile
        return execute(scheduler_output)

    engine.runner.execute = held_execute  # type: ignore[method-assign]
    async_engine = _started(engine)
    short = SamplingParams.greedy_params(max_new_tokens=4)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        in_flight = async_engine.generate(STORY, LONG)
        await anext(in_flight)
        armed.set()
        assert await loop.run_in_executor(None, inside.wait, 30)
        stopper = threading.Thread(target=async_engine.stop)
        stopper.start()
        await asyncio.sleep(0.02)  # stopping, while the loop thread is inside its step
        assert async_engine.is_running
        late = asyncio.create_task(anext(async_engine.generate(STORY, short)))
        await asyncio.sleep(0.02)  # the late request is in before the step ends
        release.set()
        # Neither the running request nor the one that raced the stop may be left hanging.
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_collect(in_flight), 5.0)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(late, 5.0)
        await loop.run_in_executor(None, stopper.join)
        assert not async_engine.is_running
        with pytest.raises(EngineDeadError):
            await anext(async_engine.generate(STORY, short))

        engine.runner.execute = execute  # type: ignore[method-assign]
        async_engine.start()
        outs = await _collect(async_engine.generate(STORY, short))
        assert outs[-1].finish_reason is FinishReason.LENGTH

    try:
        _run(main())
    finally:
        async_engine.stop()
    _assert_no_leak(async_engine)


# --- no leaks --------------------------------------------------------------------------------
#
# The workload runs in a child process so its RSS is that of a process doing nothing else
# (this one holds models and caches from every other test).

NUM_LEAK_REQUESTS = 1000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _leak_workload(model_dir: str, num_requests: int) -> dict[str, Any]:
    """1,000 requests, 48 in flight over 32 sequences and a KV cache with room for about 20,
    so requests also wait and get preempted; one in ten leaves early, in one of four ways.
    Returns what is left over, for the parent to check."""
    torch.set_num_threads(1)
    probe = _llm(Path(model_dir), kv_cache_memory=1 << 20)
    kv_cache_memory = 40 * kv_bytes_per_block(probe.config, 16, probe.dtype)
    # warm_up: oneDNN's state for each row bucket is otherwise made on its first use, and a
    # batch size first seen late in the run would read as growth.
    llm = _llm(Path(model_dir), kv_cache_memory=kv_cache_memory, max_num_seqs=32, warm_up=True)
    del probe
    async_engine = _started(llm.engine)
    rng = random.Random(0)
    shared = llm.tokenizer.encode(STORY)
    rss: list[int] = []
    outcomes: dict[str, int] = {}

    def prompt() -> list[int]:
        n = rng.randint(1, 60)
        if rng.random() < 0.3:  # a shared prefix: cached blocks shared by live requests
            return shared[:n]
        return [1] + [rng.randrange(3, 512) for _ in range(n - 1)]

    def params(mode: str) -> SamplingParams:
        return SamplingParams(
            temperature=rng.choice([0.0, 0.0, 1.0]),
            seed=rng.randrange(1 << 30),
            # NOTE: long enough that a request cannot finish before its abort lands.
            max_new_tokens=rng.randint(1, 10) if mode == "full" else 128,
            ignore_eos=mode != "full",
            logprobs=rng.random() < 0.1,
        )

    async def consume_then_leave(request_id: str, stream: AsyncIterator[Any], mode: str) -> None:
        if mode == "abort_waiting":  # before its first output, while it may still wait
            asyncio.get_running_loop().call_soon(async_engine.abort, request_id)
            with pytest.raises(KilnError, match="abort"):
                await _collect(stream)
        elif mode == "cancel":  # the consumer's task is cancelled (a server timeout)
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in stream:
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif mode == "break":  # the client went away
            async for _ in stream:
                break
        else:  # aborted by id mid-stream
            with pytest.raises(KilnError, match="abort"):
                async for out in stream:
                    if out.num_output_tokens == 2:
                        async_engine.abort(request_id)

    async def one(i: int, limit: asyncio.Semaphore) -> None:
        request_id = f"leak-{i}"
        mode = {0: "abort", 1: "break", 2: "cancel", 3: "abort_waiting"}.get(i % 40, "full")
        async with limit:
            stream = async_engine.generate(prompt(), params(mode), request_id)
            if mode == "full":
                outs = await _collect(stream)
                assert outs[-1].finished
            else:
                await consume_then_leave(request_id, stream, mode)
        outcomes[mode] = outcomes.get(mode, 0) + 1
        if sum(outcomes.values()) % 50 == 0:
            rss.append(_rss_bytes())

    async def main() -> None:
        limit = asyncio.Semaphore(48)
        await asyncio.gather(*(one(i, limit) for i in range(num_requests)))
        await _wait_idle(async_engine)

    try:
        _run(main())
    finally:
        async_engine.stop()
    engine = async_engine.engine
    kv = engine.kv_cache
    return {
        "num_blocks": kv.num_blocks,
        "num_free_blocks": kv.num_free_blocks,
        "held_blocks": [b.block_id for b in kv.blocks if b.ref_count != 0],
        "num_cached_blocks": kv.num_cached_blocks,
        "requests": list(engine.scheduler.requests),
        "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting),
        # Private bookkeeping keyed by request id: a leak here grows with every request.
        "detokenizer_states": len(engine.output_processor._states),
        "block_hashes": len(kv._hashes),
        "registered": len(kv._num_registered),
        "streams": len(async_engine._streams),
        "pending": async_engine._num_pending,
        "finished": engine.metrics.num_requests_finished,
        "outcomes": outcomes,
        "num_preemptions": engine.stats().num_preemptions,
        "prefix_cache_hits": engine.stats().prefix_cache_hits,
        "rss": rss,
    }


@pytest.fixture(scope="module")
def leak_run(stories_dir: Path) -> dict[str, Any]:
    code = (
        "import json, os, sys; sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]; "
        "import test_async_engine as t; "
        "print(json.dumps(t._leak_workload(sys.argv[2], int(sys.argv[3]))))"
    )
    here = str(Path(__file__).parent)
    args = [sys.executable, "-c", code, here, str(stories_dir), str(NUM_LEAK_REQUESTS)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_leak_after_1000_requests(leak_run: dict[str, Any]) -> None:
    r = leak_run
    assert r["num_free_blocks"] == r["num_blocks"]
    assert r["held_blocks"] == []  # cached blocks nobody holds are fine
    assert (r["requests"], r["running"], r["waiting"]) == ([], 0, 0)
    assert (r["detokenizer_states"], r["block_hashes"], r["registered"]) == (0, 0, 0)
    assert (r["streams"], r["pending"]) == (0, 0)
    assert sum(r["outcomes"].values()) == NUM_LEAK_REQUESTS
    assert r["outcomes"]["full"] == NUM_LEAK_REQUESTS * 9 // 10
    assert sum(r["finished"].values()) == NUM_LEAK_REQUESTS
    assert r["finished"]["abort"] == NUM_LEAK_REQUESTS // 10
    # The workload did what it meant to: preemption and shared cached prefixes.
    assert r["num_preemptions"] > 0
    assert r["prefix_cache_hits"] > 0


def test_rss_flat_over_the_second_half(leak_run: dict[str, Any]) -> None:
    rss = leak_run["rss"]
    assert len(rss) == NUM_LEAK_REQUESTS // 50
    second_half = rss[len(rss) // 2 :]
    assert max(second_half) <= second_half[0] * 1.05, [r >> 20 for r in rss]
    assert min(second_half) >= second_half[0] * 0.95, [r >> 20 for r in rss]
