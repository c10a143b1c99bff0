"""The serving layer under both APIs, on a real server on loopback: defaults from the model's
generation_config.json, errors shaped by the route that answers them, blocking work kept off
the event loop, and the defects found by trying kiln as a new user would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine_probes import fail_steps_after, record_sampling_params
from kiln import LLM, SamplingParams
from kiln.config.server import ServerConfig
from kiln.serving.served_model import ServedModel
from model_copies import stories_with_sampling_defaults
from server_harness import running_server

PROMPT = "Lily and Max went to the park."
API_KEY = "s3cret"
JSON = {"Content-Type": "application/json"}
GENERATION_DEFAULTS = {
    "temperature": 0.5,
    "top_k": 7,
    "top_p": 0.8,
    "repetition_penalty": 1.3,
    "max_new_tokens": 9,
}


@pytest.fixture(scope="module")
def tuned_dir(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K whose generation_config.json sets sampling defaults."""
    dest = tmp_path_factory.mktemp("stories_tuned")
    return stories_with_sampling_defaults(stories_dir, dest, GENERATION_DEFAULTS)


@pytest.fixture(scope="module")
def tuned_llm(tuned_dir: Path) -> LLM:
    return LLM(str(tuned_dir), kv_cache_memory=16 << 20, chat_template="chatml")


@pytest.fixture(scope="module")
def url(tuned_llm: LLM) -> Iterator[str]:
    config = ServerConfig(model_id="tuned", api_key=API_KEY, max_body_bytes=64 << 10)
    with running_server(tuned_llm, config) as base:
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
        yield client


@pytest.fixture
def received(tuned_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[SamplingParams]:
    """The SamplingParams of every request the engine receives (it still runs them)."""
    return record_sampling_params(tuned_llm, monkeypatch)


# --- sampling defaults ----------------------------------------------------------------------


def test_openai_requests_take_the_models_defaults_for_what_they_omit(
    http: httpx.Client, received: list[SamplingParams]
):
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    body = {"prompt": PROMPT, "temperature": 0.9, "top_k": 3}
    assert http.post("/v1/completions", json=body).status_code == 200

    chat, completion = received
    assert (chat.temperature, chat.top_k, chat.top_p) == (0.5, 7, 0.8)
    assert (chat.repetition_penalty, chat.max_new_tokens) == (1.3, 9)
    # What a request sets wins; what it leaves out still comes from the model.
    assert (completion.temperature, completion.top_k, completion.top_p) == (0.9, 3, 0.8)
    assert completion.max_new_tokens == 9


def test_tgi_requests_take_the_models_defaults_when_sampling(
    http: httpx.Client, received: list[SamplingParams]
):
    sampled = {"inputs": PROMPT, "parameters": {"do_sample": True, "top_k": 2}}
    assert http.post("/generate", json=sampled).status_code == 200
    greedy = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    assert http.post("/generate", json=greedy).status_code == 200

    sampling, plain = received
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.5, 2, 0.8)
    assert (sampling.repetition_penalty, sampling.max_new_tokens) == (1.3, 9)
    # A model's default temperature does not turn sampling on: TGI's request decides.
    assert plain.greedy and plain.max_new_tokens == 3 and plain.repetition_penalty == 1.3


def test_info_and_models_say_which_defaults_apply(http: httpx.Client):
    assert http.get("/info").json()["sampling_defaults"] == GENERATION_DEFAULTS
    (card,) = http.get("/v1/models").json()["data"]
    assert card["sampling_defaults"] == GENERATION_DEFAULTS


# --- errors: status, shape and headers ------------------------------------------------------


def test_401_names_the_bearer_scheme_and_the_scheme_is_case_insensitive(url: str):
    for path in ("/info", "/v1/models"):
        response = httpx.get(url + path)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/models").json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/info").json()["error_type"] == "authentication"
    for scheme in ("bearer", "BEARER", "Bearer"):
        headers = {"Authorization": f"{scheme} {API_KEY}"}
        assert httpx.get(url + "/info", headers=headers).status_code == 200
    assert httpx.get(url + "/info", headers={"Authorization": API_KEY}).status_code == 401


def test_a_body_too_large_on_openai_routes_is_an_invalid_request(http: httpx.Client):
    body = {"prompt": "x" * (80 << 10)}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_a_body_that_is_not_utf8_is_invalid_input(http: httpx.Client, path: str):
    body = b'{"inputs": "\xff\xfe", "prompt": "\xff"}'
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    if path == "/generate":
        assert response.status_code == 422
        assert response.json()["error_type"] == "validation"
    else:
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert "UTF-8" in response.text


