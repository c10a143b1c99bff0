"""Scheduler: token budget, chunked prefill, preemption, FCFS, aborts — with fake model outputs.

No model: requests are built directly, ``schedule()`` is driven by hand and ``update()`` is fed
a fake ``ModelOutput`` with one token for each chunk that samples. The token is a deterministic
function of the request id and the output index (like greedy decoding), so a preempted request
that recomputes its context must produce exactly the tokens it would have without preemption.

``schedule()`` returns plain data (request ids); the tests look at it through :class:`Step`,
which resolves the ids to the scheduler's ``Request`` objects when the step is scheduled, and
end requests on their token's finish reason as ``Engine`` does (:func:`update`).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
import zlib

import pytest

from kiln.config import SchedulerConfig
from kiln.engine.io import (
    CachedRequestData,
    ModelOutput,
    NewRequestData,
    SchedulerOutput,
    TokenOutput,
)
from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import FinishReason, Request, RequestStatus
from kiln.engine.scheduler import Scheduler
from kiln.errors import KilnError
from kiln.sampling import SamplingParams
from kv_invariants import check_invariants

EOS = 0


def make_request(
    request_id: str,
    prompt: list[int] | int,
    max_new_tokens: int = 8,
    *,
    max_model_len: int = 4096,
) -> Request:
    """A request; an int prompt means that many distinct tokens derived from the id."""
    if isinstance(prompt, int):
        seed = zlib.crc32(request_id.encode())
        prompt = [1 + (seed + 7 * i) % 1000 for i in range(prompt)]
    return Request(
        request_id,
        list(prompt),
        SamplingParams(max_new_tokens=max_new_tokens),
        eos_token_ids=frozenset({EOS}),
        max_model_len=max_model_len,
    )


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    *,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    max_waiting_requests: int | None = None,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_waiting_requests=max_waiting_requests,
    )
    return Scheduler(config, KVCacheManager(num_blocks, block_size, enable_prefix_caching))


def fake_token(request_id: str, index: int, eos_every: int = 0) -> int:
    """The token a request samples as its ``index``-th output: a function of both only."""
    h = zlib.crc32(f"{request_id}/{index}".encode())
    if eos_every and h % eos_every == 0:
        return EOS
    return 1 + h % 1000


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A scheduled request: compute tokens ``[start, start + num_new_tokens)`` this step."""

    request: Request
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's last token, so its logits give a new token."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclasses.dataclass(frozen=True)
class Step:
    """A ``SchedulerOutput`` with its ids resolved to ``Request`` objects at schedule time."""

    output: SchedulerOutput
    chunks: list[Chunk]
    preempted: list[Request]

    @property
    def num_batched_tokens(self) -> int:
        return self.output.num_batched_tokens

    @property
    def is_empty(self) -> bool:
        return self.output.is_empty


def schedule(scheduler: Scheduler) -> Step:
    out = scheduler.schedule()
    requests = scheduler.requests  # every scheduled or preempted request is still there
    chunks = [
        Chunk(requests[d.request_id], d.num_computed_tokens, d.num_new_tokens)
        for d in out.scheduled
    ]
    return Step(out, chunks, [requests[i] for i in out.preempted_request_ids])


def update(scheduler: Scheduler, out: Step, model_output: ModelOutput) -> list[TokenOutput]:
    """``Scheduler.update``, then end each request whose token ends it, as ``Engine`` does."""
    outputs = scheduler.update(out.output, model_output)
    for o in outputs:
        if o.finish_reason is not None:
            scheduler.finish_request(o.request.request_id, o.finish_reason)
    return outputs


def fake_model_output(out: Step, eos_every: int = 0) -> ModelOutput:
    """One token for each chunk that reaches its request's last token, in chunk order."""
    request_ids: list[str] = []
    token_ids: list[int] = []
    for chunk in out.chunks:
        if chunk.samples:
            request = chunk.request
            request_ids.append(request.request_id)
            token_ids.append(
                fake_token(request.request_id, len(request.output_token_ids), eos_every)
            )
    return ModelOutput(request_ids, token_ids, logprobs=[-0.25] * len(token_ids))


def step(scheduler: Scheduler, eos_every: int = 0) -> tuple[Step, list[TokenOutput]]:
    out = schedule(scheduler)
    return out, update(scheduler, out, fake_model_output(out, eos_every))


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000) -> int:
    for num_steps in range(1, max_steps + 1):
        step(scheduler)
        if not scheduler.has_unfinished():
            return num_steps
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def expected_tokens(request: Request, eos_every: int = 0) -> list[int]:
    return [
        fake_token(request.request_id, i, eos_every) for i in range(len(request.output_token_ids))
    ]


