"""Generation: one API request's lifecycle, the same for every front end.

A request takes one of the server's seats and pins the active model (both held for its whole
life, a stream included), so it is served by the model that was active when it was admitted.
Its choices (``n``, times the prompts of a text completion) run as independent engine requests,
started together: each is awaited up to its first output before any byte is sent, so what the
engine refuses up front (context, queue full, engine down) is an error status and not a broken
stream. A client that goes away, before or during the answer, aborts every choice still
running, which frees its KV blocks at once. Success or failure is recorded in the metrics
exactly once.

Blocking preparation (tokenizing a long prompt, rendering a long chat) runs on a worker thread
through :meth:`Generation.off_loop`, never on the event loop that serves every other client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from kiln.config.server import ServerConfig
from kiln.engine.outputs import RequestOutput
from kiln.errors import (
    EngineFailureError,
    InvalidRequestError,
    KilnError,
    OverloadedError,
    UnavailableError,
)
from kiln.sampling import SamplingParams
from kiln.serving.limits import ContextWindow, Seats
from kiln.serving.metrics import RequestMetrics
from kiln.serving.models import ModelManager
from kiln.serving.served_model import ServedModel

T = TypeVar("T")
P = ParamSpec("P")


class ClientDisconnectedError(Exception):
    """The client closed its connection before its answer was complete."""


def failure_type(exc: BaseException, client_gone: str) -> str:
    """The ``err`` label of ``tgi_request_failure`` for a request that ended on ``exc``;
    ``client_gone`` names a client that left (TGI says ``cancelled``, OpenAI ``aborted``)."""
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, InvalidRequestError):
        return "validation"
    if isinstance(exc, UnavailableError):
        return "unavailable"
    if isinstance(exc, (ClientDisconnectedError, asyncio.CancelledError, GeneratorExit)):
        return client_gone
    return "generation"


def as_engine_failure(exc: Exception) -> Exception:
    """What a client is told of an exception from the engine: kiln's own errors as they are
    (validation, overload, engine down), anything else as a failed generation."""
    if isinstance(exc, (KilnError, ClientDisconnectedError)):
        return exc
    return EngineFailureError(f"Request failed during generation: {exc}")


@dataclass
class Choice:
    """One engine request: a choice of the response."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    finished: bool = False
    num_output_tokens: int = 0


