"""Errors in the shape each API's clients expect.

TGI routes answer ``{"error": ..., "error_type": ...}``; OpenAI routes (``/v1/...``) answer
``{"error": {"message", "type", "param", "code"}}``. Status codes: 422 (TGI) / 400 (OpenAI) for
invalid input, 429 with ``Retry-After`` when overloaded, 503 (with ``Retry-After``) when the
engine is down or no model is ready during a model switch, 424 when the engine failed while
generating (TGI's status for it).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.engine.async_engine import EngineDeadError, QueueFullError
from kiln.errors import InvalidRequestError, KilnError
from kiln.server.models import ModelUnavailableError
from kiln.server.state import OverloadedError

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "1"


class GenerationError(KilnError):
    """The engine failed while generating a request (HTTP 424, as TGI answers it)."""


class ClientDisconnectedError(Exception):
    """The client closed its connection before its answer was ready."""


def failure_type(exc: BaseException, client_gone: str) -> str:
    """The ``err`` label of ``tgi_request_failure`` for a request that ended on ``exc``;
    ``client_gone`` names a client that left (TGI says ``cancelled``, OpenAI ``aborted``)."""
    if isinstance(exc, (OverloadedError, QueueFullError)):
        return "overloaded"
    if isinstance(exc, InvalidRequestError):
        return "validation"
    if isinstance(exc, EngineDeadError):
        return "unavailable"
    if isinstance(exc, (ClientDisconnectedError, asyncio.CancelledError, GeneratorExit)):
        return client_gone
    return "generation"


def is_openai_route(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(
    request: Request,
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    headers = None
    if status in (429, 503):
        headers = {"Retry-After": str(retry_after) if retry_after else RETRY_AFTER_SECONDS}
    if is_openai_route(request):
        openai_type = {
            422: "invalid_request_error",
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            429: "rate_limit_error",
        }.get(status, "server_error")
        status = 400 if status == 422 else status
        body = {
            "error": {"message": message, "type": openai_type, "param": param, "code": error_type}
        }
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(
        {"error": message, "error_type": error_type}, status_code=status, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('ctx', {}).get('error', msg)}", None
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(request, 422, message, "validation", param)

    async def _overloaded(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, 429, "Model is overloaded", "overloaded")

    # The server's seat limit and the engine's queue bound are the same answer to a client.
    app.add_exception_handler(OverloadedError, _overloaded)
    app.add_exception_handler(QueueFullError, _overloaded)

    @app.exception_handler(ModelUnavailableError)
    async def _unavailable(request: Request, exc: ModelUnavailableError) -> JSONResponse:
        return error_response(request, 503, str(exc), "unavailable", retry_after=exc.retry_after)

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(request, 503, str(exc), "unavailable")

    @app.exception_handler(GenerationError)
    async def _generation(request: Request, exc: GenerationError) -> JSONResponse:
        return error_response(request, 424, str(exc), "generation")

    @app.exception_handler(KilnError)
    async def _kiln(request: Request, exc: KilnError) -> JSONResponse:
        return error_response(request, 422, str(exc), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail), "http")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(request, 500, "internal error", "generation")
