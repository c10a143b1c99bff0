"""The request schemas say exactly what the server accepts, on a real server on loopback
(stories260K).

* ``null`` for an optional field means its default, as OpenAI's API has it (its ``openai``
  client sends ``null`` for a parameter given as ``None``): checked with that client on the
  wire, and for every field the served ``/openapi.json`` marks nullable.
* The served schema documents the checks the handlers make (``minLength``, ``minimum``,
  ``maxItems``...): for each boundary, the schema's verdict on a body (``jsonschema_rs``,
  OpenAPI 3.1's JSON Schema dialect) is the server's, and a refusal still carries the handlers'
  own message (TGI's ``Input validation error: ...``) or ``param`` (OpenAI).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs  # comes with schemathesis, a declared test dependency
import openai
import pytest

from kiln import LLM, SamplingParams
from kiln.config.server import ServerConfig
from kiln.server.openai.schemas import MAX_CHOICES
from kiln.server.tgi import validation
from model_copies import stories_with_sampling_defaults
from server_harness import running_server

STORY = "Once upon a time, there was a little girl named Lily. She loved to"
STORY_CHAT = [{"role": "user", "content": "Tell me a story."}]
TGI_ERROR_PREFIX = "Input validation error: "


@pytest.fixture(scope="module")
def stories(stories_dir: Path) -> LLM:
    return LLM(
        str(stories_dir),
        dtype="float32",
        device="cpu",
        chat_template="chatml",
        kv_cache_memory=16 << 20,
    )


@pytest.fixture(scope="module")
def url(stories: LLM) -> Iterator[str]:
    with running_server(stories, ServerConfig(model_id="stories")) as base:
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def doc(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def _component(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["components"]["schemas"][name]


def _body_schema(doc: dict[str, Any], path: str) -> str:
    """The name of the component ``path`` documents as its request body."""
    ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return ref["$ref"].removeprefix("#/components/schemas/")


def _branch(prop: dict[str, Any], kind: str) -> dict[str, Any]:
    """The branch of a property's schema for JSON type ``kind``."""
    (branch,) = [b for b in prop.get("anyOf", [prop]) if b.get("type") == kind]
    return branch


def _admits_null(prop: dict[str, Any]) -> bool:
    if prop.get("type") == "null" or None in prop.get("enum", [0]):
        return True
    return any(_admits_null(b) for b in prop.get("anyOf", ()))


# --- null means the default ------------------------------------------------------------------

# OpenAI's nullable parameters (its openapi spec; Optional[...] in the `openai` client's types),
# then vLLM's extra ones kiln takes.
OPENAI_NULLABLE_CHAT = {
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_logprobs",
    "top_p",
}
OPENAI_NULLABLE_COMPLETION = {
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
}
EXTENSIONS_NULLABLE = {
    "ignore_eos",
    "min_p",
    "min_tokens",
    "repetition_penalty",
    "skip_special_tokens",
    "stop_token_ids",
    "top_k",
}


