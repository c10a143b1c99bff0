"""One API request on the engine: its seat, its choices, its metrics and how it ends.

A request holds one of the server's seats (``state.admit()``) for its whole life, a stream
included, and is served by the model that was active when it was admitted. Its choices (``n``,
times the prompts of a text completion) run as independent engine requests, started together:
each is awaited up to its first output before any byte is sent, so what the engine refuses up
front (context, queue full, engine down) is an HTTP error and not a broken stream. A client
that goes away, before or during the answer, aborts every choice still running, which frees
its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from kiln.engine.outputs import RequestOutput
from kiln.errors import InvalidRequestError, KilnError
from kiln.sampling import SamplingParams
from kiln.server.errors import ClientDisconnectedError, failure_type
from kiln.server.openai.schemas import Usage
from kiln.server.sse import SSE_HEADERS, sse_event
from kiln.server.state import ServerState

T = TypeVar("T")


@dataclass
class Choice:
    """One engine request: a choice of the response."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    finished: bool = False
    num_output_tokens: int = 0


async def _until_disconnected(request: Request) -> None:
    # NOTE: the body has been read, so the next ASGI message is the disconnect (or nothing).
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Run:
    """An API request's lifecycle; its seat is released and its metrics recorded exactly once."""

    def __init__(self, state: ServerState, request: Request) -> None:
        self.state = state
        self.request = request
        self.choices: list[Choice] = []
        self.started_at = time.monotonic()
        self.first_output_at: float | None = None
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._seat = contextlib.ExitStack()
        self._done = False

    # --- seat and metrics -----------------------------------------------------------------

    async def admit(self) -> ServerState:
        """Take a seat (``OverloadedError``, 429, when all are taken) and pin the active model
        (503 when a model switch takes too long): answers the state to serve with."""
        self.state.metrics.record_start()
        try:
            self.state = self._seat.enter_context(await self.state.admit())
        except BaseException as e:
            self.fail(e)
            raise
        return self.state

    @contextlib.contextmanager
    def failures_recorded(self) -> Iterator[None]:
        try:
            yield
        except BaseException as e:
            self.fail(e)
            raise

    def succeed(self) -> None:
        if self._done:
            return
        self._done = True
        self._seat.close()
        now = time.monotonic()
        # NOTE: "queue" is the time to the first output here (queue and prefill), so that the
        # mean time per token that TGI's dashboards derive from it is the decode time alone.
        first = self.first_output_at or now
        self.state.metrics.record_success(
            now - self.started_at,
            first - self.started_at,
            self.num_prompt_tokens,
            self.num_output_tokens,
        )

    def fail(self, error: BaseException) -> None:
        if self._done:
            return
        self._done = True
        self.close()
        self._seat.close()
        self.state.metrics.record_failure(failure_type(error, client_gone="aborted"))

    # --- choices --------------------------------------------------------------------------

    async def start(self, choices: list[Choice]) -> None:
        """Submit every choice and wait for each one's first output (or its refusal)."""
        self.choices = choices
        loop = asyncio.get_running_loop()
        started = [loop.create_future() for _ in choices]
        for future in started:  # refusals after the first are answered by the first alone
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._tasks = [
            asyncio.create_task(self._pump(choice, future))
            for choice, future in zip(choices, started, strict=True)
        ]
        try:
            await self.unless_disconnected(asyncio.gather(*started))
        except BaseException:
            self.close()
            raise
        self.first_output_at = time.monotonic()

    async def _pump(self, choice: Choice, started: asyncio.Future[None]) -> None:
        generate = self.state.engine.generate(choice.prompt_ids, choice.params, choice.request_id)
        try:
            async for output in generate:
                if not started.done():
                    started.set_result(None)
                self._queue.put_nowait((choice.index, output))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if started.done():
                self._queue.put_nowait((choice.index, e))
            else:
                started.set_exception(e)
            return
        if not started.done():  # cannot happen: the engine always ends on a finished output
            started.set_exception(KilnError("the engine ended a request without output"))
        self._queue.put_nowait((choice.index, None))

    async def outputs(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Each choice's outputs as they come, until every choice has finished."""
        by_index = {choice.index: choice for choice in self.choices}
        remaining = len(self.choices)
        while remaining:
            index, item = await self._queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            choice = by_index[index]
            choice.num_output_tokens = item.num_output_tokens
            choice.finished = item.finished
            yield choice, item

    def close(self) -> None:
        """Abort what still runs (synchronous, so it is safe in a cancelled context)."""
        for task in self._tasks:
            task.cancel()
        for choice in self.choices:
            if not choice.finished:
                self.state.engine.abort(choice.request_id)

    @property
    def num_prompt_tokens(self) -> int:
        # A prompt is counted once, however many choices share it.
        unique = {id(c.prompt_ids): len(c.prompt_ids) for c in self.choices}
        return sum(unique.values())

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices)

    def usage(self) -> Usage:
        prompt, completion = self.num_prompt_tokens, self.num_output_tokens
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    # --- how it ends ----------------------------------------------------------------------

    async def unless_disconnected(self, work: Awaitable[T]) -> T:
        """Await ``work``; raise :class:`ClientDisconnectedError` (cancelling it) if the client
        leaves first."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_until_disconnected(self.request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and watch.exception() is None:
                raise ClientDisconnectedError
            return await task
        finally:
            watch.cancel()
            task.cancel()
            # NOTE: a gather cancelled here (the request itself was cancelled) ends with an
            # exception nobody awaits: retrieved, so asyncio does not log it as lost.
            task.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def answer(self, work: Awaitable[T]) -> T:
        """The non-streaming answer: ``work`` (which reads :meth:`outputs`) to its end."""
        try:
            result = await self.unless_disconnected(work)
        finally:
            self.close()
        self.succeed()
        return result

    def stream(self, events: AsyncIterator[str]) -> StreamingResponse:
        """The streaming answer: ``events`` as SSE, then ``data: [DONE]``."""
        return StreamingResponse(
            self._framed(events), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def _framed(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
            yield sse_event("[DONE]")
            self.succeed()
        except Exception as e:  # the engine failed mid-stream: too late for an HTTP status
            self.fail(e)
            yield _error_event(e)
            yield sse_event("[DONE]")
        finally:
            # NOTE: a client that goes away cancels this generator or closes it at a yield;
            # either way its choices are aborted here, and their blocks freed.
            self.fail(ClientDisconnectedError())  # a no-op unless the stream ended early


def _error_event(error: BaseException) -> str:
    invalid = isinstance(error, InvalidRequestError)
    return sse_event(
        {
            "error": {
                "message": str(error) or type(error).__name__,
                "type": "invalid_request_error" if invalid else "server_error",
                "param": None,
                "code": 400 if invalid else 503,
            }
        }
    )
