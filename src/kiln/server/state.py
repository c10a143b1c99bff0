"""What every route handler needs: the model, its engine and the server's limits."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from kiln.config.server import ServerConfig
from kiln.engine.async_engine import AsyncEngine
from kiln.errors import KilnError
from kiln.llm import LLM
from kiln.server.metrics import ServerMetrics


class OverloadedError(KilnError):
    """More requests in flight than ``max_concurrent_requests`` (HTTP 429)."""


@dataclass
class ServerState:
    llm: LLM
    engine: AsyncEngine
    config: ServerConfig
    model_id: str
    started_at: float = field(default_factory=time.time)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def max_total_tokens(self) -> int:
        return self.config.max_total_tokens or self.llm.max_model_len

    @property
    def max_input_tokens(self) -> int:
        return self.config.max_input_tokens or self.max_total_tokens - 1

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of the ``max_concurrent_requests`` seats for a request's lifetime."""
        with self._lock:
            if self._in_flight >= self.config.max_concurrent_requests:
                raise OverloadedError("Model is overloaded")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1


def get_state(request: Request) -> ServerState:
    return request.app.state.kiln


State = Annotated[ServerState, Depends(get_state)]
"""Declare ``state: State`` in a route to receive the server's state."""