class _Wire:
    """The JSON bodies an ``httpx.Client`` sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> None:
        self.bodies.append(json.loads(request.content))


@pytest.fixture
def wire() -> _Wire:
    return _Wire()


@pytest.fixture
def client(url: str, wire: _Wire) -> Iterator[openai.OpenAI]:
    with httpx.Client(event_hooks={"request": [wire]}, timeout=60.0) as http_client:
        yield openai.OpenAI(
            base_url=url + "/v1", api_key="x", max_retries=0, http_client=http_client
        )


def test_the_schema_marks_openai_nullable_fields_nullable(doc: dict[str, Any]) -> None:
    for name, nullable in [
        ("ChatCompletionRequest", OPENAI_NULLABLE_CHAT | EXTENSIONS_NULLABLE),
        ("CompletionRequest", OPENAI_NULLABLE_COMPLETION | EXTENSIONS_NULLABLE),
    ]:
        properties = _component(doc, name)["properties"]
        assert {p for p in nullable if not _admits_null(properties[p])} == set(), name
    (options,) = [
        b
        for b in _component(doc, "ChatCompletionRequest")["properties"]["stream_options"]["anyOf"]
        if "$ref" in b
    ]
    stream_options = _component(doc, options["$ref"].split("/")[-1])
    assert _admits_null(stream_options["properties"]["include_usage"])


def test_openai_client_nulls_chat(client: openai.OpenAI, wire: _Wire) -> None:
    nulls: dict[str, Any] = {
        "n": None,
        "frequency_penalty": None,
        "presence_penalty": None,
        "logprobs": None,
        "top_logprobs": None,
        "stream": None,
        "stream_options": None,
        "temperature": None,
        "top_p": None,
        "stop": None,
        "logit_bias": None,
    }
    extensions = dict.fromkeys(EXTENSIONS_NULLABLE)
    base = {"model": "stories", "messages": STORY_CHAT, "max_tokens": 6, "seed": 11}

    with_nulls = client.chat.completions.create(**base, **nulls, extra_body=extensions)
    without = client.chat.completions.create(**base)

    # The client sends the nulls as they were given (it drops only NOT_GIVEN).
    sent, plain = wire.bodies
    assert {k: sent[k] for k in [*nulls, *extensions]} == dict.fromkeys([*nulls, *extensions])
    assert set(plain) == {"model", "messages", "max_tokens", "seed"}
    # null means the default: the same (seeded, sampled at temperature 1) answer.
    assert len(with_nulls.choices) == 1
    assert with_nulls.choices[0].logprobs is None
    assert with_nulls.choices[0].message.content == without.choices[0].message.content
    assert with_nulls.choices[0].finish_reason == without.choices[0].finish_reason
    assert with_nulls.usage == without.usage


def test_openai_client_nulls_completion(client: openai.OpenAI, wire: _Wire) -> None:
    nulls: dict[str, Any] = {
        "echo": None,
        "n": None,
        "presence_penalty": None,
        "frequency_penalty": None,
        "logprobs": None,
        "best_of": None,
        "suffix": None,
        "stream": None,
        "stream_options": None,
        "temperature": None,
        "top_p": None,
        "stop": None,
        "logit_bias": None,
    }
    extensions = dict.fromkeys(EXTENSIONS_NULLABLE)
    base = {"model": "stories", "prompt": STORY, "max_tokens": 6, "seed": 3}

    with_nulls = client.completions.create(**base, **nulls, extra_body=extensions)
    without = client.completions.create(**base)

    sent, plain = wire.bodies
    assert {k: sent[k] for k in [*nulls, *extensions]} == dict.fromkeys([*nulls, *extensions])
    assert set(plain) == {"model", "prompt", "max_tokens", "seed"}
    assert len(with_nulls.choices) == 1
    assert with_nulls.choices[0].logprobs is None
    assert with_nulls.choices[0].text == without.choices[0].text  # echo off: no prompt
    assert with_nulls.usage == without.usage


def test_openai_client_null_include_usage_streams_without_usage(
    client: openai.OpenAI, wire: _Wire
) -> None:
    chunks = list(
        client.completions.create(
            model="stories",
            prompt=STORY,
            max_tokens=4,
            temperature=0,
            n=None,
            stream=True,
            stream_options={"include_usage": None},  # type: ignore[typeddict-item]
        )
    )

    assert wire.bodies[0]["stream_options"] == {"include_usage": None}
    assert chunks and all(c.usage is None for c in chunks)
    assert {c.choices[0].index for c in chunks} == {0}


GENERATION_DEFAULTS = {"repetition_penalty": 1.8, "min_p": 0.05}


@pytest.fixture(scope="module")
def tuned_dir(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K whose generation_config.json sets sampling defaults."""
    dest = tmp_path_factory.mktemp("stories_tuned")
    return stories_with_sampling_defaults(stories_dir, dest, GENERATION_DEFAULTS)


