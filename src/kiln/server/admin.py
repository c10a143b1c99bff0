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

from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from kiln.server.errors import error_response
from kiln.server.models import SwitchInProgressError, UnknownModelError
from kiln.server.state import State

router = APIRouter(prefix="/admin", tags=["admin"])


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


def _unknown(request: Request, name: str) -> JSONResponse:
    return error_response(request, 404, f"no model named {name!r}", "not_found")


@router.get("/models", response_model=list[ModelStatus])
async def list_models(state: State) -> list[ModelStatus]:
    """Every model the server may serve, with its status."""
    return [ModelStatus(**s) for s in state.models.statuses()]


@router.get("/models/{name:path}", response_model=ModelStatus, responses=_NOT_FOUND)
async def model_status(name: str, state: State, request: Request) -> Response | ModelStatus:
    """One model's status (chat-ui's "Retrieve model status")."""
    try:
        return ModelStatus(**state.models.status(name))
    except UnknownModelError:
        return _unknown(request, name)


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
async def activate(name: str, state: State, request: Request) -> Response:
    """Make ``name`` the model that serves: 202 while it loads (poll its status until
    ``available``, or ``failed``), 200 when it is active already."""
    try:
        state.models.activate(name)
    except UnknownModelError:
        return _unknown(request, name)
    except SwitchInProgressError as e:
        return error_response(request, 409, str(e), "conflict")
    status = state.models.status(name)
    code = 200 if status["status"] == "available" else 202
    return JSONResponse(ModelStatus(**status).model_dump(), status_code=code)
