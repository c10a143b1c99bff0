"""Export and import of web chat conversations end to end: a real kiln server on loopback
(stories260K) with its store on a real SQLite file, and again on a real PostgreSQL server
(``--db postgresql://...``), driven over HTTP as the page drives it.

A conversation with branches (a regeneration, an edit), settings and a system prompt goes out
as JSON and comes back in as a new conversation equal to it but for its ids; Markdown gives
the branch shown; another owner can export nothing of it; bad files get a clear 422 and store
nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_chat_api import MODEL, TIMEOUT_S, _answer, _create, _get, _send

from kiln import LLM
from kiln.config.server import ServerConfig
from server_harness import running_server


@pytest.fixture(scope="module")
def llm(stories_dir: Path) -> LLM:
    return LLM(str(stories_dir), chat_template="chatml", kv_cache_memory=16 << 20)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def url(
    request: pytest.FixtureRequest, llm: LLM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        db = str(tmp_path_factory.mktemp("transfer") / "chat.sqlite3")
    else:
        db = request.getfixturevalue("postgres").new_database()
    with running_server(llm, ServerConfig(chat_db=db, model_id=MODEL)) as base:
        yield base


@pytest.fixture
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url + "/api/chat", timeout=TIMEOUT_S) as c:
        yield c


def _branched(client: httpx.Client) -> dict[str, Any]:
    """A conversation with two answers to its first question, an edited first question with
    its own answer and a follow-up, and the first answer's branch shown."""
    conversation = _create(
        client,
        title="Tom's ball",
        system_prompt="Tell short stories.",
        settings={"max_new_tokens": 10, "temperature": 0.5, "top_k": 7},
    )
    cid = conversation["id"]
    first = _send(client, cid, "Tom had a red ball.")
    answer_1 = first[-1]["message"]
    _answer(client, f"/conversations/{cid}/messages/{answer_1['id']}/regenerate")
    _send(client, cid, "Tom had a blue ball.", parent_id=None)
    _send(client, cid, "Then what?")
    client.patch(f"/conversations/{cid}", json={"current_leaf_id": answer_1["id"]})
    return _get(client, cid)


def _export(client: httpx.Client, cid: str, kind: str = "json") -> httpx.Response:
    response = client.get(f"/conversations/{cid}/export", params={"format": kind})
    assert response.status_code == 200, response.text
    return response


def _without_ids(conversation: dict[str, Any]) -> dict[str, Any]:
    """``conversation`` with each id replaced by its message's place in the list."""
    place = {m["id"]: i for i, m in enumerate(conversation["messages"])}
    messages = [
        {**m, "id": place[m["id"]], "parent_id": place.get(m["parent_id"])}
        for m in conversation["messages"]
    ]
    return {
        **conversation,
        "id": None,
        "current_leaf_id": place.get(conversation["current_leaf_id"]),
        "messages": messages,
    }


def test_json_round_trip_keeps_the_whole_tree(client: httpx.Client) -> None:
    stored = _branched(client)
    response = _export(client, stored["id"])
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["content-disposition"] == (
        'attachment; filename="kiln-chat-tom-s-ball.json"'
    )
    document = response.json()
    assert (document["format"], document["version"]) == ("kiln.chat", 1)
    [exported] = document["conversations"]
    assert "owner" not in exported
    assert exported["id"] == stored["id"]
    assert exported["settings"]["temperature"] == 0.5 and exported["settings"]["top_k"] == 7
    assert exported["system_prompt"] == "Tell short stories."
    assert exported["current_leaf_id"] == stored["current_leaf_id"]
    # Every message of every branch, with its links, statuses and models.
    assert [m["id"] for m in exported["messages"]] == [m["id"] for m in stored["messages"]]
    for mine, theirs in zip(exported["messages"], stored["messages"], strict=True):
        assert mine == {k: v for k, v in theirs.items() if k != "conversation_id"}
    assert len(exported["messages"]) == 7
    assert {m["model"] for m in exported["messages"] if m["role"] == "assistant"} == {MODEL}

    imported = client.post("/import", json=document)
    assert imported.status_code == 201, imported.text
    [copy] = imported.json()["conversations"]
    assert copy["id"] != stored["id"]
    again = _export(client, copy["id"]).json()["conversations"][0]
    assert not {m["id"] for m in again["messages"]} & {m["id"] for m in exported["messages"]}
    assert _without_ids(again) == _without_ids(exported)
    # The copy is a conversation like any other: listed, shown on its branch, answerable.
    shown = _get(client, copy["id"])
    assert [shown_message["content"] for shown_message in shown["messages"]] == [
        m["content"] for m in exported["messages"]
    ]
    assert len(shown["branch"]) == 2
    assert copy["id"] in [c["id"] for c in client.get("/conversations").json()]
    follow = _send(client, copy["id"], "And then?")
    assert follow[0]["user"]["parent_id"] == shown["branch"][-1]
    assert follow[-1]["message"]["status"] == "complete"


