"""The TGI API end to end: a real kiln server on loopback (stories260K), driven by
``huggingface_hub.InferenceClient``, TGI's own ``text_generation`` client and raw HTTP.

Expected outputs come from ``LLM.generate`` on a second copy of the model, so every generation
test also checks that the TGI parameters map onto the engine's ``SamplingParams`` correctly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import text_generation
from huggingface_hub import InferenceClient
from huggingface_hub import errors as hub_errors

from engine_probes import fail_steps_after
from kiln import LLM, SamplingParams
from kiln.config.server import ServerConfig
from kiln.engine.outputs import CompletionOutput
from kiln.engine.request import FinishReason
from model_copies import EOS_AT, EOS_PROMPT
from server_harness import running_server

# text_generation 0.7 still calls pydantic v1's `.dict()`.
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")

PROMPT = "Lily and Max went to the park."  # 14 tokens; its greedy continuation makes no EOS
MAX_BODY_BYTES = 64 << 10
API_KEY = "s3cret"
KV_CACHE_BYTES = 16 << 20
TIMEOUT_S = 30.0


def _llm(path: Path) -> LLM:
    # NOTE: float32 named: /info reports it, and "auto" is bfloat16 on CPUs with AVX512-BF16.
    return LLM(str(path), kv_cache_memory=KV_CACHE_BYTES, dtype="float32")


@pytest.fixture(scope="module")
def reference(eos_dir: Path) -> LLM:
    """Computes expected outputs; never shares its engine with a server."""
    return _llm(eos_dir)


@pytest.fixture(scope="module")
def url(eos_dir: Path) -> Iterator[str]:
    with running_server(_llm(eos_dir), ServerConfig(max_body_bytes=MAX_BODY_BYTES)) as base:
        yield base


@pytest.fixture(scope="module")
def guarded_llm(stories_dir: Path) -> LLM:
    """Plain stories260K, which never emits its EOS: requests for many tokens run that long."""
    return _llm(stories_dir)


@pytest.fixture(scope="module")
def guarded_url(guarded_llm: LLM) -> Iterator[str]:
    """One seat and an API key."""
    config = ServerConfig(max_concurrent_requests=1, api_key=API_KEY)
    with running_server(guarded_llm, config) as base:
        yield base


@pytest.fixture(scope="module")
def guarded(guarded_url: str) -> Iterator[httpx.Client]:
    auth = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=guarded_url, timeout=TIMEOUT_S, headers=auth) as client:
        yield client


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def hub(url: str) -> InferenceClient:
    return InferenceClient(base_url=url, timeout=TIMEOUT_S)


def _greedy(reference: LLM, prompt: str | list[int], **kwargs: Any) -> CompletionOutput:
    params = SamplingParams(temperature=0.0, logprobs=True, **kwargs)
    (out,) = reference.generate([prompt], params)
    return out


def _metric(client: httpx.Client, name: str) -> float:
    """A sample of /metrics, e.g. ``tgi_request_count`` or ``tgi_request_failure{err="x"}``
    (0 when absent, as for a label value not seen yet)."""
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _as_dict(token: Any) -> dict[str, Any]:
    if isinstance(token, dict):
        return token
    return {k: getattr(token, k) for k in ("id", "text", "logprob", "special")}


def _events(body: str) -> list[dict[str, Any]]:
    """Parse an SSE body, checking the framing: ``data: <json>`` events ending in a blank line."""
    assert body.endswith("\n\n")
    events = []
    for chunk in body.split("\n\n")[:-1]:
        assert chunk.startswith("data: "), chunk
        assert "\n" not in chunk, chunk
        events.append(json.loads(chunk[len("data: ") :]))
    return events


# --- generation through the clients ---------------------------------------------------------


def test_hub_client_greedy_details_equal_llm_generate(hub: InferenceClient, reference: LLM):
    ref = _greedy(reference, PROMPT, max_new_tokens=12)
    assert ref.finish_reason is FinishReason.LENGTH

    out = hub.text_generation(PROMPT, max_new_tokens=12, details=True)

    assert out.generated_text == ref.text
    details = out.details
    assert details.finish_reason == "length"
    assert details.generated_tokens == 12
    assert details.seed is None  # greedy
    assert details.prefill == []
    assert [t.id for t in details.tokens] == ref.token_ids
    assert "".join(t.text for t in details.tokens) == ref.text
    assert [t.logprob for t in details.tokens] == pytest.approx(ref.logprobs, abs=1e-4)
    assert not any(t.special for t in details.tokens)
    assert not details.top_tokens
    # Without details, the hub client returns the bare text.
    assert hub.text_generation(PROMPT, max_new_tokens=12) == ref.text
    # TGI's error types reach the client.
    with pytest.raises(
        hub_errors.ValidationError, match=re.escape("`top_p` must be > 0.0 and < 1.0")
    ):
        hub.text_generation(PROMPT, top_p=1.0)


def test_hub_client_stream_equals_llm_generate(hub: InferenceClient, reference: LLM):
    ref = _greedy(reference, PROMPT, max_new_tokens=10)

    events = list(hub.text_generation(PROMPT, max_new_tokens=10, stream=True, details=True))

    assert [e.index for e in events] == list(range(1, 11))
    assert [e.token.id for e in events] == ref.token_ids
    assert "".join(e.token.text for e in events) == ref.text
    assert [e.token.logprob for e in events] == pytest.approx(ref.logprobs, abs=1e-4)
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == ref.text
    assert events[-1].details.finish_reason == "length"
    assert events[-1].details.generated_tokens == 10
    # Without details: one text piece per token.
    pieces = list(hub.text_generation(PROMPT, max_new_tokens=10, stream=True))
    assert "".join(pieces) == ref.text


def test_eos_token_finish(hub: InferenceClient, reference: LLM):
    ref = _greedy(reference, EOS_PROMPT, max_new_tokens=20)
    assert ref.finish_reason is FinishReason.EOS_TOKEN

    out = hub.text_generation(EOS_PROMPT, max_new_tokens=20, details=True)

    assert out.details.finish_reason == "eos_token"
    assert out.details.generated_tokens == EOS_AT + 1
    assert [t.id for t in out.details.tokens] == ref.token_ids
    events = list(hub.text_generation(EOS_PROMPT, max_new_tokens=20, stream=True, details=True))
    assert events[-1].details.finish_reason == "eos_token"
    assert events[-1].generated_text == out.generated_text


def test_stop_sequence_ends_generation_and_stays_in_text(hub: InferenceClient, reference: LLM):
    ref = _greedy(reference, EOS_PROMPT, max_new_tokens=20, stop=[" was"])
    assert ref.finish_reason is FinishReason.STOP_SEQUENCE

    out = hub.text_generation(
        EOS_PROMPT, max_new_tokens=20, stop=[" nothing", " was"], details=True
    )

    assert out.details.finish_reason == "stop_sequence"
    assert [t.id for t in out.details.tokens] == ref.token_ids
    # TGI keeps the stop sequence in generated_text (the engine's own text cuts it off).
    assert out.generated_text == ref.text + " was"
    events = list(hub.text_generation(EOS_PROMPT, max_new_tokens=20, stop=[" was"], stream=True))
    assert "".join(events) == out.generated_text


def test_decoder_input_details_returns_the_prompt_tokens(hub: InferenceClient, reference: LLM):
    prompt_ids = reference.tokenizer.encode(PROMPT)

    out = hub.text_generation(PROMPT, max_new_tokens=3, details=True, decoder_input_details=True)

    prefill = out.details.prefill
    assert [t.id for t in prefill] == prompt_ids
    assert prefill[0].text == "<s>"
    assert all(t.logprob is None for t in prefill)  # kiln computes no prompt logprobs


def test_top_n_tokens(hub: InferenceClient, reference: LLM):
    ref = _greedy(reference, PROMPT, max_new_tokens=6)

    out = hub.text_generation(PROMPT, max_new_tokens=6, details=True, top_n_tokens=3)

    tokens = out.details.tokens
    # NOTE: huggingface_hub leaves the tokens of this nested list as dicts.
    top_tokens = [[_as_dict(t) for t in top] for top in out.details.top_tokens]
    assert [t.id for t in tokens] == ref.token_ids
    assert len(top_tokens) == len(tokens)
    for token, top in zip(tokens, top_tokens, strict=True):
        assert len(top) == 3
        assert top[0]["id"] == token.id  # greedy picks the most likely
        assert top[0]["logprob"] == pytest.approx(token.logprob, abs=1e-5)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert all(set(t) == {"id", "text", "logprob", "special"} for t in top)
    events = list(
        hub.text_generation(PROMPT, max_new_tokens=6, details=True, top_n_tokens=2, stream=True)
    )
    assert [[_as_dict(t)["id"] for t in e.top_tokens] for e in events] == [
        [t["id"] for t in top[:2]] for top in top_tokens
    ]


def test_seeded_sampling_is_reproducible(hub: InferenceClient, reference: LLM):
    kwargs = {"max_new_tokens": 16, "details": True, "do_sample": True}
    first = hub.text_generation(PROMPT, seed=1234, **kwargs)
    again = hub.text_generation(PROMPT, seed=1234, **kwargs)
    assert first.details.seed == 1234
    assert again.generated_text == first.generated_text
    (expected,) = reference.generate(
        PROMPT, SamplingParams(temperature=1.0, seed=1234, max_new_tokens=16)
    )
    assert [t.id for t in first.details.tokens] == expected.token_ids

    # Sampling without a seed: TGI picks one and reports it, so the answer can be reproduced.
    unseeded = hub.text_generation(PROMPT, **kwargs)
    assert isinstance(unseeded.details.seed, int)
    replay = hub.text_generation(PROMPT, seed=unseeded.details.seed, **kwargs)
    assert replay.generated_text == unseeded.generated_text
    # TGI's rule: a temperature samples even with do_sample false; greedy reports no seed.
    warm = hub.text_generation(PROMPT, max_new_tokens=4, details=True, temperature=0.7)
    assert warm.details.seed is not None
    greedy = hub.text_generation(PROMPT, max_new_tokens=4, details=True, do_sample=False)
    assert greedy.details.seed is None


def test_return_full_text(hub: InferenceClient, reference: LLM):
    ref = _greedy(reference, PROMPT, max_new_tokens=5)
    assert hub.text_generation(PROMPT, max_new_tokens=5, return_full_text=True) == PROMPT + ref.text
    events = list(
        hub.text_generation(
            PROMPT, max_new_tokens=5, return_full_text=True, stream=True, details=True
        )
    )
    assert events[-1].generated_text == PROMPT + ref.text


def test_truncate_keeps_the_last_prompt_tokens(hub: InferenceClient, reference: LLM):
    kept = reference.tokenizer.encode(PROMPT)[-4:]
    ref = _greedy(reference, kept, max_new_tokens=6)

    out = hub.text_generation(
        PROMPT, max_new_tokens=6, truncate=4, details=True, decoder_input_details=True
    )

    assert [t.id for t in out.details.prefill] == kept
    assert [t.id for t in out.details.tokens] == ref.token_ids


def test_text_generation_client(url: str, reference: LLM):
    ref = _greedy(reference, PROMPT, max_new_tokens=8)
    client = text_generation.Client(url, timeout=int(TIMEOUT_S))

    response = client.generate(PROMPT, max_new_tokens=8)
    assert response.generated_text == ref.text
    assert [t.id for t in response.details.tokens] == ref.token_ids
    assert response.details.finish_reason == "length"

    events = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert [e.token.id for e in events] == ref.token_ids
    assert events[-1].generated_text == ref.text
    assert events[-1].details.generated_tokens == 8

    with pytest.raises(text_generation.errors.ValidationError, match="max_new_tokens"):
        client.generate(PROMPT, max_new_tokens=1000)


def test_text_generation_async_client(url: str, reference: LLM):
    ref = _greedy(reference, PROMPT, max_new_tokens=8)

    async def run() -> tuple[Any, list[Any]]:
        client = text_generation.AsyncClient(url, timeout=int(TIMEOUT_S))
        response = await client.generate(PROMPT, max_new_tokens=8)
        events = [e async for e in client.generate_stream(PROMPT, max_new_tokens=8)]
        return response, events

    response, events = asyncio.run(run())
    assert response.generated_text == ref.text
    assert [e.token.id for e in events] == ref.token_ids


# --- raw HTTP ---------------------------------------------------------------------------------


def test_compat_route_answers_a_list_or_a_stream(http: httpx.Client, reference: LLM):
    ref = _greedy(reference, PROMPT, max_new_tokens=4)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}

    response = http.post("/", json=body)
    assert response.status_code == 200
    assert response.json() == [{"generated_text": ref.text}]

    response = http.post("/", json={**body, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert [e["token"]["id"] for e in events] == ref.token_ids
    assert events[-1]["generated_text"] == ref.text


def test_generate_stream_framing(http: httpx.Client, reference: LLM):
    ref = _greedy(reference, PROMPT, max_new_tokens=5)
    num_prompt = len(reference.tokenizer.encode(PROMPT))
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "details": True}}

    response = http.post("/generate_stream", json=body)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = _events(response.text)
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    for event in events[:-1]:
        assert event["generated_text"] is None and event["details"] is None
        assert "top_tokens" not in event  # skipped when empty, as TGI does
        assert set(event["token"]) == {"id", "text", "logprob", "special"}
    assert events[-1]["generated_text"] == ref.text
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 5,
        "seed": None,
        "input_length": num_prompt,
    }
    # Without `details` the last event has the text but no details.
    body["parameters"]["details"] = False
    last = _events(http.post("/generate_stream", json=body).text)[-1]
    assert last["generated_text"] == ref.text and last["details"] is None


def test_generate_response_shape(http: httpx.Client):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    response = http.post("/generate", json=body)
    assert response.status_code == 200
    assert set(response.json()) == {"generated_text"}  # no details unless asked
    assert response.headers["x-generated-tokens"] == "3"

    body["parameters"]["details"] = True
    details = http.post("/generate", json=body).json()["details"]
    assert set(details) == {"finish_reason", "generated_tokens", "seed", "prefill", "tokens"}

    # No `parameters` at all: TGI's defaults, which sample (so a seed is picked).
    response = http.post("/generate", json={"inputs": PROMPT})
    assert response.status_code == 200
    assert 1 <= int(response.headers["x-generated-tokens"]) <= 100


def test_info(http: httpx.Client):
    info = http.get("/info").json()
    assert info["model_id"]
    assert info["model_dtype"] == "torch.float32"
    assert info["model_device_type"] == "cpu"
    assert info["max_best_of"] == 1
    assert info["max_stop_sequences"] == 4
    assert info["max_total_tokens"] == 512
    assert info["max_input_tokens"] == info["max_input_length"] == 511
    assert info["max_concurrent_requests"] == 128
    assert info["router"] == "text-generation-router"
    assert info["version"]
    assert info["sha"] is None and info["docker_label"] is None
    assert info["validation_workers"] >= 1


@pytest.mark.parametrize(
    "text", ["Lily and Max went to the park. They saw a big red ball.", "Héllo, 日本 ok"]
)
def test_tokenize_offsets(http: httpx.Client, reference: LLM, text: str):
    tokens = http.post("/tokenize", json={"inputs": text}).json()

    assert [t["id"] for t in tokens] == reference.tokenizer.encode(text)
    assert tokens[0] == {"id": 1, "text": "", "start": 0, "stop": 0}  # BOS
    for token in tokens:
        assert token["text"] == text[token["start"] : token["stop"]]
    # Byte-fallback tokens of one character share its span: the distinct spans tile the text.
    spans = list(dict.fromkeys((t["start"], t["stop"]) for t in tokens[1:]))
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans))

    truncated = http.post("/tokenize", json={"inputs": text, "parameters": {"truncate": 3}})
    assert truncated.json() == tokens[-3:]


def test_infer_answers_the_ray_serve_blueprint_shape(http: httpx.Client, reference: LLM):
    prompt_ids = reference.tokenizer.encode(PROMPT)
    ref = _greedy(reference, prompt_ids, max_new_tokens=100)

    response = http.get("/infer", params={"sentence": PROMPT})

    assert response.status_code == 200
    # The blueprint's Gradio client reads `response.json()[0]` and strips the prompt from it.
    (text,) = response.json()
    assert text == reference.tokenizer.decode(prompt_ids + ref.token_ids)
    assert text.startswith(PROMPT)
    assert http.get("/infer").status_code == 422
    assert http.get("/infer", params={"sentence": ""}).status_code == 422


def test_health(http: httpx.Client):
    assert http.get("/health").status_code == 200


def test_metrics_count_requests(http: httpx.Client):
    count = _metric(http, "tgi_request_count")
    success = _metric(http, "tgi_request_success")
    invalid = _metric(http, 'tgi_request_failure{err="validation"}')
    duration = _metric(http, "tgi_request_duration_count")

    http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    http.post("/generate", json={"inputs": PROMPT, "parameters": {"top_k": 0}})

    assert _metric(http, "tgi_request_count") == count + 2
    assert _metric(http, "tgi_request_success") == success + 1
    assert _metric(http, 'tgi_request_failure{err="validation"}') == invalid + 1
    assert _metric(http, "tgi_request_duration_count") == duration + 1
    text = http.get("/metrics").text
    assert 'tgi_request_duration_bucket{le="+Inf"}' in text
    assert "tgi_request_generated_tokens_bucket" in text


# --- validation -------------------------------------------------------------------------------

VALIDATION_CASES = [
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"temperature": -1.0}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"seed": -1}, "`seed` must be >= 0"),
    ({"seed": 2**64}, "`seed` must be >= 0"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 511. Given: 0"),
    ({"truncate": 512}, "`truncate` must be strictly positive and less than 511. Given: 512"),
    ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported"),
    ({"best_of": 0}, "`best_of` != 1 is not supported"),
    ({"watermark": True}, "`watermark` is not supported"),
    ({"grammar": {"type": "regex", "value": "a+"}}, "grammar is not supported"),
    ({"adapter_id": "my-lora"}, "`adapter_id` is not supported"),
    ({"max_new_tokens": 600}, "must be <= 512. Given: 14 `inputs` tokens and 600 `max_new_tokens`"),
]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
@pytest.mark.parametrize(("parameters", "message"), VALIDATION_CASES)
def test_invalid_parameters_answer_422(
    http: httpx.Client, path: str, parameters: dict[str, Any], message: str
):
    response = http.post(path, json={"inputs": PROMPT, "parameters": parameters})

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error_type"] == "validation"
    assert body["error"].startswith("Input validation error: ")
    assert message in body["error"]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/generate", {"inputs": ""}, "`inputs` cannot be empty"),
        ("/generate", b'{"inputs": "\\ud800"}', "`inputs` is not valid Unicode"),
        (
            "/generate_stream",
            {"inputs": PROMPT, "parameters": {"decoder_input_details": True}},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
        (
            "/generate_stream",
            {"inputs": PROMPT, "parameters": {"best_of": 2}},
            "`best_of` != 1 is not supported when streaming tokens",
        ),
    ],
)
def test_invalid_requests_answer_422(
    http: httpx.Client, path: str, body: dict[str, Any] | bytes, message: str
):
    if isinstance(body, bytes):  # JSON that no client library would write
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    assert message in response.json()["error"]


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("name", [b"temperature", b"top_p", b"repetition_penalty"])
def test_non_finite_numbers_answer_422(http: httpx.Client, name: bytes, value: bytes):
    body = b'{"inputs": "x", "parameters": {"' + name + b'": ' + value + b"}}"
    response = http.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"


def test_over_length_input_names_both_numbers(http: httpx.Client, reference: LLM):
    long_prompt = " ".join([PROMPT] * 60)
    num_tokens = len(reference.tokenizer.encode(long_prompt))
    assert num_tokens > 512

    response = http.post("/generate", json={"inputs": long_prompt, "parameters": {}})

    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 512. "
        f"Given: {num_tokens} `inputs` tokens and 1 `max_new_tokens`",
        "error_type": "validation",
    }
    medium = " ".join([PROMPT] * 50)  # fits, but not with 100 new tokens
    num_medium = len(reference.tokenizer.encode(medium))
    response = http.post(
        "/generate", json={"inputs": medium, "parameters": {"max_new_tokens": 100}}
    )
    assert response.status_code == 422
    assert f"Given: {num_medium} `inputs` tokens and 100 `max_new_tokens`" in response.text
    # `truncate` makes it fit.
    body = {"inputs": long_prompt, "parameters": {"max_new_tokens": 4, "truncate": 300}}
    assert http.post("/generate", json=body).status_code == 200


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"{not json", {"content-type": "application/json"}),
        (b"[]", {"content-type": "application/json"}),
        (b'{"inputs": 5}', {"content-type": "application/json"}),
        (b'{"parameters": {}}', {"content-type": "application/json"}),
        (b'{"inputs": "x", "parameters": []}', {"content-type": "application/json"}),
        (b'{"inputs": "x", "parameters": {"max_new_tokens": "5"}}', {}),
        (b'{"inputs": "x", "parameters": {"max_new_tokens": 2.5}}', {}),
        (b'{"inputs": "x", "parameters": {"details": "yes"}}', {}),
        (b'{"inputs": "x", "parameters": {"stop": "a"}}', {}),
        (b'{"inputs": "\xff\xfe"}', {"content-type": "application/json"}),
        (b'{"inputs": "x"}', {"content-type": "text/plain"}),
        (b'{"inputs": "' + b"a" * MAX_BODY_BYTES + b'"}', {}),
    ],
    ids=lambda v: v[:24].decode("latin-1") if isinstance(v, bytes) else None,
)
@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/", "/tokenize"])
def test_malformed_bodies_answer_4xx(
    http: httpx.Client, path: str, content: bytes, headers: dict[str, str]
):
    response = http.post(
        path, content=content, headers={"content-type": "application/json", **headers}
    )

    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) == {"error", "error_type"}
    assert http.get("/health").status_code == 200


def test_a_chunked_body_over_the_limit_answers_413(http: httpx.Client):
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "x", "pad": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"a" * 1024
        yield b'"}'

    response = http.post(
        "/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    assert http.post("/generate", json=body).status_code == 200


# --- overload, auth, disconnects -----------------------------------------------------------


def test_overloaded_answers_429_with_retry_after(guarded: httpx.Client):
    long_body = {"inputs": PROMPT, "parameters": {"max_new_tokens": None}}
    overloaded = _metric(guarded, 'tgi_request_failure{err="overloaded"}')
    with guarded.stream("POST", "/generate_stream", json=long_body) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # NOTE: kept: a collected iterator closes the response
        assert next(lines).startswith("data: ")  # the first token: the seat is taken

        for path in ("/generate_stream", "/generate", "/"):
            response = guarded.post(path, json={"inputs": PROMPT})
            assert response.status_code == 429
            assert response.headers["retry-after"]
            assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        hub = InferenceClient(base_url=str(guarded.base_url), api_key=API_KEY, timeout=TIMEOUT_S)
        with pytest.raises(hub_errors.OverloadedError):
            hub.text_generation(PROMPT, max_new_tokens=2)
    assert _metric(guarded, 'tgi_request_failure{err="overloaded"}') == overloaded + 4

    # The seat comes back when the first client leaves.
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    _wait_for(lambda: guarded.post("/generate", json=body).status_code == 200)


def test_api_key_is_required_except_for_health(guarded_url: str):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    with httpx.Client(base_url=guarded_url, timeout=TIMEOUT_S) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
            response = client.post("/generate", json=body, headers=headers)
            assert response.status_code == 401
            assert response.json()["error_type"] == "authentication"
        assert client.get("/info").status_code == 401
        assert client.get("/health").status_code == 200
        auth = {"authorization": f"Bearer {API_KEY}"}
        _wait_for(lambda: client.post("/generate", json=body, headers=auth).status_code == 200)


def _assert_aborted(client: httpx.Client, generated_before: float, cancelled_before: float):
    _wait_for(lambda: _metric(client, "kiln_kv_cache_blocks_used") == 0)
    _wait_for(lambda: _metric(client, "kiln_requests_in_flight") == 0)
    assert _metric(client, 'tgi_request_failure{err="cancelled"}') == cancelled_before + 1
    # Far fewer than the ~500 tokens the request asked for: it stopped when the client left.
    assert _metric(client, "kiln_generation_tokens") - generated_before < 400


def test_client_disconnect_mid_stream_aborts_the_request(guarded: httpx.Client):
    generated = _metric(guarded, "kiln_generation_tokens")
    cancelled = _metric(guarded, 'tgi_request_failure{err="cancelled"}')
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": None}}

    with guarded.stream("POST", "/generate_stream", json=body) as response:
        lines = response.iter_lines()  # NOTE: kept: a collected iterator closes the response
        assert next(lines).startswith("data: ")
        assert _metric(guarded, "kiln_kv_cache_blocks_used") > 0
    # Leaving the block closed the connection mid-stream.

    _assert_aborted(guarded, generated, cancelled)


def test_client_disconnect_during_generate_aborts_the_request(guarded: httpx.Client):
    generated = _metric(guarded, "kiln_generation_tokens")
    cancelled = _metric(guarded, 'tgi_request_failure{err="cancelled"}')
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": None}}

    with pytest.raises(httpx.ReadTimeout):
        guarded.post("/generate", json=body, timeout=0.2)

    _assert_aborted(guarded, generated, cancelled)


def test_an_engine_failure_mid_stream_is_an_error_event(
    guarded: httpx.Client, guarded_llm: LLM, monkeypatch: pytest.MonkeyPatch
):
    failures = _metric(guarded, 'tgi_request_failure{err="generation"}')
    fail_steps_after(guarded_llm, monkeypatch, 3)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 20, "details": True}}

    response = guarded.post("/generate_stream", json=body)

    assert response.status_code == 200
    events = _events(response.text)
    assert [e.get("index") for e in events] == [1, 2, 3, None]
    assert events[-1] == {
        "error": "Request failed during generation: boom",
        "error_type": "generation",
    }
    # huggingface_hub raises TGI's error types from such an event.
    hub = InferenceClient(base_url=str(guarded.base_url), api_key=API_KEY, timeout=TIMEOUT_S)
    fail_steps_after(guarded_llm, monkeypatch, 1)
    with pytest.raises(hub_errors.GenerationError, match="boom"):
        list(hub.text_generation(PROMPT, max_new_tokens=20, stream=True))
    assert _metric(guarded, 'tgi_request_failure{err="generation"}') == failures + 2
    _wait_for(lambda: _metric(guarded, "kiln_kv_cache_blocks_used") == 0)


def test_an_engine_failure_during_generate_answers_424(
    guarded: httpx.Client, guarded_llm: LLM, monkeypatch: pytest.MonkeyPatch
):
    fail_steps_after(guarded_llm, monkeypatch, 2)

    response = guarded.post("/generate", json={"inputs": PROMPT})

    assert response.status_code == 424
    assert response.json() == {
        "error": "Request failed during generation: boom",
        "error_type": "generation",
    }
    monkeypatch.undo()
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    assert guarded.post("/generate", json=body).status_code == 200
