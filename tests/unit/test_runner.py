"""The runner behind the plain-data step boundary, on stories260K.

A runner fed pickled copies of real SchedulerOutputs computes exactly what a runner fed the
originals computes; a request's prompt and params cross once per (re)admission; seeded sampling
and penalties give the same tokens whether or not the request was preempted (the runner keeps
the generator across preemption); the runner drops what it holds for finished requests.
"""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.config import SchedulerConfig
from kiln.engine.engine import Engine
from kiln.engine.executor import Executor, InProcessExecutor
from kiln.engine.io import ModelOutput, SchedulerOutput
from kiln.engine.kv_cache import allocate_kv_cache, kv_bytes_per_block
from kiln.engine.request import Request
from kiln.engine.runner import ModelRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her dog, Max. One day, Lily and Max found a big red ball under a tree."
)
PROMPTS = [STORY, "Tom and Sue were friends.", "Lily", STORY[:60], "Once upon a time", "Max"]
PARAMS = [
    SamplingParams.greedy_params(max_new_tokens=30),
    SamplingParams.greedy_params(max_new_tokens=24, repetition_penalty=1.3, min_new_tokens=24),
    SamplingParams(
        temperature=0.9,
        top_k=20,
        seed=11,
        max_new_tokens=28,
        frequency_penalty=0.5,
        presence_penalty=0.3,
    ),
    SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_new_tokens=26, repetition_penalty=1.2),
    SamplingParams(temperature=0.8, seed=3, max_new_tokens=32, logprobs=True, top_logprobs=3),
    SamplingParams(temperature=1.1, min_p=0.05, seed=9, max_new_tokens=30, ignore_eos=True),
]


class TeeExecutor(Executor):
    """Runs each step on ``a`` with the SchedulerOutput and on ``b`` with a pickled copy of it;
    both must produce the same ModelOutput. Counts how often each request is sent whole."""

    def __init__(self, a: ModelRunner, b: ModelRunner) -> None:
        self.a, self.b = a, b
        self.num_steps = 0
        self.num_sent_new: Counter[str] = Counter()

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        copy = pickle.loads(pickle.dumps(scheduler_output))
        assert copy == scheduler_output and copy is not scheduler_output
        out_a = self.a.execute(scheduler_output)
        out_b = self.b.execute(copy)
        assert out_a == out_b
        self.num_steps += 1
        self.num_sent_new.update(d.request_id for d in scheduler_output.new_requests)
        return out_a

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def block_size(self) -> int:
        return self.a.block_size

    def shutdown(self) -> None:
        pass


def _llm(stories_dir: Path, **kwargs: object) -> LLM:
    kwargs.setdefault("kv_cache_memory", 16 << 20)
    return LLM(str(stories_dir), dtype="float32", device="cpu", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(stories_dir: Path) -> list[list[int]]:
    """Each request generated alone: no batching, no chunking, no preemption."""
    llm = _llm(stories_dir)
    pairs = zip(PROMPTS, PARAMS, strict=True)
    return [llm.generate([p], params)[0].token_ids for p, params in pairs]


def _tee_engine(llm: LLM, block_size: int, num_blocks: int, budget: int) -> Engine:
    """An engine on two runners over the same weights, each with its own KV cache."""
    runner_a = llm.engine.runner
    kv_b = allocate_kv_cache(llm.config, num_blocks, block_size, llm.dtype, llm.device)
    runner_b = ModelRunner(llm.model, kv_b, block_size, llm.device, llm.engine.eos_token_ids)
    return Engine(
        TeeExecutor(runner_a, runner_b),
        llm.tokenizer,
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget),
        num_blocks,
        llm.max_model_len,
        llm.engine.eos_token_ids,
    )


def _run(engine: Engine, prompt_ids: list[list[int]]) -> tuple[list[Request], list[list[int]]]:
    requests = [
        engine.add_request(f"r{i}", ids, params)
        for i, (ids, params) in enumerate(zip(prompt_ids, PARAMS, strict=True))
    ]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return requests, [tokens[r.request_id] for r in requests]


