"""Routes shared by every API flavour: health and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
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
async def metrics(serving: ServingDep, request: Request) -> Response:
    """Prometheus' text format, or OpenMetrics when the ``Accept`` header asks for it."""
    body, content_type = serving.render_metrics(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})
