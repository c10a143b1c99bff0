"""kiln on Ray Serve: each replica loads kiln's engine and serves ``kiln serve``'s FastAPI app.

One code path: the replica builds the app with :func:`kiln.server.app.create_app`, the function
``kiln serve`` uses, and hands it to Ray Serve through ``@serve.ingress`` (late-bound, so the app
is built inside the replica, around the model it loaded). Every route of ``kiln serve`` (TGI,
OpenAI, streaming, ``/infer``, ``/metrics``, the chat page) answers the same way behind Ray's
HTTP proxy. Each response names its replica in ``x-kiln-replica``, so spreading is visible.

Several models: one :class:`KilnModel` deployment per model, and a :class:`KilnIngress`
deployment in front that Ray's proxy sends every request to. It picks the model deployment
(OpenAI routes: the body's ``model``; everything else: the default, first model) and forwards
the request through a streaming ``DeploymentHandle`` call of :meth:`KilnModel.forward`, which
runs it through the replica's own app: the same routes and errors, and SSE token by token.

Needs the ``ray`` extra (``pip install 'kiln[ray]'``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.deploy.config import (
    DEPLOYMENT_NAME,
    INGRESS_DEPLOYMENT_NAME,
    RayServeConfig,
    ReplicaConfig,
    model_deployment_name,
)
from kiln.errors import ConfigError

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-kiln-replica"
"""The response header naming the replica that answered."""


class _ReplicaHeader:
    """Adds ``x-kiln-replica: ID`` to every HTTP response, streamed ones included (the header
    goes out with the response's start, before the first token)."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class KilnReplica:
    """One replica: a loaded model and the app that serves it."""

    def __init__(self, replica_args: dict[str, Any]) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # NOTE: not `self.app`: Ray's ingress wrapper owns that name (a read-only property).
        self.kiln_app = replica_app(replica_args, self.replica_id)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        # Ray runs the app's lifespan (which starts the engine loop) after this returns.
        return self.kiln_app

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose engine loop died is replaced."""
        if not self.kiln_app.state.serving.is_healthy:
            raise RuntimeError(f"kiln replica {self.replica_id}: the engine is not running")


def replica_app(replica_args: dict[str, Any], replica_id: str) -> FastAPI:
    """kiln serve's app around the model ``replica_args`` name, loaded here (in the replica),
    its responses named by ``replica_id``; its lifespan is not started yet."""
    import torch

    from kiln.config.server import ServerConfig
    from kiln.llm import LLM
    from kiln.server.app import create_app

    config = ReplicaConfig.from_args(replica_args)
    if config.threads:
        # NOTE: torch's default is every core of the node; replicas sharing a node would
        # then fight over the same cores.
        torch.set_num_threads(config.threads)
    llm = LLM.from_args(config.engine_args())
    server = ServerConfig(
        max_concurrent_requests=config.max_concurrent_requests,
        max_input_tokens=config.max_input_tokens,
        max_total_tokens=config.max_total_tokens,
        api_key=_api_key(config.api_key_env),
        model_id=config.model_id,
        chat_db=_from_env(config.chat_db_env, "chat_db_env") or config.chat_db,
    )
    app = create_app(llm, server)
    app.add_middleware(_ReplicaHeader, replica_id=replica_id)
    logger.info("kiln replica %s serves %s", replica_id, llm.model_name)
    return app


@serve.deployment
class KilnModel:
    """One replica of one model of a several-model application: kiln serve's app, reached
    through :class:`KilnIngress` (Ray allows one ``@serve.ingress`` deployment per application,
    so this one runs its app's lifespan itself, and answers handle calls, not HTTP)."""

    async def __init__(self, replica_args: dict[str, Any]) -> None:
        # NOTE: async, so the lifespan (the engine loop) starts on the replica's event loop,
        # the loop `forward` runs the app on.
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.kiln_app = replica_app(replica_args, self.replica_id)
        self.lifespan = self.kiln_app.router.lifespan_context(self.kiln_app)
        await self.lifespan.__aenter__()

    async def __del__(self) -> None:
        # Ray awaits an async __del__ when it stops the replica: stop the engine loop (if
        # __init__ got as far as starting it).
        lifespan = getattr(self, "lifespan", None)
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose engine loop died is replaced."""
        if not self.kiln_app.state.serving.is_healthy:
            raise RuntimeError(f"kiln replica {self.replica_id}: the engine is not running")

    async def forward(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        """One HTTP request the ingress forwards, answered by this replica's app: first
        ``{"status", "headers"}``, then the body's chunks as the app sends them (a stream's
        events one by one). Called as a streaming handle call (``options(stream=True)``)."""
        async for part in call_asgi(self.kiln_app, method, path, query, headers, body):
            yield part


async def call_asgi(
    app: ASGIApp,
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> AsyncIterator[dict[str, Any] | bytes]:
    """Runs one HTTP request through ``app``; yields the response's start
    (``{"status", "headers"}``), then its non-empty body chunks as they are sent.

    NOTE: not httpx's ASGI transport: it collects the whole body before returning, which would
    turn a token stream into one late answer.
    """
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    finished = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        # NOTE: Starlette's streaming responses listen for a disconnect meanwhile: answering
        # one before the response is done would cut the stream short.
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": None,
        "server": None,
    }

    def returned(task: asyncio.Task[None]) -> None:
        # What a server does with an app's exception (Starlette re-raises after its 500):
        # logged here, as nothing else awaits the task.
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s %s failed", method, path, exc_info=task.exception())
        messages.put_nowait(None)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(returned)
    started = done = False
    try:
        while not done:
            message = await messages.get()
            if message is None:  # the app returned (or raised) without finishing a response
                if not started:
                    yield {"status": 500, "headers": [(b"content-type", b"text/plain")]}
                    yield b"internal error"
                break
            if message["type"] == "http.response.start":
                started = True
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                done = not message.get("more_body", False)
    finally:
        finished.set()
        if not done:
            # The caller left mid-answer (its client disconnected): stop generating for it.
            task.cancel()


_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
"""Request headers that describe the client's connection to the ingress, not the request."""

_BODY_HEADERS = frozenset({b"content-length", b"content-type", b"content-encoding"})
"""Request headers that describe its body (dropped when the ingress asks without one)."""

_OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions")
"""The routes whose JSON body's ``model`` picks the model deployment."""


def ingress_app(models: dict[str, DeploymentHandle], default: str) -> FastAPI:
    """The ingress's app: routes each request to the deployment of the model it names.

    Args:
        models: each model's id and its deployment's handle.
        default: the model of requests that name none (TGI routes, the chat page, admin).
    """
    from kiln.server.errors import OPENAI_ERRORS
    from kiln.server.openai.handlers import PLACEHOLDER_MODELS

    app = FastAPI(title="kiln ingress", docs_url=None, redoc_url=None, openapi_url=None)

    async def forward(
        request: Request, model: str, body: bytes, get: str | None = None
    ) -> StreamingResponse:
        """``request`` answered by ``model``'s deployment; with ``get``, a bodiless GET of
        that path instead, with the request's other headers (its API key)."""
        if get is None:
            method, path, dropped = request.method, _app_path(request.scope), _HOP_BY_HOP
            query: bytes = request.scope["query_string"]
        else:
            method, path, query, dropped = "GET", get, b"", _HOP_BY_HOP | _BODY_HEADERS
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in dropped]
        call = models[model].options(stream=True).forward
        parts = call.remote(method, path, query, headers, body)
        start = await parts.__anext__()

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in parts:
                    yield chunk
            finally:
                # A client that left ends the replica's generation too, as with kiln serve.
                parts.cancel()

        response = StreamingResponse(rest(), status_code=start["status"])
        # The replica's headers as they are (content-type, x-kiln-replica, Retry-After...).
        response.raw_headers = list(start["headers"])
        return response

    async def collect(request: Request, model: str, path: str) -> tuple[int, bytes, Response]:
        """A GET of ``path`` on ``model``'s deployment with the request's headers (its API
        key), read whole: the status, the body, and the response to pass on when not 200."""
        response = await forward(request, model, b"", get=path)
        chunks = [c async for c in response.body_iterator]
        data = b"".join(c if isinstance(c, bytes) else str(c).encode() for c in chunks)
        passed = Response(data, status_code=response.status_code)
        passed.raw_headers = response.raw_headers
        return response.status_code, data, passed

    async def unknown(request: Request, name: str) -> Response:
        # The default model answers first: a request without a valid API key gets its 401,
        # not the list of models; the ingress itself holds no key.
        status, _, passed = await collect(request, default, "/v1/models")
        if status != 200:
            return passed
        served = ", ".join(f"`{m}`" for m in models)
        message = f"The model `{name}` does not exist; this server serves {served}."
        code, body = OPENAI_ERRORS.body(404, message, "not_found", "model", "model_not_found")
        return JSONResponse(body, status_code=code)

    @app.post(_OPENAI_ROUTES[0])
    @app.post(_OPENAI_ROUTES[1])
    async def openai_generate(request: Request) -> Response:
        body = await request.body()
        name = _model_field(body)
        if name in models:
            return await forward(request, name, body)
        if not name or name in PLACEHOLDER_MODELS:
            return await forward(request, default, body)
        return await unknown(request, name)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        answers = await asyncio.gather(*(collect(request, m, "/v1/models") for m in models))
        cards: list[Any] = []
        for status, data, passed in answers:
            if status != 200:
                return passed
            cards += json.loads(data)["data"]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(request: Request, name: str) -> Response:
        if name in models:
            return await forward(request, name, b"")
        return await unknown(request, name)

    @app.api_route(
        "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    )
    async def to_default(request: Request, rest: str) -> Response:
        return await forward(request, default, await request.body())

    return app


def _app_path(scope: Scope) -> str:
    """The request's path inside the application (without Serve's route prefix)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def _model_field(body: bytes) -> str | None:
    """The JSON body's ``model`` (None when there is none, or no JSON: the default model then
    answers the request, bad body included, with its usual error)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


