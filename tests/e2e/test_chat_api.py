"""The web chat API end to end: a real kiln server on loopback (stories260K, the chatml
template), a real SQLite file, driven over HTTP as the page drives it.

Answers stream as server-sent events; regenerations and edits become sibling branches; Stop
aborts the engine request (its KV blocks are freed at once); bad input gets a clear 4xx and
changes nothing; another browser (another owner cookie) sees nothing of the first one's.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln import LLM
from kiln.config.server import ServerConfig
from kiln.server.chat.owner import COOKIE
from server_harness import running_server

TIMEOUT_S = 60.0
SHORT = {"max_new_tokens": 12}
MODEL = "stories"


class Pace:
    """Slows each engine step while ``delay`` is set, so a test can stop an answer midway
    (stories260K otherwise writes hundreds of tokens in well under a second)."""

    def __init__(self, llm: LLM) -> None:
        self.delay = 0.0
        step = llm.engine.step

        def paced_step() -> Any:
            if self.delay:
                time.sleep(self.delay)
            return step()

        llm.engine.step = paced_step  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def llm(stories_dir: Path) -> LLM:
    return LLM(str(stories_dir), chat_template="chatml", kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def pace(llm: LLM) -> Pace:
    return Pace(llm)


@pytest.fixture(scope="module")
def chat_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chat") / "chat.sqlite3"


@pytest.fixture(scope="module")
def url(llm: LLM, pace: Pace, chat_db: Path) -> Iterator[str]:
    with running_server(llm, ServerConfig(chat_db=str(chat_db), model_id=MODEL)) as base:
        yield base


@pytest.fixture
def client(url: str) -> Iterator[httpx.Client]:
    """One browser: its owner cookie is set by the first answer and kept."""
    with httpx.Client(base_url=url + "/api/chat", timeout=TIMEOUT_S) as c:
        yield c


def _create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/conversations", json={"settings": SHORT, **body})
    assert response.status_code == 201, response.text
    return response.json()


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def _answer(client: httpx.Client, path: str, body: Any = None) -> list[dict[str, Any]]:
    with client.stream("POST", path, json=body) as response:
        return list(_events(response))


def _send(client: httpx.Client, conversation: str, content: str, **more: Any) -> list[dict]:
    return _answer(client, f"/conversations/{conversation}/messages", {"content": content, **more})


def _get(client: httpx.Client, conversation: str) -> dict[str, Any]:
    response = client.get(f"/conversations/{conversation}")
    assert response.status_code == 200, response.text
    return response.json()


def test_an_answer_streams_and_is_stored(client: httpx.Client, url: str) -> None:
    conversation = _create(client, title="Stories", system_prompt="Tell short stories.")
    events = _send(client, conversation["id"], "Once upon a time")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert set(kinds[1:-1]) == {"delta"} and len(kinds) > 3  # token by token
    start, end = events[0], events[-1]
    assert start["user"]["content"] == "Once upon a time"
    assert start["assistant"]["status"] == "streaming"
    answer = end["message"]
    assert answer["content"] == "".join(e["text"] for e in events[1:-1]) != ""
    assert (answer["status"], answer["model"]) == ("complete", MODEL)

    stored = _get(client, conversation["id"])
    assert stored["branch"] == [start["user"]["id"], answer["id"]]
    assert stored["current_leaf_id"] == answer["id"]
    assert [m["content"] for m in stored["messages"]] == ["Once upon a time", answer["content"]]
    assert "owner" not in stored
    # Listed newest first, and the page's defaults say who answers.
    newer = _create(client, title="Newer")
    listed = [c["id"] for c in client.get("/conversations").json()]
    assert listed.index(newer["id"]) < listed.index(conversation["id"])
    defaults = client.get("/defaults").json()
    assert defaults["model"] == MODEL
    # stories260K's generation_config.json sets no sampling: the tutorial chatbot's.
    assert defaults["settings"]["temperature"] == 0.9
    assert defaults["settings"]["top_k"] == 50
    assert defaults["settings"]["repetition_penalty"] == 1.2


def test_regenerate_and_edit_make_sibling_branches(client: httpx.Client) -> None:
    conversation = _create(client)
    first = _send(client, conversation["id"], "Tom had a red ball.")
    question, answer_1 = first[0]["user"], first[-1]["message"]

    again = _answer(
        client, f"/conversations/{conversation['id']}/messages/{answer_1['id']}/regenerate"
    )
    assert again[0]["user"] is None
    answer_2 = again[-1]["message"]
    assert answer_2["parent_id"] == question["id"] and answer_2["status"] == "complete"

    # Edit the question and send it again: a sibling of it (both start the conversation).
    edited = _send(client, conversation["id"], "Tom had a blue ball.", parent_id=None)
    question_2, answer_3 = edited[0]["user"], edited[-1]["message"]
    assert question_2["parent_id"] is None

    # A follow-up on the branch shown, then back to the first branch.
    follow = _send(client, conversation["id"], "Then what?")
    assert follow[0]["user"]["parent_id"] == answer_3["id"]

    stored = _get(client, conversation["id"])
    messages = {m["id"]: m for m in stored["messages"]}
    children: dict[str | None, list[str]] = {}
    for m in stored["messages"]:
        children.setdefault(m["parent_id"], []).append(m["id"])
    assert children[None] == [question["id"], question_2["id"]]
    assert children[question["id"]] == [answer_1["id"], answer_2["id"]]
    assert len(stored["branch"]) == 4

    switched = client.patch(
        f"/conversations/{conversation['id']}", json={"current_leaf_id": answer_1["id"]}
    )
    assert switched.status_code == 200
    assert switched.json()["branch"] == [question["id"], answer_1["id"]]
    assert messages[answer_1["id"]]["model"] == MODEL


def _eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=TIMEOUT_S).text
    values = re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    assert values, f"{name} not in /metrics"
    return sum(float(v) for v in values)


def test_stop_aborts_the_answer_and_frees_its_kv_blocks(
    client: httpx.Client, url: str, llm: LLM, pace: Pace
) -> None:
    conversation = _create(client, settings={"max_new_tokens": 300})
    aborted_before = llm.engine.metrics.num_requests_finished.get("abort", 0)
    pace.delay = 0.02  # 300 tokens would take over 6 s
    events: list[dict[str, Any]] = []
    try:
        path = f"/conversations/{conversation['id']}/messages"
        with client.stream("POST", path, json={"content": "Once upon a time"}) as response:
            for event in _events(response):
                events.append(event)
                if event["type"] == "delta" and len(events) == 4:
                    # Running, and holding KV blocks, until stopped.
                    assert _metric(url, "kiln_kv_cache_blocks_used") > 0
                    assistant = events[0]["assistant"]["id"]
                    stop = client.post(
                        f"/conversations/{conversation['id']}/messages/{assistant}/stop"
                    )
                    assert stop.status_code == 202, stop.text
    finally:
        pace.delay = 0.0
    answer = events[-1]["message"]
    assert (events[-1]["type"], answer["status"]) == ("end", "stopped")
    deltas = [e for e in events if e["type"] == "delta"]
    assert 3 <= len(deltas) < 100
    assert answer["content"] == "".join(e["text"] for e in deltas)
    # The abort reaches the engine thread at its next step: the request ends as aborted (not
    # at its length), and every block it held is free.
    _eventually(lambda: llm.engine.metrics.num_requests_finished.get("abort", 0) > aborted_before)
    assert llm.engine.metrics.num_requests_finished.get("abort", 0) == aborted_before + 1
    _eventually(lambda: llm.engine.stats().num_kv_blocks_used == 0)
    assert _metric(url, "kiln_kv_cache_blocks_used") == 0
    stored = _get(client, conversation["id"])
    assert stored["messages"][-1]["status"] == "stopped"
    # Nothing runs any more: stopping again is a conflict.
    again = client.post(f"/conversations/{conversation['id']}/messages/{answer['id']}/stop")
    assert again.status_code == 409


def test_leaving_mid_answer_stops_it(client: httpx.Client, llm: LLM, pace: Pace) -> None:
    conversation = _create(client, settings={"max_new_tokens": 300})
    pace.delay = 0.02
    try:
        path = f"/conversations/{conversation['id']}/messages"
        with client.stream("POST", path, json={"content": "Once upon a time"}) as response:
            for event in _events(response):
                if event["type"] == "delta":
                    break  # the client goes away
    finally:
        pace.delay = 0.0
    _eventually(lambda: _get(client, conversation["id"])["messages"][-1]["status"] != "streaming")
    assert _get(client, conversation["id"])["messages"][-1]["status"] == "stopped"
    _eventually(lambda: llm.engine.stats().num_kv_blocks_used == 0)


def test_bad_input_is_refused_and_changes_nothing(client: httpx.Client, chat_db: Path) -> None:
    conversation = _create(client)
    cid = conversation["id"]
    _send(client, cid, "Hello")
    before = _get(client, cid)

    def refused(method: str, path: str, status: int, **kwargs: Any) -> str:
        response = client.request(method, path, **kwargs)
        assert response.status_code == status, (path, response.text)
        body = response.json()
        assert isinstance(body["error"], str) and body["error"]
        return body["error"]

    messages = f"/conversations/{cid}/messages"
    assert "content" in refused("POST", messages, 422, json={"content": ""})
    assert "content" in refused("POST", messages, 422, json={"content": "   "})
    refused("POST", messages, 422, json={"content": "hi", "role": "system"})
    refused(
        "POST", messages, 422, content=b"{not json", headers={"content-type": "application/json"}
    )
    question = before["branch"][0]
    assert "follow an answer" in refused(
        "POST", messages, 422, json={"content": "x", "parent_id": question}
    )
    refused("POST", messages, 404, json={"content": "x", "parent_id": "no-such-message"})
    refused("POST", "/conversations/no-such-conversation/messages", 404, json={"content": "x"})
    refused("PATCH", f"/conversations/{cid}", 422, json={"settings": {"temperature": -1}})
    refused("PATCH", f"/conversations/{cid}", 422, json={"settings": {"top_p": 2}})
    refused("PATCH", f"/conversations/{cid}", 422, json={"title": None})
    refused("PATCH", f"/conversations/{cid}", 404, json={"current_leaf_id": "nope"})
    refused("POST", "/conversations", 422, json={"title": "x" * 1000})
    refused("POST", f"/conversations/{cid}/messages/nope/stop", 404)
    refused("GET", "/search", 422)
    # Longer than the context: refused before anything is stored.
    client.patch(f"/conversations/{cid}", json={"settings": {"max_new_tokens": 100_000}})
    assert "max_new_tokens" in refused("POST", messages, 422, json={"content": "Hi"})
    client.patch(f"/conversations/{cid}", json={"settings": SHORT})
    # A write from another site's page.
    refused("DELETE", f"/conversations/{cid}", 403, headers={"origin": "https://evil.example"})
    refused("POST", "/conversations", 403, json={}, headers={"sec-fetch-site": "cross-site"})

    after = _get(client, cid)
    assert after["messages"] == before["messages"]
    assert after["branch"] == before["branch"]
    with sqlite3.connect(chat_db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_another_owner_sees_nothing(client: httpx.Client, url: str) -> None:
    mine = _create(client, title="mine")
    _send(client, mine["id"], "a secret story")
    assert client.cookies.get(COOKIE)
    with httpx.Client(base_url=url + "/api/chat", timeout=TIMEOUT_S) as other:
        assert other.get("/conversations").json() == []
        assert other.get("/search", params={"q": "secret"}).json() == []
        for method, path in [
            ("GET", f"/conversations/{mine['id']}"),
            ("PATCH", f"/conversations/{mine['id']}"),
            ("DELETE", f"/conversations/{mine['id']}"),
            ("POST", f"/conversations/{mine['id']}/messages"),
        ]:
            body = {"content": "hi"} if method == "POST" else {}
            assert other.request(method, path, json=body).status_code == 404
    assert _get(client, mine["id"])["title"] == "mine"
    assert [h["conversation_id"] for h in client.get("/search", params={"q": "secret"}).json()][
        :1
    ] == [mine["id"]]


def test_crud_and_restart(client: httpx.Client, url: str, chat_db: Path, llm: LLM) -> None:
    conversation = _create(client, title="Keep me")
    renamed = client.patch(f"/conversations/{conversation['id']}", json={"title": "Kept"})
    assert renamed.json()["title"] == "Kept"
    doomed = _create(client, title="Delete me")
    assert client.delete(f"/conversations/{doomed['id']}").status_code == 204
    assert client.get(f"/conversations/{doomed['id']}").status_code == 404
    # Another server on the same file (the first one restarted) finds it all.
    config = ServerConfig(chat_db=str(chat_db), model_id=MODEL)
    with running_server(llm, config) as second, httpx.Client(cookies=client.cookies) as again:
        titles = [c["title"] for c in again.get(second + "/api/chat/conversations").json()]
    assert "Kept" in titles and "Delete me" not in titles


def test_concurrent_answers_in_one_conversation(client: httpx.Client) -> None:
    """Two answers at once (two tabs) both land, as siblings, and the file stays whole."""
    conversation = _create(client)
    first = _send(client, conversation["id"], "One day")
    question = first[0]["user"]["id"]
    path = f"/conversations/{conversation['id']}/messages/{question}/regenerate"
    results: list[list[dict[str, Any]]] = []
    threads = [
        threading.Thread(target=lambda: results.append(_answer(client, path))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert [r[-1]["message"]["status"] for r in results] == ["complete", "complete"]
    stored = _get(client, conversation["id"])
    assert sum(m["parent_id"] == question for m in stored["messages"]) == 3


def test_with_an_api_key_only_the_page_is_public(llm: LLM, tmp_path: Path) -> None:
    config = ServerConfig(chat_db=str(tmp_path / "chat.sqlite3"), api_key="s3cret")
    with running_server(llm, config) as base, httpx.Client(base_url=base) as http:
        assert http.get("/").status_code == 200  # the page asks for the key itself
        assert http.get("/ui/app.js").status_code == 200
        assert http.get("/api/chat/conversations").status_code == 401
        # POST / is TGI's generate route: it keeps needing the key.
        assert http.post("/", json={"inputs": "Once"}).status_code == 401
        auth = {"authorization": "Bearer s3cret"}
        assert http.get("/api/chat/conversations", headers=auth).json() == []


def test_a_long_history_is_cut_to_fit_and_says_so(client: httpx.Client) -> None:
    """stories260K holds 512 tokens: a few long questions overflow it, and the oldest
    exchanges are dropped (the system prompt kept), as ``kiln chat`` does."""
    conversation = _create(client, system_prompt="Be brief.", settings={"max_new_tokens": 8})
    long_question = "Once upon a time there was a little dog who liked to play. " * 4
    truncated = []
    for _ in range(5):
        events = _send(client, conversation["id"], long_question)
        assert events[-1]["message"]["status"] == "complete"
        truncated.append(events[-1]["message"]["truncated"])
    assert truncated[0] is False and truncated[-1] is True
    assert _get(client, conversation["id"])["messages"][-1]["truncated"] is True
