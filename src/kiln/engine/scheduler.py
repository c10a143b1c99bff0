"""Scheduler: decides what each step computes under a token budget, with no prefill phase.

Every request has ``num_computed_tokens``; a step gives running requests (oldest first) what
they still need — one token for a decode, a chunk for a prompt — until ``max_num_batched_tokens``
is spent, then admits waiting requests (first come, first served) while blocks and the budget
allow. When the KV cache is full, the newest running request is preempted: its blocks are freed
and it is recomputed later (its output so far is kept), so memory never runs out under load.
"""

from __future__ import annotations

import time
from collections import deque

from kiln.config import SchedulerConfig
from kiln.engine.io import ModelOutput, ScheduledChunk, SchedulerOutput, TokenOutput
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

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise KilnError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
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
                chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request preempted itself: nothing more fits
        if not preempted:
            self._admit(budget, chunks)
        return SchedulerOutput(chunks=chunks, preempted=preempted)

    def _admit(self, budget: int, chunks: list[ScheduledChunk]) -> None:
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
            chunks.append(ScheduledChunk(request, num_cached, num_new))
            budget -= num_new

    def update(
        self, scheduler_output: SchedulerOutput, model_output: ModelOutput
    ) -> list[TokenOutput]:
        """Apply a step's results: advance computed tokens, append sampled tokens, finish and
        free requests that are done.

        NOTE: a request finished (aborted) between schedule() and update() is skipped: its
        blocks are already freed, so its chunk must not register them, and its token must not
        go to a new request that took its id meanwhile — hence the lookup in this step's chunks.
        """
        scheduled: dict[str, Request] = {}
        for chunk in scheduler_output.chunks:
            request = chunk.request
            if request.is_finished:
                continue
            request.num_computed_tokens = chunk.start + chunk.num_new_tokens
            self.kv_cache.cache_full_blocks(request)
            scheduled[request.request_id] = request
        outputs: list[TokenOutput] = []
        now = time.monotonic()
        for i, request_id in enumerate(model_output.request_ids):
            request = scheduled.get(request_id)
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
            if finish_reason is not None:
                self.finish_request(request_id, finish_reason)
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
        return request

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
