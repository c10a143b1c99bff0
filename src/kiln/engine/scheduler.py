"""Scheduler: decides what each step computes under a token budget, with no prefill phase.

Every request has ``num_computed_tokens``; a step gives running requests (oldest first) what
they still need — one token for a decode, a chunk for a prompt — until ``max_num_batched_tokens``
is spent, then admits waiting requests (first come, first served) while blocks and the budget
allow. When the KV cache is full, the newest running request is preempted: its blocks are freed
and it is recomputed later (its output so far is kept), so memory never runs out under load.

The scheduler owns the :class:`Request` objects; what it hands the executor is plain data
(:class:`SchedulerOutput`): a request's prompt and params once, then per-step diffs.
"""

from __future__ import annotations

import time
from collections import deque

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
from kiln.errors import KilnError


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # What the runner holds, so each step sends it only the difference: request id -> how
        # many of the request's block ids it was sent. Absent: the runner does not hold the
        # request (never scheduled, or preempted since), so it is sent whole.
        self._num_block_ids_sent: dict[str, int] = {}
        self._finished_ids: list[str] = []  # finished since the last output: runners drop them
        # The requests of the output in flight, by id: update() applies results to these very
        # objects (see its NOTE).
        self._in_flight: dict[str, Request] = {}

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise KilnError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []  # (request, num_new_tokens) in batch order
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv_cache.allocate(request, num_new):
                victim = self.running.pop()  # newest first: FCFS keeps the oldest going
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request preempted itself: nothing more fits
        if not preempted:
            self._admit(budget, scheduled)
        return self._output(scheduled, preempted)

    def _admit(self, budget: int, scheduled: list[tuple[Request, int]]) -> None:
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate(request, num_new, cached):
                break  # FCFS: later requests wait behind this one
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = num_cached
            if request.scheduled_time is None:
                request.scheduled_time = now
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new

    def _output(
        self, scheduled: list[tuple[Request, int]], preempted: list[Request]
    ) -> SchedulerOutput:
        """The plain-data view of this step: each request whole the first time the runner sees
        it, afterwards only its new blocks."""
        cached: list[CachedRequestData] = []
        new: list[NewRequestData] = []
        for request, num_new in scheduled:
            num_sent = self._num_block_ids_sent.get(request.request_id)
            if num_sent is None:
                new.append(
                    NewRequestData(
                        request_id=request.request_id,
                        prompt_token_ids=list(request.prompt_token_ids),
                        output_token_ids=list(request.output_token_ids),
                        params=request.params,
                        block_ids=list(request.block_ids),
                        num_computed_tokens=request.num_computed_tokens,
                        num_new_tokens=num_new,
                    )
                )
            else:
                cached.append(
                    CachedRequestData(
                        request_id=request.request_id,
                        new_block_ids=request.block_ids[num_sent:],
                        num_computed_tokens=request.num_computed_tokens,
                        num_new_tokens=num_new,
                    )
                )
            self._num_block_ids_sent[request.request_id] = len(request.block_ids)
        finished, self._finished_ids = self._finished_ids, []
        self._in_flight = {request.request_id: request for request, _ in scheduled}
        return SchedulerOutput(
            cached_requests=cached,
            new_requests=new,
            finished_request_ids=finished,
            preempted_request_ids=[r.request_id for r in preempted],
        )

    def update(
        self, scheduler_output: SchedulerOutput, model_output: ModelOutput
    ) -> list[TokenOutput]:
        """Apply a step's results: advance computed tokens, register full blocks, append the
        sampled tokens. Each :class:`TokenOutput` says whether generation ends on its token (by
        token: EOS, stop token id, length); ending it is the caller's: :meth:`finish_request`,
        once any stop string in the text was looked for too.

        NOTE: a request finished (aborted) between schedule() and update() is skipped: its
        blocks are already freed, so its chunk must not register them, and its token must not
        go to a new request that took its id meanwhile — hence the lookup among this step's
        own Request objects rather than by id in ``self.requests``.
        """
        in_flight, self._in_flight = self._in_flight, {}
        for data in scheduler_output.scheduled:
            request = in_flight.get(data.request_id)
            if request is None or request.is_finished:
                continue
            request.num_computed_tokens = data.num_computed_tokens + data.num_new_tokens
            self.kv_cache.cache_full_blocks(request)
        outputs: list[TokenOutput] = []
        now = time.monotonic()
        for i, request_id in enumerate(model_output.request_ids):
            request = in_flight.get(request_id)
            if request is None or request.is_finished:
                continue  # aborted while the step ran
            token_id = model_output.token_ids[i]
            finish_reason = request.append_token(token_id)
            if request.first_token_time is None:
                request.first_token_time = now
            outputs.append(
                TokenOutput(
                    request=request,
                    token_id=token_id,
                    logprob=model_output.logprobs[i] if model_output.logprobs else None,
                    top_logprobs=model_output.top_logprobs[i] if model_output.top_logprobs else [],
                    finish_reason=finish_reason,
                )
            )
        return outputs

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a request now (done, stop string, abort): free its blocks and forget it."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        self.kv_cache.forget(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._num_block_ids_sent.pop(request_id, None)
        self._finished_ids.append(request_id)
        return request

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._num_block_ids_sent.pop(request.request_id, None)  # sent whole when it is back
