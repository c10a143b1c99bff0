"""Load shapes: closed-loop users, constant or Poisson arrivals, and sweeps of rising load that
stop by themselves at the knee.

Every run is bounded: it measures for ``duration`` seconds or ``num_requests`` requests, waits
at most ``drain_seconds`` for the requests still running, and gives up early when the server
stops answering (``max_consecutive_failures``). Warm-up requests (sent before the load, and
those started in the first ``warmup_seconds`` under it) are recorded with ``phase="warmup"``
and left out of every figure.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kiln.loadtest.clients import ApiClient
from kiln.loadtest.metrics import RequestRecord, Slo, summarize
from kiln.loadtest.workload import Workload

OnRecord = Callable[[RequestRecord], None]


@dataclass(frozen=True)
class LoadShape:
    """How requests arrive: ``users`` closed-loop clients (each sends its next request when
    its last one is answered, as Locust's users do) or ``rate`` requests per second."""

    users: int | None = None
    rate: float | None = None
    arrivals: str = "poisson"

    def describe(self) -> str:
        if self.users is not None:
            return f"{self.users} users"
        return f"{self.rate:g} req/s ({self.arrivals})"

    def as_dict(self) -> dict[str, Any]:
        return {"users": self.users, "rate": self.rate, "arrivals": self.arrivals}


@dataclass(frozen=True)
class RunLimits:
    """When one load level ends.

    Args:
        duration: seconds of measured load (after the warm-up).
        num_requests: measured requests to send (the level ends when all are answered).
        warmup_requests: requests sent one at a time before the load, not measured.
        warmup_seconds: seconds of load at the start whose requests are not measured.
        drain_seconds: how long to wait, once sending stops, for requests still running;
            those left are cancelled and reported as ``cancelled_at_end``.
        max_consecutive_failures: stop early after this many failures in a row (the server
            is down or refusing everything).
    """

    duration: float | None = 60.0
    num_requests: int | None = None
    warmup_requests: int = 1
    warmup_seconds: float = 0.0
    drain_seconds: float = 60.0
    max_consecutive_failures: int = 50


@dataclass
class Level:
    """One load level's records and figures (a run without a sweep has one)."""

    step: int
    shape: LoadShape
    records: list[RequestRecord]
    summary: dict[str, Any]
    stopped_early: str | None = None


@dataclass
class _State:
    """Shared by the tasks of one level."""

    origin: float
    warmup_end: float
    measure_end: float | None
    num_requests: int | None
    max_failures: int
    issued: int = 0
    consecutive_failures: int = 0
    abort: str | None = None
    records: list[RequestRecord] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def may_send(self) -> bool:
        if self.abort is not None:
            return False
        if self.measure_end is not None and self.now() >= self.measure_end:
            return False
        return not (self.num_requests is not None and self.issued >= self.num_requests)


class Runner:
    """Runs load levels against one client and workload.

    Args:
        client: the API client (it knows the server's URL).
        workload: what to send.
        limits: when each level ends.
        slo: goodput objectives.
        price_per_hour: the instance's price, for cost per 1M tokens.
        on_record: called with every finished record (the live progress line).
        seed: arrival-time seed (Poisson gaps).
    """

    def __init__(
        self,
        client: ApiClient,
        workload: Workload,
        limits: RunLimits,
        slo: Slo | None = None,
        price_per_hour: float | None = None,
        on_record: OnRecord | None = None,
        seed: int = 0,
    ) -> None:
        self.client, self.workload, self.limits = client, workload, limits
        self.slo, self.price_per_hour = slo, price_per_hour
        self.on_record = on_record or (lambda _: None)
        self.rng = random.Random(seed)
        self.origin = time.perf_counter()

    def _http(self) -> httpx.AsyncClient:
        # NOTE: no connection cap: a pool limit would queue requests inside the client and
        # show up as server latency. trust_env=False: never route a local test via a proxy.
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.client.request_timeout, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            trust_env=False,
        )

    async def run_level(self, shape: LoadShape, step: int = 0) -> Level:
        limits = self.limits
        async with self._http() as http:
            warm: list[RequestRecord] = []
            for _ in range(limits.warmup_requests):
                warm.append(await self._one(http, None, step, phase="warmup"))
            start = time.perf_counter() - self.origin
            measure_end = None
            if limits.duration is not None:
                measure_end = start + limits.warmup_seconds + limits.duration
            state = _State(
                self.origin,
                start + limits.warmup_seconds,
                measure_end,
                limits.num_requests,
                limits.max_consecutive_failures,
            )
            state.records.extend(warm)
            if shape.users is not None:
                tasks = [
                    asyncio.create_task(self._user(http, state, step)) for _ in range(shape.users)
                ]
                await self._drain(tasks, state)
            else:
                await self._arrivals(http, state, shape, step)
        summary = summarize(state.records, self.slo, self.price_per_hour)
        return Level(step, shape, state.records, summary, state.abort)

    async def _one(
        self, http: httpx.AsyncClient, state: _State | None, step: int, phase: str | None = None
    ) -> RequestRecord:
        prompt = self.workload.next_prompt()
        sent_at = time.perf_counter() - self.origin
        try:
            record = await self.client.send(http, prompt, self.origin)
        except asyncio.CancelledError:
            # The level ended while it ran: keep it as a record (the drain cancelled it).
            record = RequestRecord(start=sent_at, error="cancelled_at_end", turn=prompt.turn)
        self.workload.finished(prompt, record.text if record.ok else None)
        record.step = step
        record.phase = phase or (
            "warmup" if state and record.start < state.warmup_end else "measure"
        )
        if state is not None:
            state.records.append(record)
            state.consecutive_failures = 0 if record.ok else state.consecutive_failures + 1
            if state.consecutive_failures >= state.max_failures and state.abort is None:
                state.abort = (
                    f"stopped early: {state.consecutive_failures} requests failed in a row "
                    f"(last: {record.error}: {record.error_detail})"
                )
        self.on_record(record)
        return record

    def _count_issue(self, state: _State) -> None:
        if state.now() >= state.warmup_end:
            state.issued += 1

    async def _user(self, http: httpx.AsyncClient, state: _State, step: int) -> None:
        while state.may_send():
            self._count_issue(state)
            record = await self._one(http, state, step)
            if record.error == "cancelled_at_end":
                return
            if record.error in ("connect", "disconnected"):
                # A refused connection fails at once: pause so a dead server is not hammered
                # in a tight loop (the run still ends at its limits or the failure cap).
                await asyncio.sleep(0.05)

    async def _arrivals(
        self, http: httpx.AsyncClient, state: _State, shape: LoadShape, step: int
    ) -> None:
        assert shape.rate is not None and shape.rate > 0
        tasks: list[asyncio.Task[RequestRecord]] = []
        next_at = state.now()
        while state.may_send():
            self._count_issue(state)
            tasks.append(asyncio.create_task(self._one(http, state, step)))
            gap = (
                self.rng.expovariate(shape.rate) if shape.arrivals == "poisson" else 1 / shape.rate
            )
            next_at += gap
            # Sleep in short slices so an abort (server down) is seen promptly.
            while state.may_send() and state.now() < next_at:
                await asyncio.sleep(min(0.25, max(0.0, next_at - state.now())))
        await self._drain(tasks, state)

    async def _drain(self, tasks: Sequence[asyncio.Task[Any]], state: _State) -> None:
        """Wait for the requests still running, then cancel what is left."""
        if not tasks:
            return
        deadline = None
        while True:
            pending = [t for t in tasks if not t.done()]
            if not pending:
                break
            if deadline is None and not state.may_send():
                deadline = time.perf_counter() + self.limits.drain_seconds
            timeout = 0.25 if deadline is None else max(0.0, deadline - time.perf_counter())
            if deadline is not None and timeout == 0.0:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                break
            await asyncio.wait(pending, timeout=min(timeout, 0.25))
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


