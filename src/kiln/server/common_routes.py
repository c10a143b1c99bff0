"""Routes shared by every API flavour: health and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from kiln.server.errors import TGIRoute
from kiln.server.state import ServingDep

router = APIRouter(route_class=TGIRoute)


@router.get(
    "/health",
    response_class=Response,
    responses={503: {"description": "The engine is not running"}},
)
async def health(serving: ServingDep) -> Response:
    """200 when the engine loop runs, 503 otherwise (TGI semantics)."""
    return Response(status_code=200 if serving.is_healthy else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(serving: ServingDep) -> Response:
    return Response(serving.render_metrics(), media_type="text/plain; version=0.0.4")