@serve.deployment(name=INGRESS_DEPLOYMENT_NAME)
@serve.ingress()
class KilnIngress:
    """A several-model application's entry: routes each request to its model's deployment."""

    def __init__(self, models: dict[str, DeploymentHandle], default: str) -> None:
        if default not in models:
            raise ConfigError(f"the default model {default!r} is none of {list(models)}")
        self.ingress = ingress_app(models, default)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.ingress


def _api_key(env: str | None) -> str | None:
    return _from_env(env, "api_key_env")


def _from_env(env: str | None, option: str) -> str | None:
    """The value of the variable ``env`` names on this replica's node (None: no ``env``)."""
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"{option}: ${env} is not set on this replica's node")
    return value


def application(config: RayServeConfig) -> Application:
    """The Ray Serve application ``config`` describes (replicas, resources, autoscaling)."""
    if not config.more_models:
        return KilnReplica.options(**config.deployment_options()).bind(config.replica.to_args())
    models = {}
    for deployment, args in zip(
        config.model_deployments(), config.models_args()["models"], strict=True
    ):
        options = {"name": deployment.name, **deployment.deployment_options()}
        models[args["model_id"]] = KilnModel.options(**options).bind(args)
    ingress = KilnIngress.options(**config.ingress_options())
    return ingress.bind(models, next(iter(models)))