def test_null_means_the_checkpoints_default_as_absent_does(tuned_dir: Path) -> None:
    llm = LLM(str(tuned_dir), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    (tuned,) = llm.generate([STORY], greedy.replace(**GENERATION_DEFAULTS))
    (plain,) = llm.generate([STORY], greedy)
    assert tuned.text != plain.text  # the checkpoint's defaults change this answer

    def complete(base: str, **fields: Any) -> str:
        body = {"prompt": STORY, "max_tokens": 16, "temperature": 0, **fields}
        response = httpx.post(base + "/v1/completions", json=body, timeout=60.0)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    with running_server(llm, ServerConfig(model_id="tuned")) as base:
        assert complete(base) == tuned.text
        assert complete(base, repetition_penalty=None, min_p=None) == tuned.text
        assert complete(base, repetition_penalty=1.0, min_p=0.0) == plain.text


ROUTE_BASES: dict[str, dict[str, Any]] = {
    "/generate": {"inputs": STORY, "parameters": {"max_new_tokens": 2}},
    "/": {"inputs": STORY, "parameters": {"max_new_tokens": 2}},
    "/v1/completions": {"model": "stories", "prompt": STORY, "max_tokens": 2},
    "/v1/chat/completions": {"model": "stories", "messages": STORY_CHAT, "max_tokens": 2},
}


@pytest.mark.parametrize("path", list(ROUTE_BASES))
def test_every_field_the_schema_makes_nullable_takes_null(
    http: httpx.Client, doc: dict[str, Any], path: str
) -> None:
    """Each optional field the served schema marks nullable, sent as ``null`` on its own, is
    accepted (TGI's ``parameters`` too)."""
    base = ROUTE_BASES[path]
    schema = _component(doc, _body_schema(doc, path))
    fields = [(None, name, p) for name, p in schema["properties"].items()]
    if "parameters" in base:
        parameters = _component(doc, "GenerateParameters")["properties"]
        fields += [("parameters", name, p) for name, p in parameters.items()]
    tried = []
    for parent, name, prop in fields:
        if not _admits_null(prop) or name in schema.get("required", ()):
            continue
        body = json.loads(json.dumps(base))
        target = body[parent] if parent else body
        target[name] = None
        if name == "max_tokens" and path == "/v1/chat/completions":
            body["max_completion_tokens"] = 2  # null max_tokens: all the context otherwise
        response = http.post(path, json=body)
        assert response.status_code == 200, (name, response.text)
        tried.append(name)
    assert len(tried) >= 5, tried


# --- documented checks: the schema's verdict is the server's ---------------------------------

GEN, COMP, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"

# (path, what to change in the route's base body, refused?, TGI message part or OpenAI param)
CASES: list[tuple[str, dict[str, Any], bool, str | None]] = [
    # TGI: checked by validation.py, with TGI's messages.
    (GEN, {"inputs": ""}, True, "`inputs` cannot be empty"),
    (GEN, {"inputs": "L"}, False, None),
    ("/", {"inputs": ""}, True, "`inputs` cannot be empty"),
    (GEN, {"parameters.truncate": 0}, True, "`truncate` must be strictly positive"),
    (GEN, {"parameters.truncate": -3}, True, "`truncate` must be strictly positive"),
    (GEN, {"parameters.truncate": 1}, False, None),
    (GEN, {"parameters.best_of": 0}, True, "`best_of` != 1"),
    (GEN, {"parameters.best_of": 2}, True, "`best_of` != 1"),
    (GEN, {"parameters.best_of": 1}, False, None),
    (GEN, {"parameters.frequency_penalty": -2.0}, False, None),
    (GEN, {"parameters.frequency_penalty": 2.5}, True, "`frequency_penalty` must be"),
    (GEN, {"parameters.max_new_tokens": 1}, False, None),
    (GEN, {"parameters.max_new_tokens": 0}, True, "`max_new_tokens` must be strictly"),
    (GEN, {"parameters.repetition_penalty": 0.5}, False, None),
    (GEN, {"parameters.repetition_penalty": 0.0}, True, "`repetition_penalty` must"),
    (GEN, {"parameters.seed": 0}, False, None),
    (GEN, {"parameters.seed": 2**64 - 1}, False, None),
    (GEN, {"parameters.seed": -1}, True, "`seed` must be >= 0"),
    # NOTE: not 2**64: FastAPI writes the bound as a float (2**64 - 1 rounds to 2**64), and
    # validators compare such integers as floats too; test_tgi_api checks the server refuses it.
    (GEN, {"parameters.stop": ["a", "b", "c", ""]}, False, None),
    (GEN, {"parameters.stop": ["a", "b", "c", "d", "e"]}, True, "`stop` supports up to"),
    (GEN, {"parameters.temperature": 0.5}, False, None),
    (GEN, {"parameters.temperature": 0.0}, True, "`temperature` must be strictly"),
    (GEN, {"parameters.top_k": 1}, False, None),
    (GEN, {"parameters.top_k": 0}, True, "`top_k` must be strictly positive"),
    (GEN, {"parameters.top_n_tokens": 0}, False, None),
    (GEN, {"parameters.top_n_tokens": 5, "parameters.details": True}, False, None),
    (GEN, {"parameters.top_n_tokens": 6}, True, "`top_n_tokens` must be"),
    (GEN, {"parameters.top_n_tokens": -1}, True, "`top_n_tokens` must be"),
    (GEN, {"parameters.top_p": 0.99}, False, None),
    (GEN, {"parameters.top_p": 1.0}, True, "`top_p` must be > 0.0 and < 1.0"),
    (GEN, {"parameters.top_p": 0.0}, True, "`top_p` must be > 0.0 and < 1.0"),
    (GEN, {"parameters.typical_p": 0.5}, False, None),
    (GEN, {"parameters.typical_p": 1.0}, True, "`typical_p` must be > 0.0 and < 1.0"),
    (GEN, {"parameters.watermark": False}, False, None),
    (GEN, {"parameters.watermark": True}, True, "`watermark` is not supported"),
    (GEN, {"parameters.adapter_id": "lora"}, True, "`adapter_id` is not supported"),
    (GEN, {"parameters.grammar": {"type": "regex", "value": "a"}}, True, "grammar"),
    # OpenAI completions: the handlers' checks, each with its `param`.
    (COMP, {"prompt": ""}, True, "prompt"),
    (COMP, {"prompt": []}, True, "prompt"),
    (COMP, {"prompt": [""]}, True, "prompt"),
    (COMP, {"prompt": ["Lily", ""]}, True, "prompt"),
    (COMP, {"prompt": [[]]}, True, "prompt"),
    (COMP, {"prompt": [[5, 6], []]}, True, "prompt"),
    (COMP, {"prompt": [-1]}, True, "prompt"),
    (COMP, {"prompt": ["a"] * (MAX_CHOICES + 1)}, True, "n"),
    (COMP, {"prompt": "L"}, False, None),
    (COMP, {"prompt": ["Lily", "Max"]}, False, None),
    (COMP, {"prompt": [5, 6]}, False, None),
    (COMP, {"prompt": [[5, 6], [7]]}, False, None),
    (COMP, {"min_tokens": -1}, True, "min_tokens"),
    (COMP, {"min_tokens": 0}, False, None),
    (COMP, {"min_tokens": 2}, False, None),
    (COMP, {"n": 0}, True, "n"),
    (COMP, {"best_of": 1}, False, None),
    (COMP, {"best_of": 2}, True, "best_of"),
    (COMP, {"suffix": ""}, False, None),
    (COMP, {"suffix": "The end."}, True, "suffix"),
    (COMP, {"logit_bias": {}}, False, None),
    (COMP, {"logit_bias": {"5": 1.0}}, True, "logit_bias"),
    (COMP, {"stop": ""}, False, None),
    (COMP, {"stop": ["x"]}, False, None),
    (COMP, {"stop": ["x", ""]}, True, "stop"),
    (COMP, {"stop_token_ids": [2]}, False, None),
    (COMP, {"stop_token_ids": [-1]}, True, "stop_token_ids"),
    (COMP, {"top_k": -1}, False, None),
    (COMP, {"top_k": -2}, True, "top_k"),
    (COMP, {"response_format": {"type": "text"}}, False, None),
    (COMP, {"response_format": None}, False, None),
    (COMP, {"response_format": {"type": "json_object"}}, True, "response_format"),
    # OpenAI chat.
    (CHAT, {"messages": []}, True, "messages"),
    (CHAT, {"min_tokens": -1}, True, "min_tokens"),
    (CHAT, {"tools": []}, False, None),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, True, "tools"),
    (CHAT, {"functions": []}, False, None),
    (CHAT, {"functions": [{"name": "f"}]}, True, "functions"),
    (CHAT, {"tool_choice": "auto"}, False, None),
    (CHAT, {"tool_choice": "none"}, False, None),
    (CHAT, {"tool_choice": "required"}, True, "tool_choice"),
    (CHAT, {"tool_choice": {"type": "function"}}, True, "tool_choice"),
    (CHAT, {"response_format": {}}, False, None),
    (CHAT, {"response_format": {"type": "text"}}, False, None),
    (CHAT, {"response_format": {"type": "json_object"}}, True, "response_format"),
    (CHAT, {"logit_bias": {"5": 1.0}}, True, "logit_bias"),
    (CHAT, {"stop": [""]}, True, "stop"),
]


