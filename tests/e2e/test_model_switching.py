"""Model switching end to end (the tutorials' chat-ui scheduler): a real kiln server on loopback
serving two models, switched with ``/admin/models``, driven by raw HTTP and the ``openai`` client.

The two models: stories260K (``stories``) and a copy of it with one more EOS id (``eos``), which
stops after the 6th token of ``EOS_PROMPT`` where stories260K goes on: every answer says which
model made it. Expected outputs come from in-process copies of each model.

The test loader can hold a model's load (so a switch stays open as long as a test needs) and
pause a model's engine (so a stream outlives a switch).
"""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kiln import LLM, SamplingParams
from kiln.config.server import ServerConfig
from kiln.serving.models import ModelManager, ModelSpec
from model_copies import EOS_AT, EOS_PROMPT
from server_harness import kiln_serve, running_server

KV_CACHE_BYTES = 16 << 20
TIMEOUT_S = 30.0
SHORT = 20  # tokens: stories260K makes all of them, the eos copy stops at EOS_AT + 1
LONG = 150  # tokens of the stream that outlives a switch
API_KEY = "s3cret"


class Loader:
    """Loads specs as a server would, but a test may hold a model's load until it lets go,
    and pause a model's engine steps until it resumes them."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.running: dict[str, threading.Event] = {}

    def pause(self, name: str) -> None:
        self.running[name] = threading.Event()

    def resume(self, name: str) -> None:
        running = self.running.pop(name, None)
        if running is not None:
            running.set()

    def hold(self, name: str) -> None:
        self.gates[name] = threading.Event()
        self.started[name] = threading.Event()

    def let_go(self, name: str) -> None:
        gate = self.gates.pop(name, None)
        if gate is not None:
            gate.set()

    def let_all_go(self) -> None:
        for name in list(self.gates):
            self.let_go(name)
        for name in list(self.running):
            self.resume(name)

    def __call__(self, spec: ModelSpec) -> LLM:
        gate = self.gates.get(spec.name)
        if gate is not None:
            self.started[spec.name].set()
            assert gate.wait(TIMEOUT_S), f"the test never let {spec.name} load"
        return self.pausable(spec.name, spec.load())

    def pausable(self, name: str, llm: LLM) -> LLM:
        step = llm.engine.step

        def step_unless_paused() -> Any:
            running = self.running.get(name)
            if running is not None:
                assert running.wait(TIMEOUT_S), f"the test never resumed {name}"
            return step()

        llm.engine.step = step_unless_paused  # type: ignore[method-assign]
        return llm


def _spec(name: str, path: Path | str) -> ModelSpec:
    return ModelSpec(name, str(path), {"kv_cache_memory": KV_CACHE_BYTES})


@pytest.fixture(scope="module")
def expected(stories_dir: Path, eos_dir: Path) -> dict[str, list[int]]:
    """Greedy token ids of EOS_PROMPT on each model, computed off the server."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=SHORT)
    long = SamplingParams(temperature=0.0, max_new_tokens=LONG)
    stories = LLM(str(stories_dir), kv_cache_memory=KV_CACHE_BYTES)
    eos = LLM(str(eos_dir), kv_cache_memory=KV_CACHE_BYTES)
    result = {
        "stories": stories.generate([EOS_PROMPT], greedy)[0].token_ids,
        "eos": eos.generate([EOS_PROMPT], greedy)[0].token_ids,
        "stories_long": stories.generate([EOS_PROMPT], long)[0].token_ids,
    }
    assert len(result["stories"]) == SHORT
    assert len(result["eos"]) == EOS_AT + 1
    assert len(result["stories_long"]) == LONG
    return result


def _manager(stories_dir: Path, eos_dir: Path, loader: Loader, **kwargs: Any) -> ModelManager:
    specs = [
        _spec("stories", stories_dir),
        _spec("eos", eos_dir),
        _spec("broken", stories_dir / "no-such-model"),
    ]
    manager = ModelManager(specs, loader=loader, **kwargs)
    manager.load("stories")
    return manager


@pytest.fixture(scope="module")
def loader() -> Loader:
    return Loader()