def build_models_app(args: dict[str, Any]) -> Application:
    """The builder of a several-model application: ``args`` are ``{"models": [replica
    options, ...]}``, the default model first; the config's ``deployments`` entries (the
    ingress's, and ``kiln-<model id>`` per model) set each one's replicas and resources."""
    entries = args.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError('several-model args: expected {"models": [{...}, ...]}')
    models = {}
    for entry in entries:
        replica = ReplicaConfig.from_args(dict(entry))
        name = replica.served_name()
        if name in models:
            raise ConfigError(f"model id {name!r} is given twice")
        deployment = KilnModel.options(name=model_deployment_name(name))
        models[name] = deployment.bind({**replica.to_args(), "model_id": name})
    return KilnIngress.bind(models, next(iter(models)))


def build_app(args: dict[str, Any]) -> Application:
    """The builder a Serve config's ``import_path`` names: ``args`` are the replica's options
    (:class:`ReplicaConfig`); the config's ``deployments`` entry sets replicas and resources."""
    return KilnReplica.bind(ReplicaConfig.from_args(dict(args)).to_args())


def run(config: RayServeConfig, address: str | None = None, blocking: bool = False) -> str:
    """Deploy ``config`` on the Ray cluster at ``address`` (None: start a local one, or join
    the one ``RAY_ADDRESS`` names); returns the application's URL."""
    import ray

    if not ray.is_initialized():
        # NOTE: Ray refuses dashboard options when it joins an existing cluster.
        ray.init(address=address, **({} if address else {"include_dashboard": False}))
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(
        application(config),
        name=config.app_name,
        route_prefix=config.route_prefix,
        blocking=blocking,
    )
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}{config.route_prefix.rstrip('/')}"