@dataclass(frozen=True)
class SweepRule:
    """A sweep raises the load step by step and stops at the knee.

    Args:
        factor: each step's load is the previous one's times this.
        max_steps: the most steps, knee or not.
        max_error_rate: stop after a step with more failed requests than this fraction.
        latency_factor: stop after a step whose median TTFT is more than this many times the
            first step's.
        min_gain: stop after a step whose output tokens/s grew by less than this fraction
            over the previous step's (the server is saturated).
    """

    factor: float = 2.0
    max_steps: int = 8
    max_error_rate: float = 0.05
    latency_factor: float = 4.0
    min_gain: float = 0.1

    def knee(self, levels: Sequence[Level]) -> str | None:
        """Why to stop after the last level, or None to go on."""
        last = levels[-1].summary
        if last["error_rate"] > self.max_error_rate:
            return f"error-rate knee: {last['error_rate']:.0%} of requests failed"
        if levels[-1].stopped_early:
            return levels[-1].stopped_early
        if len(levels) >= 2:
            first_ttft = levels[0].summary["median_ttft_ms"]
            ttft = last["median_ttft_ms"]
            if not math.isnan(first_ttft) and ttft > self.latency_factor * first_ttft:
                return (
                    f"latency knee: median TTFT {ttft:.0f} ms, over {self.latency_factor:g}x "
                    f"the first step's {first_ttft:.0f} ms"
                )
            before = levels[-2].summary["output_throughput"]
            now = last["output_throughput"]
            if before > 0 and now < before * (1 + self.min_gain):
                return (
                    f"throughput knee: {now:.1f} output tokens/s, under {self.min_gain:.0%} more "
                    f"than the previous step's {before:.1f}"
                )
        if len(levels) >= self.max_steps:
            return f"reached --sweep-max-steps ({self.max_steps})"
        return None

    def next_shape(self, shape: LoadShape) -> LoadShape:
        if shape.users is not None:
            return LoadShape(users=max(shape.users + 1, round(shape.users * self.factor)))
        assert shape.rate is not None
        return LoadShape(rate=shape.rate * self.factor, arrivals=shape.arrivals)


async def run_sweep(
    runner: Runner, first: LoadShape, rule: SweepRule, on_level: Callable[[Level], None]
) -> tuple[list[Level], str]:
    """Levels of rising load from ``first`` until ``rule`` finds the knee; returns them and
    why the sweep stopped."""
    levels: list[Level] = []
    shape = first
    while True:
        levels.append(await runner.run_level(shape, step=len(levels)))
        on_level(levels[-1])
        reason = rule.knee(levels)
        if reason is not None:
            return levels, reason
        shape = rule.next_shape(shape)
