"""A real kiln server on loopback for end-to-end tests: uvicorn in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from kiln.config.server import ServerConfig
from kiln.llm import LLM
from kiln.server.app import create_app
from kiln.server.models import ModelManager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(llm: LLM | ModelManager, config: ServerConfig | None = None) -> Iterator[str]:
    """Serve ``llm`` (or a manager's models) on 127.0.0.1 at a free port; yields the base URL,
    stops on exit."""
    config = config or ServerConfig()
    port = free_port()
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