def spans(out: Step) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks]


def check_kv(scheduler: Scheduler) -> None:
    """Blocks are held exactly by running requests (see ``check_invariants``); waiting and
    preempted requests hold none."""
    for request in scheduler.running:
        assert request.status is RequestStatus.RUNNING
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert request.block_ids == [] and request.num_computed_tokens == 0
    check_invariants(scheduler.kv_cache, list(scheduler.running))


def assert_plain(value: object) -> None:
    """Only ints, floats, strings, None, lists/tuples/dicts of them, frozen SamplingParams and
    the step-boundary dataclasses: nothing that ties the output to this process's objects."""
    if value is None or isinstance(value, (int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            assert_plain(item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            assert_plain(key)
            assert_plain(item)
        return
    if isinstance(value, SamplingParams):  # a frozen dataclass of such values
        return
    assert isinstance(value, (SchedulerOutput, NewRequestData, CachedRequestData)), value
    for f in dataclasses.fields(value):
        assert_plain(getattr(value, f.name))


class RunnerMirror:
    """What a runner holds, rebuilt from SchedulerOutputs (and its own sampled tokens) alone, as
    a runner in another process must: request id -> (token ids, block table)."""

    def __init__(self) -> None:
        self.requests: dict[str, tuple[list[int], list[int]]] = {}

    def apply(self, out: SchedulerOutput) -> None:
        for request_id in out.finished_request_ids:
            self.requests.pop(request_id, None)
        for request_id in out.preempted_request_ids:
            del self.requests[request_id]
        for cached in out.cached_requests:
            self.requests[cached.request_id][1].extend(cached.new_block_ids)
        for new in out.new_requests:
            assert new.request_id not in self.requests
            tokens = [*new.prompt_token_ids, *new.output_token_ids]
            self.requests[new.request_id] = (tokens, list(new.block_ids))

    def sampled(self, model_output: ModelOutput) -> None:
        for request_id, token_id in zip(
            model_output.request_ids, model_output.token_ids, strict=True
        ):
            self.requests[request_id][0].append(token_id)

    def check(self, out: Step) -> None:
        """Every scheduled request's tokens and block table agree with the scheduler's."""
        for chunk in out.chunks:
            r = chunk.request
            tokens, block_ids = self.requests[r.request_id]
            assert tokens == r.token_ids(0, r.num_tokens)
            assert block_ids == r.block_ids


def check_all_free(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache
    assert not scheduler.running and not scheduler.waiting and not scheduler.requests
    assert not scheduler.has_unfinished()
    assert kv.num_free_blocks == kv.num_blocks and kv.num_used_blocks == 0
    assert all(b.ref_count == 0 for b in kv.blocks)
    assert not kv._hashes and not kv._num_registered  # no per-request bookkeeping leaks
    assert not scheduler._num_block_ids_sent and not scheduler._in_flight


# --- token budget, chunked prefill -----------------------------------------------------------


def test_empty_schedule() -> None:
    scheduler = make_scheduler()
    out = schedule(scheduler)
    assert out.is_empty and out.num_batched_tokens == 0 and out.preempted == []
    assert update(scheduler, out, ModelOutput([], [])) == []


def test_long_prompt_is_chunked_and_samples_only_on_its_last_chunk() -> None:
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=16)
    r = make_request("long", 50, max_new_tokens=3)
    scheduler.add_request(r)
    starts = []
    for expected_start, expected_len in ((0, 16), (16, 16), (32, 16), (48, 2)):
        out, outputs = step(scheduler)
        assert spans(out) == [("long", expected_start, expected_len)]
        starts.append(expected_start)
        end = expected_start + expected_len
        assert r.num_computed_tokens == end
        assert len(r.block_ids) == math.ceil(end / 4)
        if end < 50:
            assert outputs == [] and r.output_token_ids == []
        else:
            assert [o.token_id for o in outputs] == [fake_token("long", 0)]
    # Then one decode token per step.
    out, _ = step(scheduler)
    assert spans(out) == [("long", 50, 1)] and out.chunks[0].request is r
    out, outputs = step(scheduler)
    assert spans(out) == [("long", 51, 1)]
    assert outputs[0].finish_reason is FinishReason.LENGTH
    assert r.output_token_ids == expected_tokens(r)
    assert r.status is RequestStatus.FINISHED
    check_all_free(scheduler)


def test_samples_flag_matches_chunk_end() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=5)
    r = make_request("r", 12)
    scheduler.add_request(r)
    out = schedule(scheduler)
    assert [c.samples for c in out.chunks] == [False]
    assert fake_model_output(out).request_ids == []
    update(scheduler, out, fake_model_output(out))
    out = schedule(scheduler)
    assert spans(out) == [("r", 5, 5)] and not out.chunks[0].samples
    update(scheduler, out, fake_model_output(out))
    out = schedule(scheduler)
    assert spans(out) == [("r", 10, 2)] and out.chunks[0].samples


def test_decodes_are_scheduled_before_new_prefills() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    a, b = make_request("a", 3), make_request("b", 3)
    scheduler.add_request(a)
    scheduler.add_request(b)
    out, _ = step(scheduler)
    assert spans(out) == [("a", 0, 3), ("b", 0, 3)]
    scheduler.add_request(make_request("c", 20))
    out, _ = step(scheduler)
    assert spans(out) == [("a", 3, 1), ("b", 3, 1), ("c", 0, 6)]
    out, _ = step(scheduler)
    assert spans(out) == [("a", 4, 1), ("b", 4, 1), ("c", 6, 6)]
    assert out.num_batched_tokens == 8


def test_older_prefill_is_continued_before_admitting_newer_requests() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=10)
    scheduler.add_request(make_request("a", 25))
    scheduler.add_request(make_request("b", 5))
    out, _ = step(scheduler)
    assert spans(out) == [("a", 0, 10)]
    out, _ = step(scheduler)
    assert spans(out) == [("a", 10, 10)]
    out, _ = step(scheduler)
    assert spans(out) == [("a", 20, 5), ("b", 0, 5)]


def test_token_budget_and_max_num_seqs_are_respected() -> None:
    scheduler = make_scheduler(num_blocks=200, max_num_seqs=3, max_num_batched_tokens=10)
    rng = random.Random(0)
    for i in range(12):
        scheduler.add_request(make_request(f"r{i}", rng.randint(1, 30), rng.randint(1, 6)))
    for _ in range(500):
        out, _ = step(scheduler)
        assert out.num_batched_tokens <= 10
        assert len(scheduler.running) <= 3 and len(out.chunks) <= 3
        assert all(c.num_new_tokens >= 1 for c in out.chunks)
        if not scheduler.has_unfinished():
            break
    check_all_free(scheduler)


def test_admission_stops_at_max_num_seqs_and_resumes_when_one_finishes() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for rid, n in (("a", 1), ("b", 3), ("c", 1)):
        scheduler.add_request(make_request(rid, 2, max_new_tokens=n))
    out, _ = step(scheduler)  # a finishes on its first token
    assert [c.request.request_id for c in out.chunks] == ["a", "b"]
    out, _ = step(scheduler)
    assert spans(out) == [("b", 2, 1), ("c", 0, 2)]


# --- prefix caching through the scheduler ----------------------------------------------------


def test_admission_reuses_the_cached_prefix() -> None:
    scheduler = make_scheduler(block_size=4)
    kv = scheduler.kv_cache
    a = make_request("a", 20, max_new_tokens=1)
    scheduler.add_request(a)
    out = schedule(scheduler)
    a_blocks = list(a.block_ids)
    update(scheduler, out, fake_model_output(out))
    assert a.is_finished and a.block_ids == []  # freed, but its full blocks stay cached
    assert kv.num_cached_blocks == 5

    b = make_request("b", [*a.prompt_token_ids[:16], 7, 8, 9])
    same = make_request("same", a.prompt_token_ids)
    scheduler.add_request(b)
    scheduler.add_request(same)
    out = schedule(scheduler)
    # b reuses 4 blocks; the identical prompt reuses 4 of its 5 blocks (its last token's
    # logits are needed) and shares them with b.
    assert spans(out) == [("b", 16, 3), ("same", 16, 4)]
    assert (b.num_cached_tokens, same.num_cached_tokens) == (16, 16)
    assert b.block_ids[:4] == same.block_ids[:4] == a_blocks[:4]
    assert all(kv.blocks[i].ref_count == 2 for i in b.block_ids[:4])
    check_kv(scheduler)
    update(scheduler, out, fake_model_output(out))
    assert (kv.prefix_queries, kv.prefix_hits) == (20 + 19 + 20, 32)
    run_to_completion(scheduler)
    check_all_free(scheduler)


# --- preemption ------------------------------------------------------------------------------


def test_newest_running_request_is_preempted_and_later_finishes() -> None:
    # 6 blocks of 2 tokens; three prompts of 4 tokens fill them; the oldest needs a new block.
    scheduler = make_scheduler(num_blocks=6, block_size=2)
    a, b, c = (make_request(rid, 4, max_new_tokens=6) for rid in "abc")
    for r in (a, b, c):
        scheduler.add_request(r)
    out, _ = step(scheduler)
    assert len(out.chunks) == 3 and scheduler.kv_cache.num_free_blocks == 0
    d = make_request("d", 1, max_new_tokens=1)
    scheduler.add_request(d)

    out = schedule(scheduler)
    assert out.preempted == [c]  # the newest, not b
    assert spans(out) == [("a", 4, 1), ("b", 4, 1)]  # no admission in a preempting step
    assert c.status is RequestStatus.PREEMPTED
    assert c.block_ids == [] and c.num_computed_tokens == 0
    assert c.output_token_ids == [fake_token("c", 0)]  # output so far is kept
    assert list(scheduler.waiting) == [c, d]  # at the front, ahead of newer arrivals
    assert (c.num_preemptions, scheduler.num_preemptions) == (1, 1)
    check_kv(scheduler)
    update(scheduler, out, fake_model_output(out))

    # c resumes: it recomputes prompt + output (from its cached prefix, if still cached) in
    # one chunk that samples, and finishes with the tokens it would have produced anyway.
    resumed = None
    for _ in range(100):
        out = schedule(scheduler)
        for chunk in out.chunks:
            if chunk.request is c and resumed is None:
                resumed = chunk
                assert chunk.start == c.num_cached_tokens and chunk.start % 2 == 0
                assert chunk.start + chunk.num_new_tokens == 5 and chunk.samples
        check_kv(scheduler)
        update(scheduler, out, fake_model_output(out))
        if not scheduler.has_unfinished():
            break
    assert resumed is not None
    for r in (a, b, c, d):
        assert r.finish_reason is FinishReason.LENGTH
        assert r.output_token_ids == expected_tokens(r)
    assert len(c.output_token_ids) == 6
    check_all_free(scheduler)


def test_a_request_preempts_itself_when_it_is_the_newest() -> None:
    scheduler = make_scheduler(num_blocks=5, block_size=2)
    a, b = make_request("a", 4, max_new_tokens=4), make_request("b", 4, max_new_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    out = schedule(scheduler)  # a takes the last free block; b needs one too
    assert out.preempted == [b] and spans(out) == [("a", 4, 1)]
    assert scheduler.running == [a] and list(scheduler.waiting) == [b]
    check_kv(scheduler)
    update(scheduler, out, fake_model_output(out))
    run_to_completion(scheduler)
    assert b.output_token_ids == expected_tokens(b) and len(b.output_token_ids) == 4
    check_all_free(scheduler)


def test_several_preemptions_keep_arrival_order_in_the_waiting_queue() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=1, max_num_batched_tokens=100)
    reqs = [make_request(f"r{i}", 2, max_new_tokens=6) for i in range(4)]
    for r in reqs:
        scheduler.add_request(r)
    step(scheduler)  # 4 x 2 blocks: full
    # Each decode needs one block: r0's forces out r3 (freeing 2), r1 takes the other, r2
    # finds none and preempts itself. They must wait in arrival order: r2, then r3.
    out = schedule(scheduler)
    assert out.preempted == [reqs[3], reqs[2]]
    assert list(scheduler.waiting) == [reqs[2], reqs[3]]
    assert spans(out) == [("r0", 2, 1), ("r1", 2, 1)]
    check_kv(scheduler)
    update(scheduler, out, fake_model_output(out))
    run_to_completion(scheduler)
    for r in reqs:
        assert r.output_token_ids == expected_tokens(r) and len(r.output_token_ids) == 6
    check_all_free(scheduler)


def test_preempted_request_recomputes_from_scratch_without_prefix_caching() -> None:
    scheduler = make_scheduler(num_blocks=5, block_size=2, enable_prefix_caching=False)
    a, b = make_request("a", 4, max_new_tokens=4), make_request("b", 4, max_new_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    out, _ = step(scheduler)
    assert out.preempted == [b]
    while True:
        out, _ = step(scheduler)
        chunk = next((c for c in out.chunks if c.request is b), None)
        if chunk is not None:
            assert (chunk.start, chunk.num_new_tokens) == (0, 5)  # prompt + 1 output
            assert len(b.output_token_ids) == 2  # it sampled
            break
    run_to_completion(scheduler)
    assert b.output_token_ids == expected_tokens(b)
    check_all_free(scheduler)


# --- finishing -------------------------------------------------------------------------------


def test_eos_and_length_finish_and_free() -> None:
    scheduler = make_scheduler()
    eos_every = 3
    reqs = [make_request(f"r{i}", 5, max_new_tokens=10) for i in range(20)]
    short = make_request("short", 5, max_new_tokens=100, max_model_len=7)
    for r in [*reqs, short]:
        scheduler.add_request(r)
    seen: list[TokenOutput] = []
    while scheduler.has_unfinished():
        _, outputs = step(scheduler, eos_every)
        seen.extend(outputs)
    for r in reqs:
        assert r.output_token_ids == expected_tokens(r, eos_every)
        if r.output_token_ids[-1] == EOS:
            assert r.finish_reason is FinishReason.EOS_TOKEN
            assert EOS not in r.output_token_ids[:-1]
        else:
            assert r.finish_reason is FinishReason.LENGTH and len(r.output_token_ids) == 10
    assert any(r.finish_reason is FinishReason.EOS_TOKEN for r in reqs)
    assert short.num_tokens == 7
    assert short.finish_reason in (FinishReason.LENGTH, FinishReason.EOS_TOKEN)
    finals = [o for o in seen if o.finish_reason is not None]
    assert len(finals) == len(reqs) + 1
    assert all(o.logprob == -0.25 and o.top_logprobs == [] for o in seen)
    check_all_free(scheduler)


def test_abort_waiting_running_and_preempted_requests_frees_everything() -> None:
    scheduler = make_scheduler(num_blocks=6, block_size=2)
    a, b, c = (make_request(rid, 4, max_new_tokens=10) for rid in "abc")
    d = make_request("d", 3)
    for r in (a, b, c, d):
        scheduler.add_request(r)
    step(scheduler)
    out, _ = step(scheduler)
    assert out.preempted == [c]
    assert c.status is RequestStatus.PREEMPTED

    for r in (c, d, b):  # preempted, waiting (never admitted), running
        assert scheduler.finish_request(r.request_id, FinishReason.ABORT) is r
        assert r.status is RequestStatus.FINISHED and r.finish_reason is FinishReason.ABORT
        assert r.block_ids == []
        assert r not in scheduler.running and r not in scheduler.waiting
        check_kv(scheduler)
    assert scheduler.finish_request("b", FinishReason.ABORT) is None  # already gone
    assert scheduler.finish_request("nope", FinishReason.ABORT) is None
    assert scheduler.running == [a] and not scheduler.waiting
    # a holds only its own blocks now; aborting it too leaves the cache empty.
    assert scheduler.finish_request("a", FinishReason.ABORT) is a
    check_all_free(scheduler)


def test_request_aborted_between_schedule_and_update_is_skipped() -> None:
    scheduler = make_scheduler(block_size=2)
    a, b = make_request("a", 9), make_request("b", 9)
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = schedule(scheduler)
    model_output = fake_model_output(out)  # the runner computed both
    assert model_output.request_ids == ["a", "b"]
    scheduler.finish_request("a", FinishReason.ABORT)
    outputs = update(scheduler, out, model_output)
    assert [o.request for o in outputs] == [b]
    assert a.output_token_ids == [] and a.block_ids == []
    assert b.output_token_ids == [fake_token("b", 0)]
    check_kv(scheduler)
    run_to_completion(scheduler)
    check_all_free(scheduler)


def test_update_ignores_a_new_request_reusing_an_aborted_id() -> None:
    scheduler = make_scheduler(block_size=2)
    old = make_request("x", 9)
    scheduler.add_request(old)
    out = schedule(scheduler)
    model_output = fake_model_output(out)
    scheduler.finish_request("x", FinishReason.ABORT)
    new = make_request("x", [5, 6, 7])
    scheduler.add_request(new)  # the id is free again
    assert update(scheduler, out, model_output) == []
    assert new.output_token_ids == [] and new.num_computed_tokens == 0
    assert list(scheduler.waiting) == [new]
    check_kv(scheduler)
    run_to_completion(scheduler)
    assert new.output_token_ids == expected_tokens(new)
    check_all_free(scheduler)


# --- the plain-data output: each request whole once, then per-step diffs ---------------------


def test_a_request_is_sent_whole_once_then_as_diffs() -> None:
    scheduler = make_scheduler(block_size=4)
    r = make_request("r", 10, max_new_tokens=8)
    scheduler.add_request(r)
    out = scheduler.schedule()
    assert out.cached_requests == [] and out.finished_request_ids == []
    assert out.new_requests == [
        NewRequestData("r", r.prompt_token_ids, [], r.params, r.block_ids, 0, 10)
    ]
    assert len(r.block_ids) == 3
    scheduler.update(out, ModelOutput(["r"], [fake_token("r", 0)]))
    block_ids = list(r.block_ids)
    for i in range(1, 5):  # tokens 11..14: a fourth block once the 13th token is computed
        out = scheduler.schedule()
        assert out.new_requests == []
        (cached,) = out.cached_requests
        assert (cached.num_computed_tokens, cached.num_new_tokens) == (9 + i, 1)
        block_ids += cached.new_block_ids
        assert block_ids == r.block_ids
        assert cached.new_block_ids == ([r.block_ids[3]] if i == 3 else [])
        scheduler.update(out, ModelOutput(["r"], [fake_token("r", i)]))


def test_a_preempted_request_is_sent_whole_again_with_its_output() -> None:
    scheduler = make_scheduler(num_blocks=5, block_size=2)
    a, b = make_request("a", 4, max_new_tokens=4), make_request("b", 4, max_new_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    out = schedule(scheduler)
    assert out.output.preempted_request_ids == ["b"] and spans(out) == [("a", 4, 1)]
    while True:
        update(scheduler, out, fake_model_output(out))
        out = schedule(scheduler)
        back = [d for d in out.output.new_requests if d.request_id == "b"]
        if back:
            break
        assert not out.output.new_requests and spans(out)[0][0] == "a"
    (data,) = back
    assert data.prompt_token_ids == b.prompt_token_ids
    assert data.output_token_ids == b.output_token_ids == [fake_token("b", 0)]
    assert data.block_ids == b.block_ids and data.num_computed_tokens == b.num_computed_tokens


def test_finished_ids_reach_the_runner_with_the_next_output() -> None:
    scheduler = make_scheduler()
    a, b = make_request("a", 3, max_new_tokens=1), make_request("b", 3)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)  # a finishes on its first token
    out = scheduler.schedule()
    assert out.finished_request_ids == ["a"] and [d.request_id for d in out.scheduled] == ["b"]
    scheduler.update(out, ModelOutput([], []))
    # Aborted while nothing runs: the id waits for the next output, which also brings the new
    # request reusing it; a runner applies finished ids first, so the two are not confused.
    scheduler.finish_request("b", FinishReason.ABORT)
    assert not scheduler.has_unfinished()
    again = make_request("b", [4, 5])
    scheduler.add_request(again)
    out = scheduler.schedule()
    assert out.finished_request_ids == ["b"]
    assert [d.request_id for d in out.new_requests] == ["b"]
    assert out.new_requests[0].prompt_token_ids == [4, 5]
    # Nothing to compute but an id to drop: still an output for the executor.
    scheduler.finish_request("b", FinishReason.ABORT)
    out = scheduler.schedule()
    assert out.num_batched_tokens == 0 and out.finished_request_ids == ["b"]
    assert not out.is_empty
    assert scheduler.schedule().is_empty


def test_update_reports_the_finish_reason_and_the_caller_ends_the_request() -> None:
    scheduler = make_scheduler()
    r = make_request("r", 3, max_new_tokens=1)
    scheduler.add_request(r)
    out = scheduler.schedule()
    (o,) = scheduler.update(out, ModelOutput(["r"], [fake_token("r", 0)]))
    assert o.finish_reason is FinishReason.LENGTH
    assert r.status is RequestStatus.RUNNING and r.block_ids  # not ended yet: text comes first
    assert scheduler.finish_request("r", FinishReason.STOP_SEQUENCE) is r
    assert r.finish_reason is FinishReason.STOP_SEQUENCE
    check_all_free(scheduler)


def test_outputs_are_plain_data_that_pickle() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=2)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", 3 + i, max_new_tokens=5))
    num_preempted = 0
    while scheduler.has_unfinished():
        out, _ = step(scheduler)
        assert_plain(out.output)
        copy = pickle.loads(pickle.dumps(out.output))
        assert copy == out.output and copy is not out.output
        num_preempted += len(copy.preempted_request_ids)
    assert num_preempted > 0


# --- queue bound, ids ------------------------------------------------------------------------


def test_scheduler_queues_without_bound() -> None:
    # Back-pressure is the AsyncEngine's (online submission); a scheduler queues whatever the
    # engine hands it, so LLM.generate can run a batch larger than the server's queue bound.
    scheduler = make_scheduler(max_waiting_requests=2)
    for i in range(3000):
        scheduler.add_request(make_request(f"r{i}", 1))
    assert len(scheduler.waiting) == 3000
    run_to_completion(scheduler)
    check_all_free(scheduler)


def test_duplicate_request_ids_are_rejected() -> None:
    scheduler = make_scheduler()
    a = make_request("a", 3, max_new_tokens=2)
    scheduler.add_request(a)
    with pytest.raises(KilnError, match="already in use"):
        scheduler.add_request(make_request("a", 5))
    step(scheduler)  # running now
    with pytest.raises(KilnError, match="already in use"):
        scheduler.add_request(make_request("a", 5))
    assert list(scheduler.requests.values()) == [a] and not scheduler.waiting
    step(scheduler)
    assert a.is_finished
    scheduler.add_request(make_request("a", 5))  # finished ids may be reused


# --- randomized simulation -------------------------------------------------------------------


SIM_CASES = [
    # seed, num_requests, block_size, max_num_batched_tokens, max_num_seqs, prefix caching
    (0, 300, 4, 32, 8, True),
    (1, 300, 2, 16, 16, True),
    (2, 200, 1, 7, 4, True),
    (3, 300, 8, 64, 32, True),
    (4, 250, 4, 24, 6, False),
    (5, 200, 16, 48, 12, True),
]


@pytest.mark.parametrize(
    ("seed", "num_requests", "block_size", "budget", "max_num_seqs", "prefix"), SIM_CASES
)
def test_random_workload_invariants_fairness_and_cleanup(
    seed: int, num_requests: int, block_size: int, budget: int, max_num_seqs: int, prefix: bool
) -> None:
    rng = random.Random(seed)
    eos_every = rng.choice([0, 9, 25])
    shared_prefixes = [[rng.randint(1, 4) for _ in range(rng.randint(0, 24))] for _ in range(4)]
    pending: list[Request] = []
    for i in range(num_requests):
        head = rng.choice(shared_prefixes) if rng.random() < 0.6 else []
        tail = [rng.randint(1, 50) for _ in range(rng.randint(1, 30))]
        pending.append(make_request(f"q{i}", head + tail, max_new_tokens=rng.randint(1, 24)))
    largest = max(r.num_prompt_tokens + r.params.max_new_tokens for r in pending)
    # A tiny cache: the largest request just fits alone (as Engine.check_fits guarantees).
    num_blocks = -(-largest // block_size) + rng.randint(0, 4)
    scheduler = make_scheduler(
        num_blocks,
        block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        enable_prefix_caching=prefix,
    )
    kv = scheduler.kv_cache
    arrival: dict[int, int] = {}  # id(request) -> admission order into the queue
    oldest_since: dict[int, int] = {}  # id(request) -> step it became the oldest unfinished
    aborted: list[Request] = []
    finished: list[Request] = []
    num_steps = 0
    mirror = RunnerMirror()

    def abort_random() -> None:
        request = rng.choice(list(scheduler.requests.values()))
        assert scheduler.finish_request(request.request_id, FinishReason.ABORT) is request
        assert request.block_ids == [] and request.finish_reason is FinishReason.ABORT
        aborted.append(request)

    while pending or scheduler.has_unfinished():
        num_steps += 1
        assert num_steps < 50_000
        # Arrivals in bursts.
        for _ in range(rng.choice([0, 0, 1, 3])):
            if not pending:
                break
            scheduler.add_request(pending[0])
            arrival[id(pending.pop(0))] = len(arrival)
        if scheduler.requests and rng.random() < 0.01:
            abort_random()
        if not scheduler.has_unfinished():
            continue

        unfinished = sorted(scheduler.requests.values(), key=lambda r: arrival[id(r)])
        oldest = unfinished[0]
        oldest_since.setdefault(id(oldest), num_steps)
        running_before = list(scheduler.running)
        computed_before = {id(r): r.num_computed_tokens for r in running_before}

        out = schedule(scheduler)
        # A runner rebuilds every scheduled request from (a pickled copy of) the output alone.
        mirror.apply(pickle.loads(pickle.dumps(out.output)))
        mirror.check(out)
        assert set(mirror.requests) <= set(scheduler.requests)

        # Budget and limits.
        assert 1 <= out.num_batched_tokens <= budget
        assert len(scheduler.running) <= max_num_seqs
        assert len({id(c.request) for c in out.chunks}) == len(out.chunks)
        # The oldest unfinished request is never preempted and always makes progress.
        assert out.chunks[0].request is oldest and oldest not in out.preempted
        # Running requests first, in order; then admissions, first come first served.
        num_old = sum(1 for c in out.chunks if id(c.request) in computed_before)
        assert [c.request for c in out.chunks[:num_old]] == running_before[:num_old]
        admitted = [c.request for c in out.chunks[num_old:]]
        assert all(id(r) not in computed_before for r in admitted)
        if out.preempted:
            assert not admitted  # no admission in a step that preempted
            kept = len(scheduler.running)
            assert scheduler.running == running_before[:kept]
            assert out.preempted == running_before[kept:][::-1]  # newest first
            assert list(scheduler.waiting)[: len(out.preempted)] == out.preempted[::-1]
            for r in out.preempted:
                assert r.status is RequestStatus.PREEMPTED
                assert r.block_ids == [] and r.num_computed_tokens == 0
        for chunk in out.chunks:
            r = chunk.request
            assert chunk.num_new_tokens >= 1
            assert chunk.start + chunk.num_new_tokens <= r.num_tokens
            assert chunk.samples == (chunk.start + chunk.num_new_tokens == r.num_tokens)
            if id(r) in computed_before:
                assert chunk.start == computed_before[id(r)]
            else:
                assert chunk.start == r.num_computed_tokens == r.num_cached_tokens
                assert chunk.start % block_size == 0 and chunk.start < r.num_tokens
                if not prefix:
                    assert chunk.start == 0
        # Blocks: exactly enough for what is computed or scheduled.
        scheduled_end = {id(c.request): c.start + c.num_new_tokens for c in out.chunks}
        for r in scheduler.running:
            end = scheduled_end.get(id(r), r.num_computed_tokens)
            assert len(r.block_ids) == kv.blocks_for(end)
        # FCFS: running then waiting is exactly the unfinished requests in arrival order.
        queue = scheduler.running + list(scheduler.waiting)
        assert queue == sorted(scheduler.requests.values(), key=lambda r: arrival[id(r)])
        check_kv(scheduler)

        model_output = fake_model_output(out, eos_every)
        mirror.sampled(model_output)
        if rng.random() < 0.02:  # aborted while the step runs
            abort_random()
        num_outputs_before = {id(c.request): len(c.request.output_token_ids) for c in out.chunks}
        outputs = update(scheduler, out, model_output)

        live_sampling = [
            c.request
            for c in out.chunks
            if c.start + c.num_new_tokens
            == c.request.num_prompt_tokens + num_outputs_before[id(c.request)]
            and c.request.finish_reason is not FinishReason.ABORT
        ]
        assert [o.request for o in outputs] == live_sampling
        for chunk in out.chunks:
            r = chunk.request
            if r.finish_reason is FinishReason.ABORT:
                assert len(r.output_token_ids) == num_outputs_before[id(r)]
                continue
            assert r.num_computed_tokens == chunk.start + chunk.num_new_tokens or r.is_finished
            assert r.output_token_ids == expected_tokens(r, eos_every)
        for o in outputs:
            r = o.request
            if o.finish_reason is None:
                assert r.status is RequestStatus.RUNNING
                continue
            assert r.is_finished and r.block_ids == [] and r.request_id not in scheduler.requests
            if o.token_id == EOS:
                assert o.finish_reason is FinishReason.EOS_TOKEN
            else:
                assert o.finish_reason is FinishReason.LENGTH
                assert len(r.output_token_ids) == r.params.max_new_tokens
            finished.append(r)
            # Fairness bound: once it is the oldest, a request gets the whole budget each
            # step it needs it, so it finishes within its own (re)prefill + decode steps.
            if id(r) in oldest_since:
                total = r.num_prompt_tokens + r.params.max_new_tokens
                bound = math.ceil(total / budget) + r.params.max_new_tokens
                assert num_steps - oldest_since[id(r)] <= bound, r.request_id
        for r in scheduler.running:
            assert r.num_computed_tokens < r.num_tokens
            assert len(r.block_ids) == kv.blocks_for(r.num_computed_tokens)
        check_kv(scheduler)

    assert len(finished) + len(aborted) == num_requests
    assert {id(r) for r in finished}.isdisjoint(id(r) for r in aborted)
    assert all(r.status is RequestStatus.FINISHED for r in finished + aborted)
    assert scheduler.num_preemptions > 0  # the tiny cache did force preemptions
    if prefix:
        assert kv.prefix_hits > 0
    assert set(mirror.requests) <= set(scheduler._finished_ids)  # dropped with the next output
    check_all_free(scheduler)
