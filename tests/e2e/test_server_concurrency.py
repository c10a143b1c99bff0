"""Many streams at once on a real server on loopback (stories260K): TGI ``/generate_stream``,
OpenAI completions and chat completions, about a third of whose clients hang up mid-stream.

Every stream that is read to its end must be exactly what the same request gives in-process
(greedy), with the right final event; the ones cut short must be aborted, their KV blocks
freed; afterwards the server is idle and still answers correctly.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln import LLM, SamplingParams
from kiln.config.server import ServerConfig
from server_harness import running_server

NUM_STREAMS = 32
DISCONNECT_EVERY = 3  # about one client in three hangs up
LONG_TOKENS = 400  # what a client that hangs up asks for: it is surely still generating
PROMPTS = [
    "Lily and Max went to the park.",
    "Once upon a time",
    "The little dog was sad because",
    "Tom had a red ball.",
    "One day, a big bird",
    "Sue and her mom baked a cake.",
    "The sun was hot and",
    "Ben saw a cat in the tree.",
]
KINDS = ("tgi", "completion", "chat")
TIMEOUT_S = 60.0
IDLE_GAUGES = (
    "kiln_kv_cache_blocks_used",
    "tgi_batch_current_size",
    "tgi_queue_size",
    "kiln_requests_in_flight",
)


def _llm(path: Path) -> LLM:
    # chatml: stories260K has no chat template of its own.
    return LLM(str(path), chat_template="chatml", kv_cache_memory=64 << 20)


@dataclass(frozen=True)
class Plan:
    """One client: what it asks for and, when it hangs up, after how many events."""

    index: int
    kind: str
    prompt: str
    max_tokens: int
    hang_up_after: int | None

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def _plans() -> list[Plan]:
    rng = random.Random(1234)
    plans = []
    for i in range(NUM_STREAMS):
        hang_up = rng.randint(1, 6) if i % DISCONNECT_EVERY == 1 else None
        plans.append(
            Plan(
                index=i,
                kind=KINDS[(i + i // DISCONNECT_EVERY) % len(KINDS)],
                prompt=PROMPTS[rng.randrange(len(PROMPTS))],
                max_tokens=LONG_TOKENS if hang_up else rng.randint(8, 40),
                hang_up_after=hang_up,
            )
        )
    return plans


PLANS = _plans()


@pytest.fixture(scope="module")
def expected(stories_dir: Path) -> dict[int, Any]:
    """The in-process greedy output of every client that reads to the end."""
    llm = _llm(stories_dir)
    out = {}
    for plan in PLANS:
        if plan.hang_up_after is not None:
            continue
        params = SamplingParams(temperature=0.0, max_new_tokens=plan.max_tokens)
        if plan.kind == "chat":
            out[plan.index] = llm.chat(plan.messages, params)
        else:
            (out[plan.index],) = llm.generate([plan.prompt], params)
    return out


@pytest.fixture(scope="module")
def url(stories_dir: Path, expected: dict[int, Any]) -> Iterator[str]:
    with running_server(_llm(stories_dir), ServerConfig()) as base:
        yield base


def _request(plan: Plan) -> tuple[str, dict[str, Any]]:
    if plan.kind == "tgi":
        parameters = {"max_new_tokens": plan.max_tokens, "details": True, "do_sample": False}
        return "/generate_stream", {"inputs": plan.prompt, "parameters": parameters}
    common = {
        "max_tokens": plan.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if plan.kind == "chat":
        return "/v1/chat/completions", {"messages": plan.messages, **common}
    return "/v1/completions", {"prompt": plan.prompt, **common}


async def _run(client: httpx.AsyncClient, plan: Plan) -> list[str]:
    """The ``data:`` payloads the client read (all of them, or up to where it hung up)."""
    path, body = _request(plan)
    events: list[str] = []
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line.removeprefix("data:").strip())
            if plan.hang_up_after is not None and len(events) >= plan.hang_up_after:
                break  # leaving the block closes the connection mid-stream
    return events


def _check_tgi(events: list[str], expected: Any, plan: Plan) -> None:
    data = [json.loads(e) for e in events]
    assert [d["index"] for d in data] == list(range(1, plan.max_tokens + 1))
    assert [d["token"]["id"] for d in data] == expected.token_ids
    assert all(d.get("generated_text") is None for d in data[:-1])
    last = data[-1]
    assert last["generated_text"] == expected.text
    assert "".join(d["token"]["text"] for d in data) == expected.text
    assert last["details"]["finish_reason"] == "length"
    assert last["details"]["generated_tokens"] == plan.max_tokens


def _check_openai(events: list[str], expected: Any, plan: Plan) -> None:
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == plan.max_tokens
    assert usage["prompt_tokens"] == len(expected.prompt_token_ids)
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert {c["index"] for c in choices} == {0}
    assert all(c["finish_reason"] is None for c in choices[:-1])
    assert choices[-1]["finish_reason"] == "length"
    if plan.kind == "chat":
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["delta"].get("content") or "" for c in choices)
    else:
        assert chunks[0]["object"] == "text_completion"
        text = "".join(c["text"] for c in choices)
    assert text == expected.text
    assert len({c["id"] for c in chunks}) == 1


def _metric(client: httpx.Client, name: str) -> float:
    """A sample of /metrics (0 when absent, as for a label value not seen yet)."""
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _wait_idle(client: httpx.Client, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_metric(client, g) for g in IDLE_GAUGES):
        assert time.monotonic() < deadline, {g: _metric(client, g) for g in IDLE_GAUGES}
        time.sleep(0.02)


def test_parallel_streams_with_random_disconnects(url: str, expected: dict[int, Any]) -> None:
    assert sum(p.hang_up_after is not None for p in PLANS) >= NUM_STREAMS // 4
    assert {p.kind for p in PLANS if p.hang_up_after is not None} == set(KINDS)
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
        _wait_idle(http)
        cancelled = _metric(http, 'tgi_request_failure{err="cancelled"}')
        aborted = _metric(http, 'tgi_request_failure{err="aborted"}')
        succeeded = _metric(http, "tgi_request_success")
        generated = _metric(http, "kiln_generation_tokens")

        async def main() -> list[list[str]]:
            limits = httpx.Limits(max_connections=NUM_STREAMS * 2)
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as c:
                return await asyncio.gather(*(_run(c, plan) for plan in PLANS))

        results = asyncio.run(main())

        for plan, events in zip(PLANS, results, strict=True):
            if plan.hang_up_after is not None:
                assert len(events) == plan.hang_up_after
            elif plan.kind == "tgi":
                _check_tgi(events, expected[plan.index], plan)
            else:
                _check_openai(events, expected[plan.index], plan)

        _wait_idle(http)
        hung_up = [p for p in PLANS if p.hang_up_after is not None]
        num_tgi = sum(p.kind == "tgi" for p in hung_up)
        succeeded = _metric(http, "tgi_request_success") - succeeded
        cancelled = _metric(http, 'tgi_request_failure{err="cancelled"}') - cancelled
        aborted = _metric(http, 'tgi_request_failure{err="aborted"}') - aborted
        assert succeeded == NUM_STREAMS - len(hung_up)
        assert cancelled == num_tgi  # TGI's name for it
        assert aborted == len(hung_up) - num_tgi  # OpenAI's
        # The clients that hung up stopped their requests: far fewer tokens than they asked for.
        asked = sum(p.max_tokens for p in PLANS)
        assert _metric(http, "kiln_generation_tokens") - generated < asked / 2

        # Still serving, and still right.
        plan = next(p for p in PLANS if p.kind == "completion" and p.hang_up_after is None)
        path, body = _request(plan)
        response = http.post(path, json={**body, "stream": False, "stream_options": None})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected[plan.index].text
        _wait_idle(http)