def _body(path: str, changes: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(json.dumps(ROUTE_BASES[path]))
    for dotted, value in changes.items():
        *parents, name = dotted.split(".")
        target = body
        for parent in parents:
            target = target[parent]
        target[name] = value
    return body


@pytest.fixture(scope="module")
def admits(doc: dict[str, Any]) -> Any:
    """``admits(path, body)``: whether the served schema of ``path``'s body admits ``body``."""

    def check(path: str, body: dict[str, Any]) -> bool:
        schema = {
            "$ref": f"#/components/schemas/{_body_schema(doc, path)}",
            "components": doc["components"],
        }
        return jsonschema_rs.Draft202012Validator(schema).is_valid(body)

    return check


def _case_id(case: tuple[str, dict[str, Any], bool, str | None]) -> str:
    path, changes, refused, _ = case
    text = json.dumps(changes)
    return f"{path} {'refuses' if refused else 'takes'} {text[:60]}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_the_schema_refuses_what_the_server_refuses(
    http: httpx.Client, admits: Any, case: tuple[str, dict[str, Any], bool, str | None]
) -> None:
    path, changes, refused, detail = case
    body = _body(path, changes)

    response = http.post(path, json=body)

    assert admits(path, body) is not refused, "the schema's verdict is not the server's"
    if not refused:
        assert response.status_code == 200, response.text
    elif path.startswith("/v1/"):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == detail, response.text
    else:  # TGI's own message, not a schema library's
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error.startswith(TGI_ERROR_PREFIX) and detail in error, error


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        ({"parameters": {"truncate": 2}}, False),
        ({"parameters": {"truncate": 0}}, True),
        ({"inputs": ""}, False),
        ({"parameters": {"temperature": 0.0, "top_k": 0, "max_new_tokens": 0}}, False),
    ],
)
def test_tokenize_schema_refuses_only_what_tokenize_refuses(
    http: httpx.Client, admits: Any, changes: dict[str, Any], refused: bool
) -> None:
    body = {"inputs": STORY, **changes}

    response = http.post("/tokenize", json=body)

    assert response.status_code == (422 if refused else 200), response.text
    assert admits("/tokenize", body) is not refused


