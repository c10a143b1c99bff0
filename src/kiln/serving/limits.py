"""The limits every request is held to: the context window and the concurrency seats."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kiln.config.server import ServerConfig
from kiln.errors import OverloadedError
from kiln.serving.served_model import ServedModel


@dataclass(frozen=True)
class ContextWindow:
    """The one context-limit rule: how many tokens a request on a model may take.

    ``max_total_tokens`` (prompt + output) is the server's limit when set, never more than the
    model's context nor what the whole KV cache holds; ``max_input_tokens`` is the server's
    limit when set, never more than ``max_total_tokens - 1`` (one token must be generated).
    """

    max_input_tokens: int
    max_total_tokens: int

    @classmethod
    def of(cls, model: ServedModel, config: ServerConfig) -> ContextWindow:
        total = min(
            config.max_total_tokens or model.max_model_len,
            model.max_model_len,
            model.max_cache_tokens,
        )
        inputs = min(config.max_input_tokens or total - 1, total - 1)
        return cls(max_input_tokens=inputs, max_total_tokens=total)

    def room(self, num_prompt_tokens: int) -> int:
        """Tokens left for the output after a prompt of ``num_prompt_tokens``."""
        return self.max_total_tokens - num_prompt_tokens


class Seats:
    """The ``max_concurrent_requests`` seats: a request holds one from admission to its end."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.in_flight >= self.limit:
                raise OverloadedError("Model is overloaded")
            self.in_flight += 1

    def give_back(self) -> None:
        with self._lock:
            self.in_flight -= 1