def test_pickled_scheduler_outputs_give_identical_model_outputs_through_preemption(
    stories_dir: Path, reference: list[list[int]]
) -> None:
    block_size = 4
    probe = _llm(stories_dir)
    prompt_ids = [probe.tokenizer.encode(p) for p in PROMPTS]
    largest = max(len(ids) + p.max_new_tokens for ids, p in zip(prompt_ids, PARAMS, strict=True))
    num_blocks = -(-largest // block_size) + 6  # the largest fits alone: others get preempted
    llm = _llm(
        stories_dir,
        block_size=block_size,
        kv_cache_memory=num_blocks * kv_bytes_per_block(probe.config, block_size, probe.dtype),
    )
    engine = _tee_engine(llm, block_size, num_blocks, budget=24)  # chunked prefills too
    tee = engine.executor
    assert isinstance(tee, TeeExecutor)

    requests, tokens = _run(engine, prompt_ids)

    assert tokens == reference
    assert tee.num_steps > 10
    assert engine.stats().num_preemptions > 0
    # Seeded sampling with penalties survived a preemption unchanged (the generator stayed).
    assert any(r.num_preemptions and r.params.seed is not None for r in requests)
    # Prompt and params crossed once, plus once more for each time the request came back.
    assert tee.num_sent_new == {r.request_id: 1 + r.num_preemptions for r in requests}
    for runner in (tee.a, tee.b):
        _assert_drops_finished(engine, runner)


def _assert_drops_finished(engine: Engine, runner: ModelRunner) -> None:
    """Finished requests are dropped with the next output: nothing else is left behind."""
    pending = engine.scheduler._finished_ids
    assert set(runner.requests) <= set(pending)
    assert set(runner._preempted_generators) <= set(pending)
    runner.execute(SchedulerOutput(finished_request_ids=list(pending)))
    assert not runner.requests and not runner._preempted_generators
    assert runner.penalties.num_used_slots == 0


def test_runner_state_follows_new_and_cached_requests(stories_dir: Path) -> None:
    llm = _llm(stories_dir, block_size=4)
    engine = llm.engine
    runner = engine.runner
    assert isinstance(engine.executor, InProcessExecutor) and runner is engine.executor.runner
    prompt = llm.tokenizer.encode(STORY)
    params = SamplingParams(temperature=0.7, seed=1, max_new_tokens=9, repetition_penalty=1.1)
    request = engine.add_request("a", prompt, params)

    out = engine.scheduler.schedule()
    assert [d.request_id for d in out.new_requests] == ["a"] and not out.cached_requests
    (new,) = out.new_requests
    assert new.prompt_token_ids == prompt and new.output_token_ids == []
    assert new.params is params and new.block_ids == request.block_ids
    engine.scheduler.update(out, engine.executor.execute(out))
    state = runner.requests["a"]
    assert state.output_token_ids == request.output_token_ids and len(state.output_token_ids) == 1
    assert state.penalty_slot != 0 and state.generator is not None

    # Decode steps send only diffs: no token ids, and a block only when one is added.
    num_blocks_sent = len(request.block_ids)
    while not request.is_finished:
        out = engine.scheduler.schedule()
        assert not out.new_requests
        (cached,) = out.cached_requests
        num_blocks_sent += len(cached.new_block_ids)
        assert num_blocks_sent == len(request.block_ids)
        assert cached.num_computed_tokens == request.num_computed_tokens
        for o in engine.scheduler.update(out, engine.executor.execute(out)):
            if o.finish_reason is not None:
                engine.scheduler.finish_request(o.request.request_id, o.finish_reason)
        assert state.prompt_token_ids + state.output_token_ids == prompt + request.output_token_ids
        assert state.block_ids == request.block_ids or request.is_finished
    # Finished: the next output tells the runner, which forgets the request.
    engine.add_request("b", prompt[:5], params)
    out = engine.scheduler.schedule()
    assert out.finished_request_ids == ["a"]
    engine.executor.execute(out)
    assert set(runner.requests) == {"b"}
