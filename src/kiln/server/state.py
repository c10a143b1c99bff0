"""What every route handler needs: the model, its engine and the server's limits.

The models come from a :class:`~kiln.server.models.ModelManager`, which may switch the active
one. A request must see one model from its first token to its last, so it works on a *pinned*
state: :meth:`ServerState.admit` answers a copy of the state whose ``llm``, ``engine`` and
``model_id`` stay those of the model active when it was admitted, whatever switch comes after.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from kiln.config.server import ServerConfig
from kiln.engine.async_engine import AsyncEngine
from kiln.errors import KilnError
from kiln.llm import LLM
from kiln.server.metrics import ServerMetrics
from kiln.server.models import LoadedModel, ModelManager


class OverloadedError(KilnError):
    """More requests in flight than ``max_concurrent_requests`` (HTTP 429)."""


class _Seats:
    """The ``max_concurrent_requests`` seats, shared by a state and its pinned copies."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._lock = threading.Lock()

    def take(self, limit: int) -> None:
        with self._lock:
            if self.in_flight >= limit:
                raise OverloadedError("Model is overloaded")
            self.in_flight += 1

    def give_back(self) -> None:
        with self._lock:
            self.in_flight -= 1


@dataclass
class ServerState:
    models: ModelManager
    config: ServerConfig
    started_at: float = field(default_factory=time.time)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    seats: _Seats = field(default_factory=_Seats)
    pinned: LoadedModel | None = None
    """The model this (request's) state is pinned to; None: whichever is active."""

    @property
    def model(self) -> LoadedModel:
        """The pinned model, or the active one (:class:`ModelUnavailableError` if none)."""
        return self.pinned if self.pinned is not None else self.models.current()

    @property
    def llm(self) -> LLM:
        return self.model.llm

    @property
    def engine(self) -> AsyncEngine:
        return self.model.engine

    @property
    def model_id(self) -> str:
        return self.model.name

    @property
    def max_total_tokens(self) -> int:
        return self.config.max_total_tokens or self.llm.max_model_len

    @property
    def max_input_tokens(self) -> int:
        return self.config.max_input_tokens or self.max_total_tokens - 1

    @property
    def in_flight(self) -> int:
        return self.seats.in_flight

    async def admit(self) -> Admission:
        """Take one of the ``max_concurrent_requests`` seats (:class:`OverloadedError`, 429)
        and pin the active model, waiting out a switch under way (``ModelUnavailableError``,
        503, when it takes too long). Hold the answer (a context manager) for the request's
        lifetime: it gives both back."""
        self.seats.take(self.config.max_concurrent_requests)
        try:
            model = await self.models.acquire()
        except BaseException:
            self.seats.give_back()
            raise
        return Admission(dataclasses.replace(self, pinned=model))


class Admission:
    """A request's seat and pinned model; :meth:`release` (or leaving the ``with``) gives both
    back, once."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        """The state pinned to the request's model: use it for everything the request does."""
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            assert self.state.pinned is not None
            self.state.models.release(self.state.pinned)
            self.state.seats.give_back()

    def __enter__(self) -> ServerState:
        return self.state

    def __exit__(self, *exc: object) -> None:
        self.release()


def get_state(request: Request) -> ServerState:
    return request.app.state.kiln


State = Annotated[ServerState, Depends(get_state)]
"""Declare ``state: State`` in a route to receive the server's state."""