def test_markdown_is_the_branch_shown(client: httpx.Client) -> None:
    stored = _branched(client)
    response = _export(client, stored["id"], "markdown")
    assert response.headers["content-type"].startswith("text/markdown")
    assert response.headers["content-disposition"].endswith('kiln-chat-tom-s-ball.md"')
    text = response.text
    messages = {m["id"]: m for m in stored["messages"]}
    question, answer = (messages[i] for i in stored["branch"])
    assert text.startswith("# Tom's ball\n")
    assert f"- Model: {MODEL}" in text
    assert "temperature 0.5" in text and "top_k 7" in text
    assert "## System prompt\n\nTell short stories." in text
    assert f"## User\n\n{question['content']}" in text
    assert f"## Assistant ({MODEL})\n\n{answer['content'].strip()}" in text
    # The other branches are not in it.
    assert "blue ball" not in text and "Then what?" not in text
    assert text.count("## User") == 1 and text.count("## Assistant") == 1


def test_all_of_an_owners_conversations_export_and_import(client: httpx.Client, url: str) -> None:
    with httpx.Client(base_url=url + "/api/chat", timeout=TIMEOUT_S) as fresh:
        one, two = _create(fresh, title="one"), _create(fresh, title="two")
        _send(fresh, one["id"], "Once upon a time")
        everything = fresh.get("/export")
        assert everything.status_code == 200
        document = everything.json()
        assert [c["title"] for c in document["conversations"]] == ["one", "two"]
        assert [len(c["messages"]) for c in document["conversations"]] == [2, 0]
        assert two["id"] in {c["id"] for c in document["conversations"]}
    # Imported by another browser: copies of its own; the first one's are untouched.
    response = client.post("/import", json=document)
    assert response.status_code == 201, response.text
    assert [c["title"] for c in response.json()["conversations"]] == ["one", "two"]
    mine = {c["id"] for c in client.get("/conversations").json()}
    assert not mine & {one["id"], two["id"]}


def test_another_owner_can_export_nothing(client: httpx.Client, url: str) -> None:
    stored = _branched(client)
    with httpx.Client(base_url=url + "/api/chat", timeout=TIMEOUT_S) as other:
        for kind in ("json", "markdown"):
            response = other.get(f"/conversations/{stored['id']}/export", params={"format": kind})
            assert response.status_code == 404
            assert "Tom" not in response.text
        assert other.get("/export").json()["conversations"] == []
    assert client.get("/conversations/nope/export").status_code == 404


def test_bad_files_are_refused_and_store_nothing(client: httpx.Client) -> None:
    stored = _branched(client)
    document = _export(client, stored["id"]).json()
    before = client.get("/conversations").json()

    def refused(body: Any, status: int = 422, **kwargs: Any) -> str:
        if "content" not in kwargs:
            kwargs["json"] = body
        response = client.post("/import", **kwargs)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert isinstance(error, str) and error
        return error

    def changed(path: list[Any], value: Any) -> dict[str, Any]:
        copy = json.loads(json.dumps(document))
        target = copy
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return copy

    messages = ["conversations", 0, "messages"]
    assert "JSON" in refused(
        None, content=b"{not json", headers={"content-type": "application/json"}
    )
    refused([document])
    assert "not a kiln chat export" in refused({**document, "format": "other"})
    assert "version 2" in refused({**document, "version": 2})
    assert "conversations" in refused({**document, "conversations": []})
    assert "conversations.0.messages.0.role" in refused(changed([*messages, 0, "role"], "system"))
    assert "created_at" in refused(changed(["conversations", 0, "created_at"], -1))
    assert "temperature" in refused(changed(["conversations", 0, "settings", "temperature"], -1))
    assert "surprise" in refused(changed(["conversations", 0, "surprise"], 1))
    assert "not listed before it" in refused(changed([*messages, 1, "parent_id"], "nowhere"))
    # An answer to an answer: the tree's rule holds for imports too.
    first_answer = document["conversations"][0]["messages"][1]["id"]
    assert "must answer a user message" in refused(
        changed([*messages, 2, "parent_id"], first_answer)
    )
    assert "current_leaf_id" in refused(changed(["conversations", 0, "current_leaf_id"], "nope"))
    # A good conversation beside a bad one: neither is stored.
    bad = changed([*messages, 0, "content"], "")
    bad["conversations"].insert(0, document["conversations"][0])
    assert "content" in refused(bad)
    refused(document, 403, json=document, headers={"origin": "https://evil.example"})
    assert client.get("/conversations").json() == before
    assert client.get("/conversations/x/export", params={"format": "pdf"}).status_code == 422
