"""AsyncEngine: one background thread steps the engine; callers await per-request streams.

The model's forward pass blocks for tens of milliseconds, so it runs on its own thread and never
on the event loop that serves HTTP. Requests and aborts reach that thread through a command
queue it drains between steps; each step's outputs are handed back to the event loop with
``call_soon_threadsafe``. Data flows one way: commands down, outputs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from kiln.engine.engine import Engine
from kiln.engine.metrics import EngineMetrics, EngineStats
from kiln.engine.outputs import RequestOutput
from kiln.errors import KilnError, OverloadedError, UnavailableError
from kiln.sampling import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(OverloadedError):
    """The waiting queue is at its bound: the caller should retry later (HTTP 429)."""


class EngineDeadError(UnavailableError):
    """The engine loop is not running (stopped, or never started)."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


class _Stream:
    """Outputs of one request, delivered on the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        # A closed caller loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Serve many concurrent ``generate`` calls from one :class:`Engine`.

    ``max_waiting_requests`` of the engine's scheduler config bounds the queue: beyond it
    :meth:`generate` raises :class:`QueueFullError` at once (back-pressure, HTTP 429).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _num_pending and _accepting
        self._num_pending = 0  # added by callers, not yet seen by the loop thread
        self._accepting = False  # whether a loop thread will see what callers add
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stats = engine.stats()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        with self._lock:
            self._accepting = True
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the loop thread; requests still running get an :class:`EngineDeadError`."""
        self._stopping.set()
        if self._thread is not None:
            self._commands.put(None)
            self._thread.join(timeout)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- requests -------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (text delta, token ids, logprobs, finish reason).

        Raises ``ContextLengthError`` (does not fit), ``QueueFullError`` (back-pressure) or
        ``EngineDeadError`` before the first output. Leaving the iteration early (a client that
        disconnects) aborts the request and frees its KV blocks.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        prompt_ids = (
            self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        )
        self.engine.check_fits(len(prompt_ids), params.max_new_tokens)  # pure: safe off-thread
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop())
        self._submit(_Add(request_id, prompt_ids, params, stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (thread-safe, returns at once)."""
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        """Gauges as of the last step (read without touching the engine thread)."""
        return self._stats

    @property
    def metrics(self) -> EngineMetrics:
        return self.engine.metrics

    def _submit(self, add: _Add) -> None:
        bound = self.engine.scheduler.config.max_waiting_requests
        with self._lock:
            # NOTE: checked under the lock the loop thread takes when it exits, so a request
            # either reaches a running loop or is refused here, never left unanswered.
            if not self._accepting:
                raise EngineDeadError("the engine is not running")
            if bound is not None and self._stats.num_waiting + self._num_pending >= bound:
                raise QueueFullError(f"the queue is full ({bound} requests waiting); retry later")
            self._num_pending += 1
            self._commands.put(add)

    # --- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            block = not self.engine.has_unfinished()
            if not self._drain_commands(block):
                break
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # never let one bad step kill the engine for everyone
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(e)
                continue
            # NOTE: before the outputs go out: a caller woken by one must not see the gauges
            # of the previous step (a request it saw running still counted as waiting makes
            # the back-pressure check refuse requests there is room for).
            self._stats = self.engine.stats()
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put(output)
                    if output.finished:
                        del self._streams[output.request_id]
        with self._lock:
            self._accepting = False
        self._fail_all(EngineDeadError("the engine stopped"))
        self._fail_unapplied(EngineDeadError("the engine stopped"))

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; wait for one first when idle. False when asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is None:
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            stream = self._streams.pop(command.request_id, None)
            if stream is not None:
                stream.put(KilnError(f"request {command.request_id} was aborted"))
            # NOTE: an abort that empties the engine is followed by no step, so without this
            # the gauges (and the back-pressure check) would show it running until the next
            # request arrives.
            self._stats = self.engine.stats()
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except Exception as e:
            with self._lock:
                self._num_pending -= 1
            command.stream.put(e)
            return
        self._streams[command.request_id] = command.stream
        with self._lock:  # it stops counting as pending as it starts counting as waiting
            self._num_pending -= 1
            self._stats = self.engine.stats()

    def _fail_unapplied(self, error: BaseException) -> None:
        """Answer the requests added after the loop's last look at its commands."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                with self._lock:
                    self._num_pending -= 1
                command.stream.put(error)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(error)
        self._streams.clear()
        self._stats = self.engine.stats()
