"""kiln on Ray Serve: each replica loads kiln's engine and serves ``kiln serve``'s FastAPI app.

One code path: the replica builds the app with :func:`kiln.server.app.create_app`, the function
``kiln serve`` uses, and hands it to Ray Serve through ``@serve.ingress`` (late-bound, so the app
is built inside the replica, around the model it loaded). Every route of ``kiln serve`` (TGI,
OpenAI, streaming, ``/infer``, ``/metrics``, the chat page) answers the same way behind Ray's
HTTP proxy. Each response names its replica in ``x-kiln-replica``, so spreading is visible.

Needs the ``ray`` extra (``pip install 'kiln[ray]'``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.deploy.config import DEPLOYMENT_NAME, RayServeConfig, ReplicaConfig
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
        import torch

        from kiln.config.server import ServerConfig
        from kiln.llm import LLM
        from kiln.server.app import create_app

        config = ReplicaConfig.from_args(replica_args)
        if config.threads:
            # NOTE: torch's default is every core of the node; replicas sharing a node would
            # then fight over the same cores.
            torch.set_num_threads(config.threads)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        llm = LLM.from_args(config.engine_args())
        server = ServerConfig(
            max_concurrent_requests=config.max_concurrent_requests,
            max_input_tokens=config.max_input_tokens,
            max_total_tokens=config.max_total_tokens,
            api_key=_api_key(config.api_key_env),
            model_id=config.model_id,
            chat_db=_from_env(config.chat_db_env, "chat_db_env") or config.chat_db,
        )
        # NOTE: not `self.app`: Ray's ingress wrapper owns that name (a read-only property).
        self.kiln_app = create_app(llm, server)
        self.kiln_app.add_middleware(_ReplicaHeader, replica_id=self.replica_id)
        logger.info("kiln replica %s serves %s", self.replica_id, llm.model_name)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        # Ray runs the app's lifespan (which starts the engine loop) after this returns.
        return self.kiln_app

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose engine loop died is replaced."""
        if not self.kiln_app.state.serving.is_healthy:
            raise RuntimeError(f"kiln replica {self.replica_id}: the engine is not running")


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
    return KilnReplica.options(**config.deployment_options()).bind(config.replica.to_args())


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
