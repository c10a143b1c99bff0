"""Model switching, as the tutorials' chat-ui scheduler does it: list the models with their
status, activate one, poll until it is ``available``.

- ``GET /admin/models``: ``[{name, model, status, reason, active}]``; ``status`` is one of
  ``available`` (active, serving), ``loading``, ``unloading`` (finishing its requests after a
  switch), ``unloaded``, ``failed`` (``reason`` says why).
- ``GET /admin/models/{name}``: one of them.
- ``POST /admin/models/{name}/activate``: 202 and the status (``loading``) when a switch
  starts, 200 when the model is active already; 404 for an unknown name, 409 while a switch to
  another model is under way.

Like every route but ``/health``, these need the API key when the server has one.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from kiln.server.errors import TGIRoute
from kiln.server.state import ServingDep
from kiln.serving.models import ModelReport

router = APIRouter(prefix="/admin", tags=["admin"], route_class=TGIRoute)


class ModelStatus(BaseModel):
    name: str
    model: str | None
    """Where it loads from (path or hub id); null for kiln's default model."""
    status: Literal["available", "loading", "unloading", "unloaded", "failed"]
    reason: str | None = None
    """Why the last load failed (``failed`` only)."""
    active: bool


class AdminError(BaseModel):
    error: str
    error_type: str


_NOT_FOUND = {404: {"model": AdminError, "description": "No model of that name"}}


def _status(report: ModelReport) -> ModelStatus:
    return ModelStatus(**{**dataclasses.asdict(report), "status": report.status.value})


@router.get("/models", response_model=list[ModelStatus])
async def list_models(serving: ServingDep) -> list[ModelStatus]:
    """Every model the server may serve, with its status."""
    return [_status(r) for r in serving.models.statuses()]


@router.get("/models/{name:path}", response_model=ModelStatus, responses=_NOT_FOUND)
async def model_status(name: str, serving: ServingDep) -> ModelStatus:
    """One model's status (chat-ui's "Retrieve model status")."""
    return _status(serving.models.status(name))


@router.post(
    "/models/{name:path}/activate",
    response_model=ModelStatus,
    status_code=202,
    responses={
        200: {"model": ModelStatus, "description": "Active already"},
        **_NOT_FOUND,
        409: {"model": AdminError, "description": "A switch to another model is under way"},
    },
)
async def activate(name: str, serving: ServingDep) -> Response:
    """Make ``name`` the model that serves: 202 while it loads (poll its status until
    ``available``, or ``failed``), 200 when it is active already."""
    serving.models.activate(name)
    status = _status(serving.models.status(name))
    code = 200 if status.status == "available" else 202
    return JSONResponse(status.model_dump(), status_code=code)
