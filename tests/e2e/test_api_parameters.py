"""Every sampling parameter of each API reaches the engine, and the server's token limits hold
at values other than the model's: a parameter an adapter dropped or replaced by its neutral
value would make one of these fail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine_probes import record_sampling_params
from kiln import LLM, SamplingParams
from kiln.config.server import ServerConfig
from server_harness import running_server

PROMPT = "Lily and Max went to the park."
MAX_INPUT_TOKENS = 64  # a one-message chat is ~41 tokens with stories260K and chatml
MAX_TOTAL_TOKENS = 96


@pytest.fixture(scope="module")
def llm(stories_dir: Path) -> LLM:
    return LLM(str(stories_dir), kv_cache_memory=16 << 20, chat_template="chatml")


@pytest.fixture(scope="module")
def http(llm: LLM) -> Iterator[httpx.Client]:
    config = ServerConfig(max_input_tokens=MAX_INPUT_TOKENS, max_total_tokens=MAX_TOTAL_TOKENS)
    with running_server(llm, config) as base, httpx.Client(base_url=base, timeout=30.0) as client:
        yield client


@pytest.fixture
def received(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[SamplingParams]:
    """The SamplingParams of every request the engine receives (it still runs them)."""
    return record_sampling_params(llm, monkeypatch)


TGI_CASES = [
    ({"temperature": 0.7}, {"temperature": 0.7}),
    ({"do_sample": True, "top_k": 5}, {"top_k": 5}),
    ({"do_sample": True, "top_p": 0.6}, {"top_p": 0.6}),
    ({"do_sample": True, "typical_p": 0.4}, {"typical_p": 0.4}),
    ({"repetition_penalty": 1.7}, {"repetition_penalty": 1.7}),
    ({"frequency_penalty": 0.9}, {"frequency_penalty": 0.9}),
    ({"do_sample": True, "seed": 1234}, {"seed": 1234}),
    ({"max_new_tokens": 3}, {"max_new_tokens": 3}),
    ({"stop": ["zzz"]}, {"stop": ("zzz",)}),
    ({"top_n_tokens": 2, "details": True}, {"top_logprobs": 2}),
    ({"details": True}, {"logprobs": True}),
]


@pytest.mark.parametrize(("parameters", "expected"), TGI_CASES)
def test_each_tgi_parameter_reaches_the_engine(
    http: httpx.Client,
    received: list[SamplingParams],
    parameters: dict[str, Any],
    expected: dict[str, Any],
):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, **parameters}}
    assert http.post("/generate", json=body).status_code == 200
    (params,) = received
    assert {k: getattr(params, k) for k in expected} == expected
    neutral = SamplingParams()
    for name, value in expected.items():
        assert value != getattr(neutral, name), name  # the case tells set from unset


def test_tgi_greedy_unless_asked_to_sample(http: httpx.Client, received: list[SamplingParams]):
    greedy = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    sampled = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "do_sample": True}}
    assert http.post("/generate", json=greedy).status_code == 200
    assert http.post("/generate", json=sampled).status_code == 200
    assert received[0].greedy and not received[1].greedy


OPENAI_CASES = [
    ({"temperature": 0.7}, {"temperature": 0.7}),
    ({"top_p": 0.6}, {"top_p": 0.6}),
    ({"top_k": 5}, {"top_k": 5}),
    ({"min_p": 0.2}, {"min_p": 0.2}),
    ({"repetition_penalty": 1.7}, {"repetition_penalty": 1.7}),
    ({"frequency_penalty": 0.9}, {"frequency_penalty": 0.9}),
    ({"presence_penalty": -0.5}, {"presence_penalty": -0.5}),
    ({"seed": 1234}, {"seed": 1234}),
    ({"max_tokens": 3}, {"max_new_tokens": 3}),
    ({"min_tokens": 2, "max_tokens": 4}, {"min_new_tokens": 2}),
    ({"stop": ["zzz"]}, {"stop": ("zzz",)}),
    ({"stop_token_ids": [7]}, {"stop_token_ids": (7,)}),
    ({"ignore_eos": True}, {"ignore_eos": True}),
    ({"logprobs": 2}, {"logprobs": True, "top_logprobs": 2}),
    ({"skip_special_tokens": False}, {"skip_special_tokens": False}),
]


@pytest.mark.parametrize(("fields", "expected"), OPENAI_CASES)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_each_openai_parameter_reaches_the_engine(
    http: httpx.Client,
    received: list[SamplingParams],
    route: str,
    fields: dict[str, Any],
    expected: dict[str, Any],
):
    if route.endswith("chat/completions"):
        if "logprobs" in fields:  # chat spells it logprobs: true, top_logprobs: N
            fields = {"logprobs": True, "top_logprobs": fields["logprobs"]}
        prompt: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}]}
    else:
        prompt = {"prompt": PROMPT}
    body = {**prompt, "max_tokens": 2, **fields}
    response = http.post(route, json=body)
    assert response.status_code == 200, response.text
    (params,) = received
    assert {k: getattr(params, k) for k in expected} == expected
    neutral = SamplingParams()
    for name, value in expected.items():
        assert value != getattr(neutral, name), name


def test_openai_n_runs_that_many_choices_with_distinct_seeds(
    http: httpx.Client, received: list[SamplingParams]
):
    body = {"prompt": PROMPT, "max_tokens": 2, "n": 3, "seed": 10}
    assert len(http.post("/v1/completions", json=body).json()["choices"]) == 3
    assert sorted(p.seed for p in received) == [10, 11, 12]


# --- the server's token limits --------------------------------------------------------------


def _prompt_of(llm: LLM, num_tokens: int) -> list[int]:
    ids = llm.tokenizer.encode("Once upon a time " * 40)
    assert len(ids) >= num_tokens
    return ids[:num_tokens]


def test_info_reports_the_limits(http: httpx.Client):
    info = http.get("/info").json()
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (
        MAX_INPUT_TOKENS,
        MAX_TOTAL_TOKENS,
    )
    (card,) = http.get("/v1/models").json()["data"]
    assert card["max_model_len"] == MAX_TOTAL_TOKENS


def test_tgi_refuses_inputs_over_max_input_tokens(http: httpx.Client, llm: LLM):
    text = llm.tokenizer.decode(_prompt_of(llm, MAX_INPUT_TOKENS + 5)[1:])
    body = {"inputs": text, "parameters": {"max_new_tokens": 1}}
    response = http.post("/generate", json=body)
    assert response.status_code == 422, response.text
    assert f"must have less than {MAX_INPUT_TOKENS} tokens" in response.json()["error"]
    short = {"inputs": "Once upon", "parameters": {"max_new_tokens": 1}}
    assert http.post("/generate", json=short).status_code == 200


def test_tgi_refuses_inputs_plus_new_tokens_over_max_total_tokens(http: httpx.Client):
    body = {"inputs": "Once upon", "parameters": {"max_new_tokens": MAX_TOTAL_TOKENS}}
    response = http.post("/generate", json=body)
    assert response.status_code == 422
    assert f"must be <= {MAX_TOTAL_TOKENS}" in response.json()["error"]
    # Without max_new_tokens, TGI's default is cut to the room left.
    body = {"inputs": "Once upon", "parameters": {"details": True}}
    details = http.post("/generate", json=body).json()["details"]
    assert details["generated_tokens"] <= MAX_TOTAL_TOKENS - 3


def test_openai_refuses_prompts_over_the_limits(http: httpx.Client, llm: LLM):
    too_long = _prompt_of(llm, MAX_INPUT_TOKENS + 1)
    response = http.post("/v1/completions", json={"prompt": too_long, "max_tokens": 1})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    fits = _prompt_of(llm, MAX_INPUT_TOKENS)
    room = MAX_TOTAL_TOKENS - MAX_INPUT_TOKENS
    response = http.post("/v1/completions", json={"prompt": fits, "max_tokens": room + 1})
    assert response.status_code == 400
    response = http.post("/v1/completions", json={"prompt": fits, "max_tokens": room})
    assert response.status_code == 200, response.text