# --- the documented constraints themselves ---------------------------------------------------


def test_the_documented_constraints(doc: dict[str, Any]) -> None:
    generate = _component(doc, "GenerateRequest")["properties"]
    assert generate["inputs"]["minLength"] == 1
    p = _component(doc, "GenerateParameters")["properties"]
    assert _branch(p["truncate"], "integer")["minimum"] == 1
    assert _branch(p["max_new_tokens"], "integer")["minimum"] == 1
    assert _branch(p["temperature"], "number")["exclusiveMinimum"] == 0
    assert _branch(p["top_k"], "integer")["minimum"] == 1
    for name in ("top_p", "typical_p"):
        number = _branch(p[name], "number")
        assert (number["exclusiveMinimum"], number["exclusiveMaximum"]) == (0, 1), name
    # The limits validation.py enforces (schemas.py repeats them: validation.py imports it).
    assert p["stop"]["maxItems"] == validation.MAX_STOP_SEQUENCES
    assert _branch(p["top_n_tokens"], "integer")["maximum"] == validation.MAX_TOP_N_TOKENS
    assert _branch(p["best_of"], "integer")["maximum"] == validation.MAX_BEST_OF
    assert _branch(p["seed"], "integer")["minimum"] == 0

    completion = _component(doc, "CompletionRequest")["properties"]
    text, texts, ids, id_lists = completion["prompt"]["anyOf"]
    assert (text["type"], text["minLength"]) == ("string", 1)
    assert (texts["minItems"], texts["items"]["minLength"]) == (1, 1)
    assert (ids["minItems"], ids["items"]["minimum"]) == (1, 0)
    assert (id_lists["minItems"], id_lists["items"]["minItems"]) == (1, 1)
    assert texts["maxItems"] == id_lists["maxItems"] == MAX_CHOICES
    assert "response_format" in completion
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = _component(doc, name)["properties"]
        assert _branch(properties["min_tokens"], "integer")["minimum"] == 0
        assert _branch(properties["n"], "integer")["minimum"] == 1
        assert properties["min_tokens"]["default"] == 0 and properties["n"]["default"] == 1
