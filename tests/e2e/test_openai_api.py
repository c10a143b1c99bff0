"""The OpenAI-compatible API on a real server on loopback, driven by the official ``openai``
client (sync and async), raw HTTP and ``huggingface_hub.InferenceClient``.

Expected outputs come from the in-process :class:`kiln.LLM` with the same parameters, computed
before its server starts (a server's engine loop owns the engine while it runs). Chat runs on
the default model (SmolLM2-135M-Instruct, which has a chat template and stops on its own EOS);
completions, limits, errors and aborts on stories260K (512 tokens of context, fast).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from kiln import LLM, SamplingParams
from kiln.config.server import ServerConfig
from kiln.engine.outputs import CompletionOutput
from server_harness import running_server

STORY = "Once upon a time, there was a little girl named Lily. She loved to"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
STORY_CHAT = [{"role": "user", "content": "Tell me a story."}]
CHAT_TOKENS = 24
MAX_CONCURRENT = 4  # the SmolLM2 server's seats: the overload test fills them


def _greedy(**kwargs: Any) -> SamplingParams:
    return SamplingParams.greedy_params(**kwargs)


def _one(llm: LLM, prompt: str | list[int], params: SamplingParams) -> CompletionOutput:
    return llm.generate([prompt], params)[0]


# --- stories260K: completions, limits, errors ----------------------------------------------


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
def expected(stories: LLM) -> dict[str, Any]:
    """In-process results for the requests the stories tests make."""
    story_ids = stories.tokenizer.encode(STORY)
    free = _one(stories, STORY, _greedy(max_new_tokens=30))
    stop = free.text[12:16]
    return {
        "story": _one(stories, STORY, _greedy(max_new_tokens=20, logprobs=True, top_logprobs=3)),
        "lily": _one(stories, "Lily", _greedy(max_new_tokens=8)),
        "story8": _one(stories, STORY, _greedy(max_new_tokens=8)),
        "ids": _one(stories, story_ids[:10], _greedy(max_new_tokens=8)),
        "stop": stop,
        "stopped": _one(stories, STORY, _greedy(max_new_tokens=30, stop=[stop])),
        "seeded": [
            _one(stories, STORY, SamplingParams(temperature=0.9, seed=s, max_new_tokens=16))
            for s in (7, 8)
        ],
        "penalized": _one(
            stories,
            STORY,
            _greedy(
                max_new_tokens=16,
                frequency_penalty=0.5,
                presence_penalty=0.3,
                repetition_penalty=1.2,
            ),
        ),
        "warped": _one(
            stories,
            STORY,
            SamplingParams(
                temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=3, max_new_tokens=16
            ),
        ),
        "story_ids": story_ids,
        "chat_seeded": [
            stories.chat(STORY_CHAT, SamplingParams(temperature=0.9, seed=s, max_new_tokens=8))
            for s in (5, 6)
        ],
        "chat": stories.chat(STORY_CHAT, _greedy(max_new_tokens=12)),
    }


@pytest.fixture(scope="module")
def stories_url(stories: LLM, expected: dict[str, Any]) -> Iterator[str]:
    config = ServerConfig(model_id="stories")
    with running_server(stories, config) as url:
        yield url


@pytest.fixture(scope="module")
def client(stories_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stories_url + "/v1", api_key="x", max_retries=0)


def test_models(client: openai.OpenAI, stories_url: str) -> None:
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("stories", "model", "kiln")
    assert abs(model.created - time.time()) < 600
    assert client.models.retrieve("stories").id == "stories"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


def test_completion_equals_llm_with_logprobs(client: openai.OpenAI, expected: dict) -> None:
    want: CompletionOutput = expected["story"]
    r = client.completions.create(
        model="stories", prompt=STORY, max_tokens=20, temperature=0, logprobs=3
    )
    (choice,) = r.choices
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert choice.text == want.text
    assert choice.finish_reason == "length"
    prompt_tokens = len(expected["story_ids"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 20)
    assert r.usage.total_tokens == prompt_tokens + 20
    lp = choice.logprobs
    assert lp.token_logprobs == want.logprobs
    assert "".join(lp.tokens) == want.text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    for tops, want_tops, token, logprob in zip(
        lp.top_logprobs, want.top_logprobs, lp.tokens, lp.token_logprobs, strict=True
    ):
        assert sorted(tops.values()) == sorted(v for _, v in want_tops)
        assert tops[token] == logprob  # the chosen token is always listed (greedy: the top one)


def test_completion_stream_with_usage(client: openai.OpenAI, expected: dict) -> None:
    stream = client.completions.create(
        model="stories",
        prompt=STORY,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *deltas, last = chunks
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in deltas) == expected["story"].text
    assert [c.choices[0].finish_reason for c in deltas][-1] == "length"
    assert last.choices == [] and last.usage.completion_tokens == 20


def test_completion_prompt_forms_and_echo(client: openai.OpenAI, expected: dict) -> None:
    ids = expected["story_ids"][:10]
    r = client.completions.create(
        model="stories", prompt=["Lily", STORY], max_tokens=8, temperature=0
    )
    # References of 8 generated tokens, so that an empty or cut-short text cannot match them.
    assert len(expected["lily"].token_ids) == len(expected["story8"].token_ids) == 8
    assert expected["lily"].text and expected["story8"].text
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == expected["lily"].text
    assert r.choices[1].text == expected["story8"].text
    r = client.completions.create(model="stories", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected["ids"].text
    assert r.usage.prompt_tokens == 10
    r = client.completions.create(
        model="stories", prompt=[ids, ids[:5]], max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == expected["ids"].text
    assert r.usage.prompt_tokens == 15 and r.usage.completion_tokens == 32
    r = client.completions.create(
        model="stories", prompt="Lily", max_tokens=8, temperature=0, echo=True
    )
    assert r.choices[0].text == "Lily" + expected["lily"].text


def test_stop(client: openai.OpenAI, expected: dict) -> None:
    want: CompletionOutput = expected["stopped"]
    r = client.completions.create(
        model="stories", prompt=STORY, max_tokens=30, temperature=0, stop=expected["stop"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == want.text
    assert expected["stop"] not in r.choices[0].text


def test_seed_is_reproducible_and_n_choices_differ(client: openai.OpenAI, expected: dict) -> None:
    def ask() -> list[str]:
        r = client.completions.create(
            model="stories", prompt=STORY, max_tokens=16, temperature=0.9, seed=7, n=2
        )
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = ask()
    assert first == ask()
    assert first[0] != first[1]
    assert first == [out.text for out in expected["seeded"]]  # choice i uses seed + i


def test_sampling_parameters_reach_the_sampler(client: openai.OpenAI, expected: dict) -> None:
    r = client.completions.create(
        model="stories",
        prompt=STORY,
        max_tokens=16,
        temperature=0,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        extra_body={"repetition_penalty": 1.2},
        user="someone",
    )
    assert r.choices[0].text == expected["penalized"].text
    r = client.completions.create(
        model="stories",
        prompt=STORY,
        max_tokens=16,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        extra_body={"top_k": 5, "min_p": 0.05},
    )
    assert r.choices[0].text == expected["warped"].text


def test_chat_stream_n_choices(client: openai.OpenAI, expected: dict) -> None:
    stream = client.chat.completions.create(
        model="stories",
        messages=STORY_CHAT,
        max_tokens=8,
        temperature=0.9,
        seed=5,
        n=2,
        stream=True,
    )
    texts = ["", ""]
    roles: list[int] = []
    finished: list[int] = []
    for chunk in stream:
        (choice,) = chunk.choices
        if choice.delta.role:
            assert texts[choice.index] == "" and choice.index not in roles
            roles.append(choice.index)
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            assert choice.finish_reason == "length"
            finished.append(choice.index)
    assert sorted(roles) == sorted(finished) == [0, 1]
    assert texts == [out.text for out in expected["chat_seeded"]]


def test_chat_on_a_builtin_template(client: openai.OpenAI, expected: dict) -> None:
    r = client.chat.completions.create(
        model="stories",
        messages=STORY_CHAT,
        max_completion_tokens=12,
        temperature=0,
    )
    assert r.choices[0].message.content == expected["chat"].text
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_long_history_is_truncated_to_fit(client: openai.OpenAI) -> None:
    turns = []
    for i in range(40):
        turns += [
            {"role": "user", "content": f"Tell me about the dog number {i} in the park."},
            {"role": "assistant", "content": "The dog ran and played with a ball all day."},
        ]
    messages = [{"role": "system", "content": "You tell stories."}, *turns, CHAT[0]]
    r = client.chat.completions.create(
        model="stories", messages=messages, max_tokens=32, temperature=0
    )
    assert r.usage.prompt_tokens <= 512 - 32
    assert r.usage.completion_tokens == 32


def _error(call: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    return e.value.status_code, body


def test_errors_in_openai_shape(client: openai.OpenAI, stories_url: str) -> None:
    def chat(**kwargs: Any) -> Any:
        return lambda: client.chat.completions.create(
            **{"model": "stories", "messages": CHAT, "max_tokens": 4, **kwargs}
        )

    def complete(**kwargs: Any) -> Any:
        return lambda: client.completions.create(
            **{"model": "stories", "prompt": STORY, "max_tokens": 4, **kwargs}
        )

    cases = [
        (chat(temperature=3), 400, "temperature"),
        (chat(temperature="hot"), 400, "temperature"),
        (chat(max_tokens="many"), 400, "max_tokens"),
        (chat(n=0), 400, "n"),
        (chat(messages="hi"), 400, "messages"),
        (chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages"),
        (chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
        (chat(top_logprobs=2), 400, "top_logprobs"),
        (chat(model="gpt-4o"), 404, "model"),
        (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
        (chat(response_format={"type": "json_object"}), 400, "response_format"),
        (chat(logit_bias={"1": 5}), 400, "logit_bias"),
        (chat(stream_options={"include_usage": True}), 400, "stream_options"),
        (complete(suffix="The end."), 400, "suffix"),
        (complete(best_of=2), 400, "best_of"),
        (complete(prompt=[]), 400, "prompt"),
        (complete(prompt=[100000]), 400, "prompt"),
        (complete(top_p=0), 400, "top_p"),
        (complete(extra_body={"min_tokens": 8}), 400, "min_tokens"),
    ]
    for call, status, param in cases:
        got_status, body = _error(call)
        assert (got_status, body["param"]) == (status, param), body
        assert body["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    _, body = _error(chat(model="gpt-4o"))
    assert body["code"] == "model_not_found"
    # Malformed JSON, straight over HTTP.
    r = httpx.post(stories_url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(stories_url + "/v1/chat/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_context_length_errors_name_both_numbers(client: openai.OpenAI, expected: dict) -> None:
    long_prompt = expected["story_ids"] * 40  # ~600 tokens of a 512-token context
    status, body = _error(
        lambda: client.completions.create(model="stories", prompt=long_prompt, max_tokens=4)
    )
    assert (status, body["code"]) == (400, "context_length_exceeded")
    assert str(len(long_prompt)) in body["message"] and "511" in body["message"]
    ids = expected["story_ids"] * 10  # fits, but not with 400 more
    status, body = _error(
        lambda: client.completions.create(model="stories", prompt=ids, max_tokens=400)
    )
    assert (status, body["code"]) == (400, "context_length_exceeded")
    assert all(str(n) in body["message"] for n in (512, len(ids), 400, len(ids) + 400))
    # A single message that cannot fit, even with all history dropped.
    huge = [{"role": "user", "content": STORY * 40}]
    status, body = _error(
        lambda: client.chat.completions.create(model="stories", messages=huge, max_tokens=4)
    )
    assert (status, body["code"], body["param"]) == (400, "context_length_exceeded", "messages")
    assert re.search(r"needs \d+ tokens", body["message"]) and "508" in body["message"]


def test_async_client_concurrent_streams(stories_url: str, expected: dict) -> None:
    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=stories_url + "/v1", api_key="x") as aclient:

            async def one(prompt: str) -> str:
                stream = await aclient.completions.create(
                    model="stories", prompt=prompt, max_tokens=8, temperature=0, stream=True
                )
                return "".join([c.choices[0].text async for c in stream])

            return await asyncio.gather(*(one(p) for p in ("Lily", STORY, "Lily")))

    lily, story, lily_again = asyncio.run(main())
    assert expected["lily"].text and expected["story8"].text  # 8 tokens each: never empty
    assert lily == lily_again == expected["lily"].text
    assert story == expected["story8"].text


# --- SmolLM2-135M-Instruct: chat ------------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> LLM:
    return LLM(device="cpu")


@pytest.fixture(scope="module")
def smol_expected(smol: LLM) -> dict[str, Any]:
    return {
        "chat": smol.chat(CHAT, _greedy(max_new_tokens=CHAT_TOKENS)),
        "logprobs": smol.chat(CHAT, _greedy(max_new_tokens=6, logprobs=True, top_logprobs=2)),
        "prompt_tokens": len(smol.chat_prompt(CHAT)[0]),
    }


@pytest.fixture(scope="module")
def smol_url(smol: LLM, smol_expected: dict[str, Any]) -> Iterator[str]:
    with running_server(smol, ServerConfig(max_concurrent_requests=MAX_CONCURRENT)) as url:
        yield url


def test_chat_equals_llm(smol_url: str, smol: LLM, smol_expected: dict) -> None:
    want: CompletionOutput = smol_expected["chat"]
    client = openai.OpenAI(base_url=smol_url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model=smol.model_name, messages=CHAT, max_tokens=CHAT_TOKENS, temperature=0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    reason = "stop" if len(want.token_ids) < CHAT_TOKENS else "length"
    assert choice.finish_reason == reason
    assert r.usage.prompt_tokens == smol_expected["prompt_tokens"]
    assert r.usage.completion_tokens == len(want.token_ids)
    # max_completion_tokens caps the reply.
    r = client.chat.completions.create(
        model=smol.model_name, messages=CHAT, max_completion_tokens=3, temperature=0
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert want.text.startswith(r.choices[0].message.content)


def test_chat_logprobs(smol_url: str, smol: LLM, smol_expected: dict) -> None:
    want: CompletionOutput = smol_expected["logprobs"]
    client = openai.OpenAI(base_url=smol_url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model=smol.model_name,
        messages=CHAT,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert [t.logprob for t in content] == want.logprobs
    assert b"".join(bytes(t.bytes) for t in content).decode() == want.text
    assert "".join(t.token for t in content) == want.text
    for token, tops in zip(content, want.top_logprobs, strict=True):
        assert [t.logprob for t in token.top_logprobs] == [lp for _, lp in tops]
        assert [t.token for t in token.top_logprobs] == [
            smol.tokenizer.decode([i]) for i, _ in tops
        ]


def test_chat_stream_async_with_usage(smol_url: str, smol: LLM, smol_expected: dict) -> None:
    want: CompletionOutput = smol_expected["chat"]

    async def main() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=smol_url + "/v1", api_key="x") as aclient:
            stream = await aclient.chat.completions.create(
                model=smol.model_name,
                messages=CHAT,
                max_tokens=CHAT_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    first, *middle, last = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert first.choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in middle) == want.text
    assert middle[-1].choices[0].finish_reason in ("stop", "length")
    assert last.choices == []
    assert last.usage.completion_tokens == len(want.token_ids)
    assert last.usage.prompt_tokens == smol_expected["prompt_tokens"]


def test_huggingface_inference_client_stream(smol_url: str, smol_expected: dict) -> None:
    hf = InferenceClient(base_url=smol_url)
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in hf.chat_completion(CHAT, stream=True, max_tokens=CHAT_TOKENS, temperature=0)
        if chunk.choices
    ]
    assert "".join(pieces) == smol_expected["chat"].text
    whole = hf.chat_completion(CHAT, max_tokens=CHAT_TOKENS, temperature=0)
    assert whole.choices[0].message.content == smol_expected["chat"].text


def test_raw_sse_framing(smol_url: str, smol: LLM) -> None:
    body = {"messages": CHAT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", smol_url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["model"] for c in chunks} == {smol.model_name}
    assert len({c["id"] for c in chunks}) == 1


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _wait_idle(url: str) -> None:
    deadline = time.monotonic() + 10
    names = ("kiln_kv_cache_blocks_used", "tgi_batch_current_size", "kiln_requests_in_flight")
    while any(_metric(url, n) for n in names):
        assert time.monotonic() < deadline, "the server did not free the aborted requests"
        time.sleep(0.02)


def test_overload_and_disconnects_free_everything(smol_url: str) -> None:
    long = {
        "prompt": STORY,
        "max_tokens": 2000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    url = smol_url + "/v1/completions"
    with httpx.Client(timeout=30) as http:
        streams = [http.stream("POST", url, json=long) for _ in range(MAX_CONCURRENT)]
        responses = [s.__enter__() for s in streams]
        # NOTE: the line iterators are kept: one garbage-collected closes its connection.
        lines = [r.iter_lines() for r in responses]
        for r, it in zip(responses, lines, strict=True):
            assert r.status_code == 200
            assert next(it).startswith("data: {")
        assert _metric(smol_url, "kiln_requests_in_flight") == MAX_CONCURRENT
        refused = http.post(url, json={**long, "stream": False})
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
        for s in streams:  # the clients go away mid-stream
            s.__exit__(None, None, None)
    _wait_idle(smol_url)
    aborted = _metric(smol_url, 'tgi_request_failure{err="aborted"}')
    assert aborted >= MAX_CONCURRENT
    # A non-streaming request whose client gives up is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={**long, "stream": False, "max_tokens": 2000}, timeout=0.3)
    _wait_idle(smol_url)
    assert _metric(smol_url, 'tgi_request_failure{err="aborted"}') == aborted + 1
