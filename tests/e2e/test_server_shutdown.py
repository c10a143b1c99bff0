"""Graceful shutdown of ``kiln serve``, run as a real process (stories260K): on SIGTERM (or
Ctrl-C) it stops accepting connections, lets the requests in flight finish within
``--shutdown-timeout``, then stops the engine and exits 0; a request that outlives the timeout
is cut, and the process still exits promptly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server_harness import Server, kiln_serve

LONG_TOKENS = 480  # stories260K has 512 positions; it never emits EOS on its own
NUM_STREAMS = 4
ONE_AT_A_TIME = ("--max-num-seqs", "1")
"""The streams run one after the other (the others wait in the queue, in flight too):
NUM_STREAMS * LONG_TOKENS engine steps, seconds of work."""
PROMPT = "Once upon a time"


def _refused(url: str) -> bool:
    """Whether a new request is turned away: no connection, or 503."""
    try:
        response = httpx.get(url + "/health", timeout=2.0)
    except httpx.TransportError:
        return True
    return response.status_code == 503


@dataclass
class Stream:
    status: int | None = None
    events: list[str] = field(default_factory=list)
    error: Exception | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and bool(self.events) and self.events[-1] == "[DONE]"


def _streams_across_a_signal(
    server: Server,
    sig: signal.Signals,
    while_draining: Callable[[], None] = lambda: None,
    num_streams: int = NUM_STREAMS,
) -> tuple[list[Stream], float]:
    """Start ``num_streams`` long completions; once the first has sent an event, send ``sig``
    and call ``while_draining``; read every stream to its end (or its cut). Returns the
    streams and when the signal was sent."""
    body = {
        "prompt": PROMPT,
        "max_tokens": LONG_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = threading.Event()

    async def read(client: httpx.AsyncClient) -> Stream:
        stream = Stream()
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                stream.status = response.status_code
                if response.status_code != 200:
                    stream.events.append((await response.aread()).decode())
                    return stream
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        stream.events.append(line.removeprefix("data:").strip())
                        started.set()
        except httpx.TransportError as e:  # cut by the server
            stream.error = e
        return stream

    async def main() -> tuple[list[Stream], float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
            reading = [asyncio.create_task(read(client)) for _ in range(num_streams)]
            assert await asyncio.to_thread(started.wait, 60.0)
            signalled_at = time.monotonic()
            server.process.send_signal(sig)
            await asyncio.to_thread(while_draining)
            return await asyncio.gather(*reading), signalled_at

    return asyncio.run(main())


def test_startup_logs_the_url(stories_dir: Path, tmp_path: Path) -> None:
    with kiln_serve(stories_dir, tmp_path) as server:
        lines = [line for line in server.output().splitlines() if server.url in line]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.output()
    assert len(lines) == 1, server.output()
    assert f"{server.url}/v1" in lines[0], lines[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_finishes_the_requests_in_flight(
    stories_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    extra = ("--shutdown-timeout", "60", *ONE_AT_A_TIME)
    with kiln_serve(stories_dir, tmp_path, *extra) as server:

        def refuses_new_connections() -> None:
            deadline = time.monotonic() + 10
            while not _refused(server.url):
                assert time.monotonic() < deadline, "still accepting connections"
                time.sleep(0.05)
            # Refused, yet still running: it is draining its requests.
            assert server.process.poll() is None, "exited before its requests finished"

        streams, signalled_at = _streams_across_a_signal(server, sig, refuses_new_connections)
        assert server.process.wait(timeout=60) == 0, server.output()
        exited_after = time.monotonic() - signalled_at

    for stream in streams:  # the running one and the queued ones: all of them, in full
        assert stream.complete, (stream.error, stream.events[-3:])
        chunks = [json.loads(e) for e in stream.events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == LONG_TOKENS
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert exited_after < 60
    assert "Traceback" not in server.output(), server.output()


def test_shutdown_cuts_requests_that_outlast_the_timeout(stories_dir: Path, tmp_path: Path) -> None:
    timeout_s = 1.0
    extra = ("--shutdown-timeout", str(timeout_s), *ONE_AT_A_TIME)
    with kiln_serve(stories_dir, tmp_path, *extra) as server:
        streams, signalled_at = _streams_across_a_signal(server, signal.SIGTERM)
        cut_after = time.monotonic() - signalled_at
        assert server.process.wait(timeout=30) == 0, server.output()
        exited_after = time.monotonic() - signalled_at

    assert not all(s.complete for s in streams), "nothing was cut"
    ended_early = [s for s in streams if s.status == 503 or any('"error"' in e for e in s.events)]
    assert ended_early, "every stream ran to its end"
    for stream in streams:
        # Cut mid-stream, or, when still waiting for its first token, 503 (retry elsewhere).
        assert stream.complete or stream.status in (200, 503), (stream.status, stream.events)
        if stream.status == 503:
            assert json.loads(stream.events[0])["error"]["type"] == "server_error"
    assert "timeout graceful shutdown exceeded" in server.output()
    # No client hangs. NOTE: generous bounds (a loaded 2-core machine stalls for seconds); that
    # the requests were cut rather than finished is asserted above, not by these times.
    assert cut_after < timeout_s + 20
    assert exited_after < timeout_s + 30


def test_a_stream_cut_at_the_timeout_ends_with_an_error_event(
    stories_dir: Path, tmp_path: Path
) -> None:
    extra = ("--shutdown-timeout", "0.5", *ONE_AT_A_TIME)
    with kiln_serve(stories_dir, tmp_path, *extra) as server:
        # 16 x 480 decode steps one after the other: seconds of work even where stories260K
        # decodes in a fraction of a millisecond a token (kiln's CPU kernels), so the timeout
        # surely cuts some stream.
        streams, _ = _streams_across_a_signal(server, signal.SIGTERM, num_streams=16)
        assert server.process.wait(timeout=30) == 0, server.output()

    running = [s for s in streams if s.status == 200]
    assert running, [s.status for s in streams]
    for stream in running:
        # Ended, not cut: the error says why, then the end marker clients wait for.
        assert stream.error is None, stream.error
        assert stream.events[-1] == "[DONE]", stream.events[-3:]
        error = json.loads(stream.events[-2])["error"]
        assert error["type"] == "server_error" and "shutting down" in error["message"]
    assert "Exception in ASGI application" not in server.output(), server.output()
    assert "Traceback" not in server.output(), server.output()