class Generation:
    """An API request's lifecycle; its seat is released and its metrics recorded exactly once.

    Made by :meth:`kiln.serving.service.Serving.generation`. Typical use::

        generation = serving.generation("aborted", until_disconnected)
        model = await generation.admit()
        with generation.failures_recorded():
            prompt_ids = await generation.off_loop(model.encode, text)
            await generation.start([Choice(0, "id-0", prompt_ids, params)])
            async for choice, output in generation.outputs(): ...
    """

    def __init__(
        self,
        models: ModelManager,
        seats: Seats,
        metrics: RequestMetrics,
        config: ServerConfig,
        client_gone: str,
        until_disconnected: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self._models = models
        self._seats = seats
        self._metrics = metrics
        self._config = config
        self._client_gone = client_gone
        self._until_disconnected = until_disconnected
        self.model: ServedModel | None = None
        """The model pinned at admission."""
        self.choices: list[Choice] = []
        self.started_at = time.monotonic()
        self.first_output_at: float | None = None
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._seated = False
        self._done = False
        metrics.record_start()

    # --- admission ------------------------------------------------------------------------

    async def admit(self) -> ServedModel:
        """Take a seat (:class:`OverloadedError` when all are taken) and pin the active model
        (:class:`UnavailableError` when a model switch takes too long)."""
        with self.failures_recorded():
            self._seats.take()
            self._seated = True
            self.model = await self._models.acquire()
        return self.model

    @property
    def window(self) -> ContextWindow:
        """The context window of the pinned model."""
        assert self.model is not None, "admit() first"
        return ContextWindow.of(self.model, self._config)

    async def off_loop(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``work(*args)`` on a worker thread, so a long tokenization or chat rendering never
        stalls the event loop; abandoned (:class:`ClientDisconnectedError`) if the client
        leaves first."""
        return await self.unless_disconnected(asyncio.to_thread(work, *args, **kwargs))

    @contextlib.contextmanager
    def failures_recorded(self) -> Iterator[None]:
        """Record (once) and re-raise what fails inside."""
        try:
            yield
        except BaseException as e:
            self.fail(e)
            raise

    # --- how it ends ----------------------------------------------------------------------

    def succeed(self) -> None:
        if self._done:
            return
        self._done = True
        self._release()
        now = time.monotonic()
        # NOTE: "queue" is the time to the first output here (queue and prefill), so that the
        # mean time per token that TGI's dashboards derive from it is the decode time alone.
        self._metrics.record_success(
            now - self.started_at,
            self.queue_seconds,
            self.num_prompt_tokens,
            self.num_output_tokens,
        )

    def fail(self, error: BaseException) -> None:
        if self._done:
            return
        self._done = True
        self.close()
        self._release()
        self._metrics.record_failure(failure_type(error, self._client_gone))

    def close(self) -> None:
        """Abort what still runs (synchronous, so it is safe in a cancelled context)."""
        for task in self._tasks:
            task.cancel()
        if self.model is None:
            return
        for choice in self.choices:
            if not choice.finished:
                self.model.engine.abort(choice.request_id)

    def _release(self) -> None:
        if self.model is not None:
            self._models.release(self.model)
        if self._seated:
            self._seated = False
            self._seats.give_back()

    @property
    def queue_seconds(self) -> float:
        """Seconds from arrival to the first output (queue and prefill)."""
        end = self.first_output_at if self.first_output_at is not None else time.monotonic()
        return end - self.started_at

    # --- choices --------------------------------------------------------------------------

    async def start(self, choices: list[Choice]) -> None:
        """Submit every choice and wait for each one's first output (or its refusal)."""
        assert self.model is not None, "admit() first"
        self.choices = choices
        loop = asyncio.get_running_loop()
        started = [loop.create_future() for _ in choices]
        for future in started:  # refusals after the first are answered by the first alone
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._tasks = [
            asyncio.create_task(self._pump(self.model, choice, future))
            for choice, future in zip(choices, started, strict=True)
        ]
        try:
            await self.unless_disconnected(asyncio.gather(*started))
        except BaseException:
            self.close()
            raise
        self.first_output_at = time.monotonic()

    async def _pump(
        self, model: ServedModel, choice: Choice, started: asyncio.Future[None]
    ) -> None:
        outputs = model.engine.generate(choice.prompt_ids, choice.params, choice.request_id)
        try:
            async for output in outputs:
                if not started.done():
                    started.set_result(None)
                self._queue.put_nowait((choice.index, output))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = as_engine_failure(e)
            if started.done():
                self._queue.put_nowait((choice.index, error))
            else:
                started.set_exception(error)
            return
        if not started.done():  # cannot happen: the engine always ends on a finished output
            started.set_exception(EngineFailureError("the engine ended a request without output"))
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

    @property
    def num_prompt_tokens(self) -> int:
        # A prompt is counted once, however many choices share it.
        unique = {id(c.prompt_ids): len(c.prompt_ids) for c in self.choices}
        return sum(unique.values())

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices)

    # --- answers --------------------------------------------------------------------------

    async def unless_disconnected(self, work: Awaitable[T]) -> T:
        """Await ``work``; raise :class:`ClientDisconnectedError` (cancelling it) if the client
        leaves first.

        NOTE: a streaming answer is cancelled by the web framework when its client leaves,
        but a plain one is not: without this watch, a client that gives up on a long request
        would keep it generating (and holding KV blocks) to the end.
        """
        if self._until_disconnected is None:
            return await work
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self._until_disconnected())
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
            # NOTE: awaited, so the watcher's receive is over before anything else (the
            # response's own disconnect listener) waits for the same message.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch

    async def answer(self, work: Awaitable[T]) -> T:
        """The non-streaming answer: ``work`` (which reads :meth:`outputs`) to its end."""
        with self.failures_recorded():
            try:
                result = await self.unless_disconnected(work)
            finally:
                self.close()
        self.succeed()
        return result

    async def stream(
        self,
        events: AsyncIterator[str],
        error_event: Callable[[Exception], str],
        done: str | None = None,
    ) -> AsyncIterator[str]:
        """The streaming answer: ``events``, then ``done`` (if any). An engine failure after
        the first event is too late for an error status: it ends the stream as
        ``error_event(error)`` (then ``done``)."""
        try:
            async for event in events:
                yield event
            if done is not None:
                yield done
            self.succeed()
        except Exception as e:
            error = as_engine_failure(e)
            self.fail(error)
            yield error_event(error)
            if done is not None:
                yield done
        finally:
            # NOTE: a client that goes away cancels this generator or closes it at a yield;
            # either way its choices are aborted here, and their blocks freed.
            self.fail(ClientDisconnectedError())  # a no-op unless the stream ended early
