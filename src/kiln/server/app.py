"""The FastAPI application: lifecycle of the engine, auth, body limits, routers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln import __version__
from kiln.config.server import ServerConfig
from kiln.llm import LLM
from kiln.server.chat import install_chat
from kiln.server.errors import error_response, install_error_handlers
from kiln.serving.models import ModelManager
from kiln.serving.service import Serving

UNAUTHENTICATED_PATHS = frozenset({"/health"})


def _is_public_page(method: str, path: str) -> bool:
    """The chat page (``GET /``) and its assets (``GET /ui/...``).

    NOTE: they hold no data (the page asks for the API key and sends it with its API calls),
    and a browser must load them without the key. GET only: ``POST /`` is TGI's generate.
    """
    return method in ("GET", "HEAD") and (path == "/" or path.startswith("/ui/"))


def create_app(model: LLM | ModelManager, config: ServerConfig | None = None) -> FastAPI:
    """An app serving ``model``: one LLM (named ``config.model_id``, default its source), or
    the models of a :class:`ModelManager` (with its active one loaded). The engine loop starts
    and stops with the app's lifespan."""
    config = config or ServerConfig()
    if not isinstance(model, ModelManager):
        model = ModelManager.serving(model, config.model_id or model.model_name)
    serving = Serving(model, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        serving.start()
        try:
            yield
        finally:
            serving.stop()
            chat_store.close()

    app = FastAPI(title="kiln", version=__version__, lifespan=lifespan)
    app.state.serving = serving
    install_error_handlers(app)
    _install_guards(app, config)
    _include_routers(app)
    chat_store = install_chat(app, config.chat_db)
    return app


def _include_routers(app: FastAPI) -> None:
    # Imported here so that a router module may import create_app's helpers without cycles.
    from kiln.server import admin, common_routes
    from kiln.server.openai import routes as openai_routes
    from kiln.server.tgi import routes as tgi_routes

    app.include_router(common_routes.router)
    app.include_router(tgi_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(admin.router)


class _BodyLimit:
    """413 once a request body grows past ``max_bytes`` as it arrives.

    NOTE: the guard below rejects a too-long Content-Length up front, but a chunked body
    declares no length: without this it would be read whole, whatever its size.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised where the route reads its body, so the app's handlers answer it.
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, receive_limited, send)


class _UnavailableWhenCancelled:
    """503 with Retry-After for a request cancelled before its answer began.

    NOTE: only the server cancels a request's task: uvicorn, at the end of its graceful
    shutdown timeout, for the requests still in flight. It would answer the ones still
    waiting for their first token 500 ("Internal Server Error"); a 503 tells clients and
    load balancers to retry elsewhere. An answer already under way is cut, as it must be.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            if started:
                raise
            response = error_response(
                Request(scope), 503, "the server is shutting down", "unavailable"
            )
            with contextlib.suppress(OSError):  # the client may be gone too
                await response(scope, receive, send)


class _Guard:
    """The API key and the declared body size, checked before anything else runs.

    NOTE: a plain ASGI middleware rather than ``@app.middleware("http")``: that one runs the
    app in a task of its own, which would keep a stream from ending cleanly (with an error
    event) when the server's shutdown timeout cancels it.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(Request(scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        path = request.url.path
        public = path in UNAUTHENTICATED_PATHS or _is_public_page(request.method, path)
        if self.expected is not None and not public:
            # NOTE: RFC 7235: the scheme is case-insensitive ("bearer" is as good as "Bearer").
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # NOTE: constant-time comparison, so response timing does not leak the key.
            if not (
                scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), self.expected)
            ):
                return error_response(request, 401, "invalid or missing API key", "authentication")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return error_response(
                request, 413, f"request body over {self.max_body_bytes} bytes", "validation"
            )
        return None


def _install_guards(app: FastAPI, config: ServerConfig) -> None:
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(_Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    app.add_middleware(_UnavailableWhenCancelled)  # added last: the outermost
