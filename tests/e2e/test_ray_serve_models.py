"""Several models on a real local Ray cluster: one deployment per model behind one ingress.

The module deploys stories260K twice, under two model ids (one replica each, half a CPU and
one torch thread), and checks through Ray's HTTP proxy that a client with one base URL picks
the model with the request's ``model``: answers name it, streams stream, ``/v1/models`` lists
both, an unknown model is OpenAI's 404 naming both, TGI routes go to the default (first) model.

NOTE: ``ray`` is imported plainly: it is in the ``test`` extra, so a missing Ray is a failure.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from kiln.deploy.config import (
    INGRESS_DEPLOYMENT_NAME,
    ModelDeployment,
    RayServeConfig,
    ReplicaConfig,
    ReplicaResources,
)
from kiln.deploy.ray_serve import REPLICA_HEADER, run

APP = "kiln-models"
MODELS = ("stories-a", "stories-b")
PROMPT = "Once upon a time"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def url(cluster: None, stories_dir: Path) -> str:
    def replica(model_id: str) -> ReplicaConfig:
        return ReplicaConfig(
            model=str(stories_dir),
            model_id=model_id,
            threads=1,
            engine={"kv_cache_memory": 16 << 20, "chat_template": "chatml"},
        )

    resources = ReplicaResources(num_cpus=0.5)
    config = RayServeConfig(
        replica=replica(MODELS[0]),
        resources=resources,
        more_models=(ModelDeployment(replica=replica(MODELS[1]), resources=resources),),
        ingress_num_cpus=0.1,
        app_name=APP,
        host="127.0.0.1",
        port=_free_port(),
    )
    return run(config)


def _chat(url: str, model: str, **more: object) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 6,
        "temperature": 0,
        **more,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_each_model_answers_under_its_own_id(url: str) -> None:
    answers = {model: _chat(url, model) for model in MODELS}
    for model, r in answers.items():
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        assert r.json()["choices"][0]["message"]["content"]
    # Each model has its own deployment, hence its own replica.
    assert len({r.headers[REPLICA_HEADER] for r in answers.values()}) == 2
    status = serve.status().applications[APP]
    assert set(status.deployments) == {INGRESS_DEPLOYMENT_NAME, *(f"kiln-{m}" for m in MODELS)}


def test_completion_stream_of_the_second_model(url: str) -> None:
    body = {"model": MODELS[1], "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    plain = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert plain.status_code == 200 and plain.json()["model"] == MODELS[1]
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[5:]) for line in lines[:-1]]
    assert len(events) >= 2  # streamed in pieces, not one late answer
    assert {e["model"] for e in events} == {MODELS[1]}
    assert "".join(e["choices"][0]["text"] for e in events) == plain.json()["choices"][0]["text"]


def test_models_lists_both(url: str) -> None:
    r = httpx.get(f"{url}/v1/models", timeout=60)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == list(MODELS)
    one = httpx.get(f"{url}/v1/models/{MODELS[1]}", timeout=60)
    assert one.status_code == 200 and one.json()["id"] == MODELS[1]


def test_unknown_model_is_openais_404_naming_both(url: str) -> None:
    r = _chat(url, "no-such-model")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no-such-model" in error["message"]
    assert all(f"`{m}`" in error["message"] for m in MODELS)
    assert httpx.get(f"{url}/v1/models/no-such-model", timeout=60).status_code == 404


def test_tgi_routes_and_nameless_requests_go_to_the_default_model(url: str) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    r = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["generated_text"]
    info = httpx.get(f"{url}/info", timeout=60)
    assert info.status_code == 200 and info.json()["model_id"] == MODELS[0]
    nameless = httpx.post(
        f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60
    )
    assert nameless.status_code == 200 and nameless.json()["model"] == MODELS[0]
    # A bad body reaches the default model, which answers it as kiln serve does.
    bad = httpx.post(f"{url}/v1/chat/completions", content=b"{", timeout=60)
    assert bad.status_code == 400
