"""A real kiln server on loopback for end-to-end tests: uvicorn in a background thread, or
``kiln serve`` as a process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from kiln.config.server import ServerConfig
from kiln.llm import LLM
from kiln.server.app import create_app
from kiln.serving.models import ModelManager

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    llm: LLM | ModelManager, config: ServerConfig | None = None, port: int | None = None
) -> Iterator[str]:
    """Serve ``llm`` (or a manager's models) on 127.0.0.1 at ``port`` (default: a free one);
    yields the base URL, stops on exit. A test restarts a server by serving again on its port."""
    config = config or ServerConfig()
    port = port or free_port()
    app = create_app(llm, config)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def kiln_serve(stories_dir: Path, tmp_path: Path, *extra: str) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    command = [
        sys.executable,
        "-m",
        "kiln.cli.main",
        "serve",
        "--model",
        str(stories_dir),
        "--port",
        str(port),
        "--threads",
        "1",
        "--kv-cache-memory",
        str(64 << 20),
        *extra,
    ]
    with log.open("wb") as out:
        # NOTE: its own session, so a Ctrl-C meant for pytest does not reach it (nor the
        # signals sent to it, pytest).
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the log is whole when it is read
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, f"kiln serve exited:\n{server.output()}"
            assert time.monotonic() < deadline, f"kiln serve did not start:\n{server.output()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(server.url + "/health", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
