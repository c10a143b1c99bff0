"""Serving: what every front end (TGI, OpenAI, the web app, Ray Serve) stands on.

It holds the models (a :class:`ModelManager`), the limits on concurrent work and on context,
and the request metrics; each API request is a :class:`~kiln.serving.generation.Generation`
made by :meth:`Serving.generation`. Nothing here knows HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from kiln.config.server import ServerConfig
from kiln.serving.generation import Generation
from kiln.serving.limits import ContextWindow, Seats
from kiln.serving.metrics import PrometheusExporter, RequestMetrics
from kiln.serving.models import ModelManager
from kiln.serving.served_model import ServedModel


class Serving:
    """The models, the limits and the metrics every API shares."""

    def __init__(self, models: ModelManager, config: ServerConfig | None = None) -> None:
        self.models = models
        self.config = config or ServerConfig()
        self.metrics = RequestMetrics()
        self.seats = Seats(self.config.max_concurrent_requests)
        self.exporter = PrometheusExporter(self.metrics, models, lambda: self.seats.in_flight)
        self.started_at = time.time()

    def start(self) -> None:
        self.models.start()

    def stop(self) -> None:
        self.models.stop()

    def generation(
        self, client_gone: str, until_disconnected: Callable[[], Awaitable[None]] | None = None
    ) -> Generation:
        """A new request's lifecycle. ``client_gone`` labels a request whose client left in
        the failure metrics (TGI says ``cancelled``, OpenAI ``aborted``); ``until_disconnected``
        returns when the client goes away (None: never watched)."""
        return Generation(
            self.models, self.seats, self.metrics, self.config, client_gone, until_disconnected
        )

    def window(self, model: ServedModel) -> ContextWindow:
        return ContextWindow.of(model, self.config)

    @property
    def is_healthy(self) -> bool:
        active = self.models.active
        return active is not None and active.engine.is_running

    def render_metrics(self, accept: str | None = None) -> tuple[bytes, str]:
        """``/metrics``: the body and its content type (OpenMetrics when ``accept`` asks)."""
        return self.exporter.render(accept)
