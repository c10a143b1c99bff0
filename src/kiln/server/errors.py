"""kiln's errors as HTTP answers: one class-keyed status table, and each API's body shape.

:data:`STATUS` maps each class of :mod:`kiln.errors` to a status and an ``error_type``; the
most specific class of an exception wins. The body shape is chosen by the route that was
matched, as registered by its router (``route_class=TGIRoute`` or ``OpenAIRoute``), never by
looking at the URL: TGI routes answer ``{"error", "error_type"}``, OpenAI routes
``{"error": {"message", "type", "param", "code"}}``. 429 and 503 carry ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from kiln.errors import (
    ConfigError,
    ConflictError,
    EngineFailureError,
    InvalidRequestError,
    KilnError,
    ModelLoadError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)

logger = logging.getLogger(__name__)

STATUS: dict[type[BaseException], tuple[int, str]] = {
    InvalidRequestError: (422, "validation"),
    OverloadedError: (429, "overloaded"),
    UnavailableError: (503, "unavailable"),
    NotFoundError: (404, "not_found"),
    ConflictError: (409, "conflict"),
    EngineFailureError: (424, "generation"),
    ModelLoadError: (500, "model_load"),
    ConfigError: (500, "config"),
    KilnError: (500, "internal"),
}
"""Status and ``error_type`` of each error class (TGI's statuses: 422 for invalid input, 424
for a failed generation)."""


def status_of(exc: BaseException) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500, "internal"


class ErrorShape:
    """TGI's body: ``{"error": message, "error_type": type}``."""

    def body(
        self, status: int, message: str, error_type: str, param: str | None, code: str | None
    ) -> tuple[int, dict[str, Any]]:
        return status, {"error": message, "error_type": error_type}


class OpenAIErrorShape(ErrorShape):
    """OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``; invalid input is a
    400 (not 422) and a failed generation a 500 (not TGI's 424), as OpenAI answers them."""

    _TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }

    def body(
        self, status: int, message: str, error_type: str, param: str | None, code: str | None
    ) -> tuple[int, dict[str, Any]]:
        status = {422: 400, 424: 500}.get(status, status)
        if status in self._TYPES:
            kind = self._TYPES[status]
        else:
            kind = "invalid_request_error" if status < 500 else "server_error"
        error = {"message": message, "type": kind, "param": param, "code": code or error_type}
        return status, {"error": error}


TGI_ERRORS = ErrorShape()
OPENAI_ERRORS = OpenAIErrorShape()


class TGIRoute(APIRoute):
    """A route whose errors have TGI's shape (also the shape of routes that set none)."""

    error_shape: ErrorShape = TGI_ERRORS


class OpenAIRoute(APIRoute):
    """A route whose errors have OpenAI's shape."""

    error_shape: ErrorShape = OPENAI_ERRORS


def _declared_shape(route: Any) -> ErrorShape | None:
    """The shape a route (or an included router, by its ``route_class``) was registered with."""
    shape = getattr(route, "error_shape", None)
    if shape is None:
        router = getattr(route, "original_router", None)  # FastAPI's included routers
        shape = getattr(getattr(router, "route_class", None), "error_shape", None)
    return shape


def shape_for(request: Request) -> ErrorShape:
    """The error shape of the route ``request`` matched (looked up here when a middleware
    answers before routing); for a path no route matches, the shape of the router whose
    prefix it is under (``/v1/...`` is OpenAI's); else TGI's."""
    shape = _declared_shape(request.scope.get("route"))
    if shape is not None:
        return shape
    partial = prefixed = None
    path = request.scope.get("path", "")
    for candidate in request.app.router.routes:
        match, _ = candidate.matches(request.scope)
        if match is Match.FULL:
            return _declared_shape(candidate) or TGI_ERRORS
        if match is Match.PARTIAL and partial is None:
            partial = _declared_shape(candidate)
        prefix = getattr(getattr(candidate, "original_router", None), "prefix", "")
        if prefixed is None and prefix and (path == prefix or path.startswith(prefix + "/")):
            prefixed = _declared_shape(candidate)
    return partial or prefixed or TGI_ERRORS


def error_response(
    request: Request,
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    status, body = shape_for(request).body(status, message, error_type, param, code)
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = str(retry_after or 1)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers or None)


def kiln_error_response(request: Request, exc: BaseException) -> JSONResponse:
    """The answer to one of kiln's errors, from the table."""
    status, error_type = status_of(exc)
    return error_response(
        request,
        status,
        str(exc) or type(exc).__name__,
        error_type,
        param=getattr(exc, "param", None),
        code=getattr(exc, "code", None),
        retry_after=getattr(exc, "retry_after", None),
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

    @app.exception_handler(KilnError)
    async def _kiln(request: Request, exc: KilnError) -> JSONResponse:
        if status_of(exc)[0] >= 500 and not isinstance(exc, UnavailableError):
            logger.error("%s on %s: %s", type(exc).__name__, request.url.path, exc)
        return kiln_error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, UnicodeDecodeError):
            # NOTE: FastAPI reports a body that is not UTF-8 as a bare 400; it is invalid input
            # like any other JSON error, which TGI answers with 422.
            reason = exc.__cause__
            message = f"invalid JSON body: not UTF-8 ({reason.reason} at byte {reason.start})"
            return error_response(request, 422, message, "validation")
        error_type = "validation" if exc.status_code == 413 else "http"
        return error_response(request, exc.status_code, str(exc.detail), error_type)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(request, 500, "internal error", "internal")
