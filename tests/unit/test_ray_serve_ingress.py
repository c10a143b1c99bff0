"""The several-model ingress's routing, and the replica side's ASGI forwarding, without Ray.

Each model deployment is stood in for by a handle whose streaming ``forward`` call runs
:func:`kiln.deploy.ray_serve.call_asgi` on a small app requiring an API key, as the real
:class:`KilnModel` runs kiln serve's app. tests/e2e/test_ray_serve_models.py does it for real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.testclient import TestClient

from kiln.deploy.ray_serve import call_asgi, ingress_app

KEY = {"Authorization": "Bearer sesame"}


def _model_app(name: str) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Response:
        if request.headers.get("authorization") != KEY["Authorization"]:
            return JSONResponse({"error": {"code": "invalid_api_key"}}, status_code=401)
        return await call_next(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        return {"model": name, "asked": (await request.json()).get("model")}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    @app.post("/generate_stream")
    async def stream() -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {name} {i}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        return {"model_id": name, "query": request.url.query}

    return app


class _Stream:
    """What ``handle.options(stream=True).forward.remote(...)`` returns: async chunks."""

    def __init__(self, parts: AsyncIterator[Any]) -> None:
        self.parts = parts

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        return await self.parts.__anext__()

    def cancel(self) -> None:
        pass


class _Handle:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.forward = self

    def options(self, stream: bool) -> _Handle:
        assert stream  # the ingress always streams: answers pass through as they come
        return self

    def remote(self, *request: Any) -> _Stream:
        return _Stream(call_asgi(self.app, *request))


@pytest.fixture
def client() -> TestClient:
    handles: dict[str, Any] = {name: _Handle(_model_app(name)) for name in ("a", "b")}
    return TestClient(ingress_app(handles, default="a"))


def test_openai_requests_go_to_the_model_they_name(client: TestClient) -> None:
    for name in ("a", "b"):
        r = client.post("/v1/chat/completions", json={"model": name}, headers=KEY)
        assert r.status_code == 200 and r.json()["model"] == name
    # No model, or a placeholder TGI clients send: the default model.
    for body in ({}, {"model": "tgi"}):
        r = client.post("/v1/chat/completions", json=body, headers=KEY)
        assert r.json()["model"] == "a"


def test_unknown_model_is_openais_404_naming_every_model(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "zzz"}, headers=KEY)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "not_found_error"
    assert error["param"] == "model"
    assert "`zzz`" in error["message"] and "`a`, `b`" in error["message"]
    # Without the key, the replica's 401 answers: the models are not listed to anyone.
    denied = client.post("/v1/chat/completions", json={"model": "zzz"})
    assert denied.status_code == 401


def test_models_merges_every_deployment(client: TestClient) -> None:
    r = client.get("/v1/models", headers=KEY)
    assert [m["id"] for m in r.json()["data"]] == ["a", "b"]
    assert client.get("/v1/models").status_code == 401


def test_other_routes_go_to_the_default_model_and_stream(client: TestClient) -> None:
    info = client.get("/info?x=1", headers=KEY)
    assert info.json() == {"model_id": "a", "query": "x=1"}
    with client.stream("POST", "/generate_stream", headers=KEY) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert [line for line in r.iter_lines() if line] == [f"data: a {i}" for i in range(3)]


def _parts(app: Any, method: str = "GET", path: str = "/") -> list[Any]:
    async def collect() -> list[Any]:
        return [p async for p in call_asgi(app, method, path, b"", [], b"")]

    return asyncio.run(collect())


def test_call_asgi_yields_the_start_then_each_chunk_as_sent() -> None:
    [start, *_] = _parts(_model_app("a"), "POST", "/generate_stream")
    assert start["status"] == 401  # no key: the app's own answer comes back whole
    start, *chunks = asyncio.run(_stream_with_key())
    assert start["status"] == 200
    assert chunks == [f"data: a {i}\n\n".encode() for i in range(3)]


async def _stream_with_key() -> list[Any]:
    headers = [(b"authorization", KEY["Authorization"].encode())]
    app = _model_app("a")
    return [p async for p in call_asgi(app, "POST", "/generate_stream", b"", headers, b"")]


def test_call_asgi_answers_500_when_the_app_fails_before_answering() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    start, body = _parts(broken)
    assert start["status"] == 500 and body == b"internal error"