@pytest.fixture(scope="module")
def manager(stories_dir: Path, eos_dir: Path, loader: Loader) -> ModelManager:
    return _manager(stories_dir, eos_dir, loader, switch_wait_seconds=TIMEOUT_S)


@pytest.fixture(scope="module")
def url(manager: ModelManager, expected: dict[str, list[int]]) -> Iterator[str]:
    with running_server(manager, ServerConfig()) as base:
        yield base


@pytest.fixture
def http(url: str, loader: Loader) -> Iterator[httpx.Client]:
    """A client of the server, with ``stories`` active; whatever a test holds is let go after."""
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        _switch_to(client, "stories")
        try:
            yield client
        finally:
            loader.let_all_go()


# --- helpers --------------------------------------------------------------------------------


def _wait_for(condition: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _status(client: httpx.Client, name: str) -> dict[str, Any]:
    response = client.get(f"/admin/models/{name}")
    assert response.status_code == 200, response.text
    return response.json()


def _statuses(client: httpx.Client) -> dict[str, str]:
    return {m["name"]: m["status"] for m in client.get("/admin/models").json()}


def _switch_to(client: httpx.Client, name: str) -> None:
    assert client.post(f"/admin/models/{name}/activate").status_code in (200, 202)
    _wait_for(lambda: _status(client, name)["status"] == "available")
    # The previous model is unloaded once its last request ends.
    _wait_for(lambda: "unloading" not in _statuses(client).values())


def _generate(client: httpx.Client, max_new_tokens: int = SHORT) -> httpx.Response:
    body = {"inputs": EOS_PROMPT, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    return client.post("/generate", json=body)


def _token_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def _metric(client: httpx.Client, sample: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _stream_token_ids(client: httpx.Client, first_token: threading.Event) -> list[int]:
    """Stream EOS_PROMPT for LONG tokens; sets ``first_token`` once the first one arrived."""
    body = {"inputs": EOS_PROMPT, "parameters": {"max_new_tokens": LONG}}
    ids = []
    with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line.removeprefix("data:"))
            assert "error" not in event, event
            ids.append(event["token"]["id"])
            first_token.set()
    return ids


# --- listing --------------------------------------------------------------------------------


def test_models_are_listed_with_their_status(http: httpx.Client, stories_dir: Path):
    models = http.get("/admin/models").json()
    assert models == [
        {
            "name": "stories",
            "model": str(stories_dir),
            "status": "available",
            "reason": None,
            "active": True,
        },
        {
            "name": "eos",
            "model": models[1]["model"],
            "status": "unloaded",
            "reason": None,
            "active": False,
        },
        {
            "name": "broken",
            "model": str(stories_dir / "no-such-model"),
            "status": "unloaded",
            "reason": None,
            "active": False,
        },
    ]
    assert _status(http, "eos") == models[1]
    assert http.get("/info").json()["model_id"] == "stories"
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["stories"]

    # Activating the active model changes nothing.
    response = http.post("/admin/models/stories/activate")
    assert response.status_code == 200
    assert response.json()["status"] == "available"


def test_unknown_models_are_404(http: httpx.Client):
    for response in (http.get("/admin/models/nope"), http.post("/admin/models/nope/activate")):
        assert response.status_code == 404
        assert response.json() == {"error": "no model named 'nope'", "error_type": "not_found"}


# --- switching ------------------------------------------------------------------------------


def test_a_switch_serves_waiting_requests_on_the_new_model_and_old_streams_on_the_old(
    http: httpx.Client, loader: Loader, manager: ModelManager, expected: dict[str, list[int]]
):
    switches = _metric(http, "kiln_model_switches")
    assert manager.active is not None
    old_engine = weakref.ref(manager.active.engine.engine)  # holds the weights, KV cache
    assert _token_ids(_generate(http)) == expected["stories"]
    loader.hold("eos")
    oai = openai.OpenAI(base_url=str(http.base_url) + "/v1", api_key="x", max_retries=0)
    with ThreadPoolExecutor(4) as pool:
        first_token = threading.Event()
        stream = pool.submit(_stream_token_ids, http, first_token)
        assert first_token.wait(TIMEOUT_S)  # admitted to stories, and pinned to it
        loader.pause("stories")  # until the switch is over

        response = http.post("/admin/models/eos/activate")
        assert response.status_code == 202
        assert response.json()["status"] == "loading"
        assert loader.started["eos"].wait(TIMEOUT_S)
        assert _status(http, "eos")["status"] == "loading"

        # Requests that come during the switch wait for it...
        waiting: list[Future[Any]] = [
            pool.submit(_generate, http),
            pool.submit(
                oai.completions.create,
                model="eos",
                prompt=EOS_PROMPT,
                max_tokens=SHORT,
                temperature=0,
            ),
        ]
        time.sleep(0.5)
        assert not any(f.done() for f in waiting)
        assert not stream.done()

        # ... and are served by the new model once it is loaded.
        loader.let_go("eos")
        assert _token_ids(waiting[0].result(TIMEOUT_S)) == expected["eos"]
        completion = waiting[1].result(TIMEOUT_S)
        assert completion.model == "eos"
        assert completion.usage.completion_tokens == EOS_AT + 1
        assert completion.choices[0].finish_reason == "stop"
        statuses = _statuses(http)
        assert statuses["eos"] == "available"
        # The old model finishes the stream it was serving before it is unloaded.
        assert statuses["stories"] == "unloading"
        assert not stream.done()
        loader.resume("stories")
        assert stream.result(TIMEOUT_S) == expected["stories_long"]
    _wait_for(lambda: _status(http, "stories")["status"] == "unloaded")
    gc.collect()
    assert old_engine() is None  # its memory is freed

    assert http.get("/info").json()["model_id"] == "eos"
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["eos"]
    assert _token_ids(_generate(http)) == expected["eos"]
    assert _metric(http, "kiln_model_switches") == switches + 1
    assert _metric(http, 'kiln_model_status{model="eos",status="available"}') == 1
    assert _metric(http, 'kiln_model_status{model="stories",status="unloaded"}') == 1

    # And back.
    _switch_to(http, "stories")
    assert _token_ids(_generate(http)) == expected["stories"]
    assert http.get("/info").json()["model_id"] == "stories"


def test_a_switch_longer_than_the_wait_answers_503_with_retry_after(
    http: httpx.Client, loader: Loader, manager: ModelManager, expected: dict[str, list[int]]
):
    loader.hold("eos")
    assert http.post("/admin/models/eos/activate").status_code == 202
    manager.switch_wait_seconds = 0.2
    try:
        tgi = _generate(http)
        chat = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        )
    finally:
        manager.switch_wait_seconds = TIMEOUT_S
    assert tgi.status_code == 503
    assert int(tgi.headers["retry-after"]) >= 1
    assert tgi.json()["error_type"] == "unavailable"
    assert "eos" in tgi.json()["error"]
    assert chat.status_code == 503
    assert int(chat.headers["retry-after"]) >= 1
    assert chat.json()["error"]["type"] == "server_error"

    loader.let_go("eos")
    _wait_for(lambda: _status(http, "eos")["status"] == "available")
    assert _token_ids(_generate(http)) == expected["eos"]


def test_activating_another_model_during_a_switch_is_409(http: httpx.Client, loader: Loader):
    loader.hold("eos")
    assert http.post("/admin/models/eos/activate").status_code == 202
    response = http.post("/admin/models/broken/activate")
    assert response.status_code == 409
    assert response.json()["error_type"] == "conflict"
    assert "eos" in response.json()["error"]
    # Asking again for the model being loaded is no conflict.
    again = http.post("/admin/models/eos/activate")
    assert again.status_code == 202
    assert again.json()["status"] == "loading"
    loader.let_go("eos")
    _wait_for(lambda: _status(http, "eos")["status"] == "available")


def test_a_model_that_fails_to_load_is_failed_and_the_previous_keeps_serving(
    http: httpx.Client, loader: Loader, expected: dict[str, list[int]]
):
    failures = _metric(http, "kiln_model_load_failures")
    loader.hold("broken")
    assert http.post("/admin/models/broken/activate").status_code == 202
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_generate, http)  # comes during the switch: waits
        time.sleep(0.3)
        assert not waiting.done()
        loader.let_go("broken")
        # The switch failed: the request is served by the model that still serves.
        assert _token_ids(waiting.result(TIMEOUT_S)) == expected["stories"]

    status = _wait_for(lambda: (s := _status(http, "broken"))["status"] == "failed" and s)
    assert "no-such-model" in status["reason"]
    assert not status["active"]
    assert _status(http, "stories")["status"] == "available"
    assert http.get("/info").json()["model_id"] == "stories"
    assert _token_ids(_generate(http)) == expected["stories"]
    assert _metric(http, "kiln_model_load_failures") == failures + 1

    # A failed model may be activated again (and fails again: its path is still broken).
    assert http.post("/admin/models/broken/activate").status_code == 202
    _wait_for(lambda: _status(http, "broken")["status"] == "failed")


