"""Routes shared by every API flavour: health and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from kiln.server.metrics import render_prometheus
from kiln.server.state import State

router = APIRouter()


@router.get(
    "/health",
    response_class=Response,
    responses={503: {"description": "The engine is not running"}},
)
async def health(state: State) -> Response:
    """200 when the engine loop runs, 503 otherwise (TGI semantics)."""
    return Response(status_code=200 if state.engine.is_running else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    return Response(render_prometheus(state), media_type="text/plain; version=0.0.4")
