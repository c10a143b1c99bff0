"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), on a real
server on loopback (stories260K): valid and invalid requests to every route answer a documented
status (never a 5xx), with the documented content type and a body that matches its schema;
streams are complete and well-formed; afterwards the engine is idle and still answers correctly.

Generation is capped at a few tokens per choice (``_cap_generation``), so the run stays short on
CPU; the examples are derandomized, so a failure reproduces.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from pydantic import BaseModel, ValidationError

from kiln import LLM, SamplingParams
from kiln.config.server import ServerConfig
from kiln.server.openai.schemas import ChatCompletionChunk, CompletionChunk, OpenAIErrorResponse
from kiln.server.tgi.schemas import ErrorResponse, StreamResponse
from server_harness import running_server

MAX_EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "30"))
"""Examples per operation; set KILN_FUZZ_EXAMPLES higher for a deeper (slower) search."""
MAX_BODY_BYTES = 64 << 10
MAX_TOKENS = 3
"""Tokens per choice a fuzzed request may generate: what keeps fuzzing fast on CPU."""
PROMPT = "Lily and Max went to the park."
TIMEOUT_S = 30.0


def _llm(path: Path) -> LLM:
    # chatml: stories260K has no chat template of its own, and chat requests should get past it.
    return LLM(str(path), chat_template="chatml", kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def reference(stories_dir: Path) -> LLM:
    return _llm(stories_dir)


@pytest.fixture(scope="module")
def url(stories_dir: Path) -> Iterator[str]:
    config = ServerConfig(max_body_bytes=MAX_BODY_BYTES)
    with running_server(_llm(stories_dir), config) as base:
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        yield client


OPERATIONS = [
    "GET /health",
    "GET /metrics",
    "POST /",
    "POST /generate",
    "POST /generate_stream",
    "GET /info",
    "POST /tokenize",
    "GET /infer",
    "GET /v1/models",
    "GET /v1/models/{model}",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "GET /admin/models",
    "GET /admin/models/{name}",
    "POST /admin/models/{name}/activate",
]


@pytest.fixture(scope="module")
def api_schema(url: str) -> Any:
    config = schemathesis.Config.from_dict(
        {"max-stream-events": 100_000, "request-timeout": TIMEOUT_S}
    )
    return schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_openapi_schema_is_valid_and_documents_the_api(http: httpx.Client) -> None:
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    doc = http.get("/openapi.json").json()
    assert [e.message for e in OPENAPI_31_VALIDATOR.iter_errors(doc)] == []
    components = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.removeprefix("#/components/schemas/") in components, ref
    # The request bodies are the models the routes parse.
    posts = {path: item["post"] for path, item in doc["paths"].items() if "post" in item}
    bodies = {
        path: op["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        for path, op in posts.items()
        if "requestBody" in op
    }
    assert bodies == {
        "/": "CompatGenerateRequest",
        "/generate": "GenerateRequest",
        "/generate_stream": "GenerateRequest",
        "/tokenize": "TokenizeRequest",
        "/v1/chat/completions": "ChatCompletionRequest",
        "/v1/completions": "CompletionRequest",
    }
    assert "max_new_tokens" in components["GenerateParameters"]["properties"]
    assert "messages" in components["ChatCompletionRequest"]["properties"]
    # Responses document their fields, not a bare object.
    for name in ("GenerateResponse", "Details", "Token", "Info", "SimpleToken", "ErrorResponse"):
        assert components[name].get("properties"), name
    # Streams are documented as such.
    for path in ("/", "/generate_stream", "/v1/completions", "/v1/chat/completions"):
        assert "text/event-stream" in posts[path]["responses"]["200"]["content"], path


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    labels = {op.ok().label for op in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


def _cap(target: dict[str, Any], key: str, *, absent_too: bool) -> None:
    value = target.get(key)
    if (value is None and (key in target or absent_too)) or (
        type(value) is int and value > MAX_TOKENS
    ):
        target[key] = MAX_TOKENS


def _cap_generation(case: Any) -> None:
    """At most ``MAX_TOKENS`` tokens per choice; only for bodies of the right shape (a wrong
    type is left as it is, to be refused)."""
    body = case.body
    if not isinstance(body, dict):
        return
    if case.path in ("/", "/generate", "/generate_stream"):
        if "parameters" not in body or body["parameters"] is None:
            body["parameters"] = {"do_sample": True}  # what an absent `parameters` means
        if isinstance(body["parameters"], dict):
            _cap(body["parameters"], "max_new_tokens", absent_too=True)
    elif case.path in ("/v1/completions", "/v1/chat/completions"):
        # Absent: 16 tokens for completions, all the context for chat.
        _cap(body, "max_tokens", absent_too=case.path == "/v1/completions")
        _cap(body, "max_completion_tokens", absent_too=case.path == "/v1/chat/completions")


def _events(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^data: ?(.*)$", text, re.MULTILINE)]


def _valid(model: type[BaseModel], data: str) -> bool:
    try:
        model.model_validate_json(data)
    except ValidationError:
        return False
    return True


def _check_event_stream(path: str, text: str) -> None:
    """Every event matches its model, and the stream ends as it should."""
    events = _events(text)
    assert events, "an empty event stream"
    if path.startswith("/v1/"):
        chunk = ChatCompletionChunk if path.endswith("chat/completions") else CompletionChunk
        assert events[-1] == "[DONE]", events[-3:]
        for data in events[:-1]:
            assert _valid(chunk, data) or _valid(OpenAIErrorResponse, data), data
    else:
        for data in events[:-1]:
            assert _valid(StreamResponse, data), data
            assert json.loads(data).get("generated_text") is None, data
        last = events[-1]
        assert (
            _valid(StreamResponse, last) and json.loads(last)["generated_text"] is not None
        ) or _valid(ErrorResponse, last), last


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_request_breaks_the_api(api_schema: Any, url: str, label: str) -> None:
    """Valid and invalid requests (schemathesis's positive and negative modes) answer a
    documented status, never a 5xx, with the documented content type and shape."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    operation = api_schema.find_operation_by_label(label)
    modes = schemathesis.GenerationMode
    cases = hypothesis.strategies.one_of(
        operation.as_strategy(modes.POSITIVE), operation.as_strategy(modes.NEGATIVE)
    )

    @hypothesis.given(case=cases)
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same examples every run
        database=None,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=True,
    )
    def fuzz(case: Any) -> None:
        _cap_generation(case)
        response = case.call_and_validate(base_url=url, checks=checks)
        content_type = response.headers.get("content-type", [""])
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        if response.status_code == 200 and content_type.startswith("text/event-stream"):
            _check_event_stream(case.path, response.text)

    fuzz()


# --- bodies no schema can describe ----------------------------------------------------------

POST_ROUTES = [
    "/",
    "/generate",
    "/generate_stream",
    "/tokenize",
    "/v1/completions",
    "/v1/chat/completions",
]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"inputs": "x", "prompt": "x", "messages": [',
        b"",
        b"null",
        b"[]",
        b'"a string"',
        b"\xff\xfe\x00{",
        b'{"inputs": "\xff\xfe", "prompt": "\xc3\x28", "messages": [{"role": "user"}]}',
        b'{"inputs": "\\ud800", "prompt": "\\ud800"}',
        b'{"inputs": 1e999, "prompt": 1e999, "max_tokens": 1e999}',
        b'{"inputs": NaN, "prompt": NaN, "messages": NaN}',
        b'{"inputs": {"a": [[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]}, "prompt": [[1.5]]}',
        b'{"inputs": "' + b"a" * MAX_BODY_BYTES + b'"}',
    ],
    ids=lambda v: v[:20].decode("latin-1"),
)
@pytest.mark.parametrize("path", POST_ROUTES)
def test_malformed_bodies_answer_4xx(http: httpx.Client, path: str, content: bytes) -> None:
    response = http.post(path, content=content, headers={"content-type": "application/json"})

    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()


@pytest.mark.parametrize("path", POST_ROUTES)
def test_a_huge_chunked_body_answers_413(http: httpx.Client, path: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "x", "prompt": "x", "pad": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 1):
            yield b"a" * 4096
        yield b'"}'

    response = http.post(path, content=chunks(), headers={"content-type": "application/json"})

    assert response.status_code == 413, response.text


def test_a_huge_declared_length_answers_413_before_the_body(url: str) -> None:
    # The body never comes: the server must answer from the headers alone.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1099511627776\r\n\r\n{}"
        )
        status_line = sock.makefile("rb").readline()
    assert status_line.split()[1] == b"413", status_line


# --- after all that -------------------------------------------------------------------------


def _metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_the_server_is_idle_and_still_correct_afterwards(http: httpx.Client, reference: LLM):
    deadline = time.monotonic() + 10
    gauges = (
        "kiln_kv_cache_blocks_used",
        "tgi_batch_current_size",
        "tgi_queue_size",
        "kiln_requests_in_flight",
    )
    while any(_metric(http, g) for g in gauges):
        assert time.monotonic() < deadline, {g: _metric(http, g) for g in gauges}
        time.sleep(0.05)
    assert http.get("/health").status_code == 200
    (expected,) = reference.generate([PROMPT], SamplingParams(temperature=0.0, max_new_tokens=12))

    tgi = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}})
    openai = http.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    )

    assert tgi.status_code == 200, tgi.text
    assert tgi.json()["generated_text"] == expected.text
    assert openai.status_code == 200, openai.text
    assert openai.json()["choices"][0]["text"] == expected.text