# --- unloading first (as on a GPU) ----------------------------------------------------------


@pytest.fixture(scope="module")
def tight_loader() -> Loader:
    return Loader()


@pytest.fixture(scope="module")
def tight_url(
    stories_dir: Path, eos_dir: Path, tight_loader: Loader, expected: dict[str, list[int]]
) -> Iterator[str]:
    """A server that drains and unloads a model before it loads the next, behind an API key."""
    manager = _manager(stories_dir, eos_dir, tight_loader, unload_first=True)
    with running_server(manager, ServerConfig(api_key=API_KEY)) as base:
        yield base


@pytest.fixture
def tight(tight_url: str, tight_loader: Loader) -> Iterator[httpx.Client]:
    auth = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=tight_url, timeout=TIMEOUT_S, headers=auth) as client:
        _switch_to(client, "stories")
        try:
            yield client
        finally:
            tight_loader.let_all_go()


def test_admin_routes_need_the_api_key(tight_url: str):
    with httpx.Client(base_url=tight_url, timeout=TIMEOUT_S) as client:
        assert client.get("/admin/models").status_code == 401
        assert client.post("/admin/models/eos/activate").status_code == 401
        assert client.get("/admin/models/eos").status_code == 401


def test_unload_first_drains_then_loads_and_puts_back_the_previous_on_failure(
    tight: httpx.Client, tight_loader: Loader, expected: dict[str, list[int]]
):
    with ThreadPoolExecutor(2) as pool:
        first_token = threading.Event()
        stream = pool.submit(_stream_token_ids, tight, first_token)
        assert first_token.wait(TIMEOUT_S)
        tight_loader.pause("stories")
        assert tight.post("/admin/models/eos/activate").status_code == 202
        waiting = pool.submit(_generate, tight)
        time.sleep(0.3)
        # Nothing loads while stories finishes its stream; the request that came waits.
        assert _statuses(tight) == {"stories": "unloading", "eos": "loading", "broken": "unloaded"}
        assert not waiting.done()
        tight_loader.resume("stories")
        assert stream.result(TIMEOUT_S) == expected["stories_long"]
        assert _token_ids(waiting.result(TIMEOUT_S)) == expected["eos"]
    _wait_for(lambda: _status(tight, "eos")["status"] == "available")
    assert _status(tight, "stories")["status"] == "unloaded"
    assert tight.get("/info").json()["model_id"] == "eos"

    # A model that fails to load after the previous one was unloaded: the previous comes back.
    assert tight.post("/admin/models/broken/activate").status_code == 202
    _wait_for(lambda: _status(tight, "broken")["status"] == "failed")
    _wait_for(lambda: _status(tight, "eos")["status"] == "available")
    assert _token_ids(_generate(tight)) == expected["eos"]


# --- kiln serve -----------------------------------------------------------------------------


def test_kiln_serve_with_two_models(stories_dir: Path, eos_dir: Path, tmp_path: Path):
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": [{"name": "eos", "model": str(eos_dir)}]}))
    with (
        kiln_serve(stories_dir, tmp_path, "--models-config", str(config)) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as client,
    ):
        assert _statuses(client) == {"stories260K": "available", "eos": "unloaded"}
        _switch_to(client, "eos")
        assert client.get("/info").json()["model_id"] == "eos"