def test_a_lone_surrogate_in_a_stop_string_is_refused_by_both_apis(http: httpx.Client):
    raw = '{"inputs": "Hi", "parameters": {"stop": ["a\\ud800"]}}'
    response = http.post("/generate", content=raw, headers=JSON)
    assert response.status_code == 422
    assert "stop" in response.json()["error"]
    raw = '{"prompt": "Hi", "stop": ["a\\ud800"]}'
    response = http.post("/v1/completions", content=raw, headers=JSON)
    assert response.status_code == 400


def test_completions_refuse_a_response_format_they_cannot_honour(http: httpx.Client):
    body = {"prompt": PROMPT, "response_format": {"type": "json_object"}}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"
    text = {"prompt": PROMPT, "max_tokens": 2, "response_format": {"type": "text"}}
    assert http.post("/v1/completions", json=text).status_code == 200


def test_an_engine_failure_on_openai_routes_is_a_typed_error(
    url: str, tuned_llm: LLM, monkeypatch: pytest.MonkeyPatch
):
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    fail_steps_after(tuned_llm, monkeypatch, 2)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="tuned", prompt=PROMPT, max_tokens=20)
    assert e.value.status_code == 500
    error = e.value.body
    assert isinstance(error, dict)
    assert error["code"] == "generation"
    assert error["message"] == "Request failed during generation: boom"

    monkeypatch.undo()
    fail_steps_after(tuned_llm, monkeypatch, 3)
    stream = client.completions.create(model="tuned", prompt=PROMPT, max_tokens=20, stream=True)
    with pytest.raises(openai.APIError, match="boom"):
        list(stream)


# --- nothing heavy on the event loop --------------------------------------------------------


@pytest.fixture
def where_prompts_are_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """For each prompt tokenized or rendered: ``loop`` if on the event loop, else ``thread``."""
    seen: list[str] = []

    def on_loop() -> str:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return "thread"
        return "loop"

    encode, render_chat = ServedModel.encode, ServedModel.render_chat

    def spy_encode(self: ServedModel, text: str) -> list[int]:
        seen.append(on_loop())
        return encode(self, text)

    def spy_render(self: ServedModel, messages: Any, budget: int) -> list[int]:
        seen.append(on_loop())
        return render_chat(self, messages, budget)

    monkeypatch.setattr(ServedModel, "encode", spy_encode)
    monkeypatch.setattr(ServedModel, "render_chat", spy_render)
    return seen


def test_prompts_are_tokenized_and_rendered_off_the_event_loop(
    http: httpx.Client, where_prompts_are_built: list[str]
):
    small = {"max_new_tokens": 2}
    assert http.post("/generate", json={"inputs": "Hi", "parameters": small}).status_code == 200
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    messages = [{"role": "user", "content": "Hi"}]
    body = {"messages": messages, "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert where_prompts_are_built == ["thread", "thread", "thread"]


def test_a_huge_chat_keeps_the_server_responsive(tuned_llm: LLM):
    """80k messages (a ~2 MB body): while the server renders and truncates them on a worker
    thread, /health keeps answering (each within a 4 s timeout; it used to stall 5-11 s, the
    whole rendering)."""
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(80_000)
    ]

    async def main(base: str) -> tuple[httpx.Response, int]:
        async with httpx.AsyncClient(base_url=base, timeout=300.0) as client:
            body = {"messages": messages, "max_tokens": 1}
            big = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            answered = 0
            while not big.done():
                response = await client.get("/health", timeout=4.0)
                assert response.status_code == 200
                answered += 1
                await asyncio.sleep(0.05)
            return await big, answered

    with running_server(tuned_llm, ServerConfig(max_body_bytes=8 << 20)) as base:
        response, answered = asyncio.run(main(base))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] < 512  # the oldest exchanges were dropped
    assert answered >= 3  # it was in flight long enough for /health to be asked meanwhile


@pytest.mark.parametrize(
    ("path", "openai_shape"),
    [("/v1/nothing-here", True), ("/v1/models/a%0Ab", True), ("/nothing-here", False)],
)
def test_a_path_no_route_matches_answers_in_its_routers_shape(
    http: httpx.Client, path: str, openai_shape: bool
):
    response = http.get(path)
    assert response.status_code == 404
    error = response.json()["error"]
    assert isinstance(error, dict) == openai_shape, error
