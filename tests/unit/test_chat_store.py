"""The web chat's conversation store on a real SQLite file: message trees and branches, order,
owners, bad input leaving the file untouched, crash recovery and schema migrations."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from kiln.errors import ConfigError, InvalidRequestError, NotFoundError
from kiln.store import ChatStore, GenerationSettings, MessageStatus, Role
from kiln.store.migrations import LATEST_VERSION, migrate, schema_version

ALICE, BOB = "owner-alice", "owner-bob"


@pytest.fixture
def store(tmp_path: Path) -> ChatStore:
    return ChatStore(tmp_path / "chat.sqlite3")


def _exchange(store: ChatStore, conversation: str, parent: str | None, question: str) -> str:
    user = store.add_message(ALICE, conversation, parent, Role.USER, question)
    answer = store.add_message(ALICE, conversation, user.id, Role.ASSISTANT, f"re: {question}")
    return answer.id


def test_a_conversation_is_a_tree_of_branches(store: ChatStore) -> None:
    chat = store.create_conversation(ALICE, "Colours")
    first = store.add_message(ALICE, chat.id, None, Role.USER, "My favourite colour is blue.")
    answer_1 = store.add_message(ALICE, chat.id, first.id, Role.ASSISTANT, "Nice.", model="m1")
    # Regenerate: a second answer to the same question, a sibling of the first.
    answer_2 = store.add_message(ALICE, chat.id, first.id, Role.ASSISTANT, "Blue!", model="m2")
    # Edit and resend the first question: a sibling of it, with its own answer.
    edited = store.add_message(ALICE, chat.id, None, Role.USER, "My favourite colour is red.")
    answer_3 = store.add_message(ALICE, chat.id, edited.id, Role.ASSISTANT, "Red!")

    messages = store.messages(ALICE, chat.id)
    assert [m.id for m in messages] == [first.id, answer_1.id, answer_2.id, edited.id, answer_3.id]
    assert [m.id for m in messages if m.parent_id == first.id] == [answer_1.id, answer_2.id]
    assert [m.id for m in messages if m.parent_id is None] == [first.id, edited.id]
    assert (answer_1.model, answer_2.model) == ("m1", "m2")
    # The newest message is the branch shown; any other can be selected.
    assert store.conversation(ALICE, chat.id).current_leaf_id == answer_3.id
    assert [m.id for m in store.branch(ALICE, chat.id, answer_3.id)] == [edited.id, answer_3.id]
    store.update_conversation(ALICE, chat.id, current_leaf_id=answer_2.id)
    assert store.conversation(ALICE, chat.id).current_leaf_id == answer_2.id
    assert [m.content for m in store.branch(ALICE, chat.id, answer_2.id)] == [
        "My favourite colour is blue.",
        "Blue!",
    ]


def test_deep_branch_order(store: ChatStore) -> None:
    chat = store.create_conversation(ALICE)
    leaf = None
    for i in range(6):
        leaf = _exchange(store, chat.id, leaf, f"question {i}")
    path = store.branch(ALICE, chat.id, leaf)
    assert [m.role for m in path] == [Role.USER, Role.ASSISTANT] * 6
    assert [m.content for m in path[::2]] == [f"question {i}" for i in range(6)]


def test_roles_must_alternate(store: ChatStore) -> None:
    chat = store.create_conversation(ALICE)
    with pytest.raises(InvalidRequestError, match="must answer a user message"):
        store.add_message(ALICE, chat.id, None, Role.ASSISTANT, "an answer to nothing")
    question = store.add_message(ALICE, chat.id, None, Role.USER, "hi")
    with pytest.raises(InvalidRequestError, match="follow an assistant message"):
        store.add_message(ALICE, chat.id, question.id, Role.USER, "hi again")
    with pytest.raises(NotFoundError):
        store.add_message(ALICE, chat.id, "no-such-message", Role.ASSISTANT, "?")
    assert [m.id for m in store.messages(ALICE, chat.id)] == [question.id]


def test_a_parent_must_be_in_the_same_conversation(store: ChatStore) -> None:
    one, two = store.create_conversation(ALICE), store.create_conversation(ALICE)
    question = store.add_message(ALICE, one.id, None, Role.USER, "hi")
    with pytest.raises(NotFoundError):
        store.add_message(ALICE, two.id, question.id, Role.ASSISTANT, "hello")
    with pytest.raises(NotFoundError):
        store.update_conversation(ALICE, two.id, current_leaf_id=question.id)
    # The database refuses it too, whatever a caller does.
    raw = sqlite3.connect(store.path)
    raw.execute("PRAGMA foreign_keys = ON")
    with pytest.raises(sqlite3.IntegrityError):
        raw.execute(
            "INSERT INTO messages (id, conversation_id, parent_id, role, content, status, "
            "created_at) VALUES ('x', ?, ?, 'assistant', '', 'complete', 0)",
            (two.id, question.id),
        )
    raw.close()


def test_newest_first_and_activity_moves_a_conversation_up(store: ChatStore) -> None:
    first = store.create_conversation(ALICE, "first")
    second = store.create_conversation(ALICE, "second")
    third = store.create_conversation(ALICE, "third")
    assert [c.title for c in store.conversations(ALICE)] == ["third", "second", "first"]
    time.sleep(0.01)
    store.add_message(ALICE, first.id, None, Role.USER, "bump")
    assert [c.id for c in store.conversations(ALICE)] == [first.id, third.id, second.id]
    # Renaming is not activity.
    store.update_conversation(ALICE, second.id, title="  renamed \n twice ")
    assert store.conversations(ALICE)[2].title == "renamed twice"


def test_owners_see_only_their_own(store: ChatStore) -> None:
    mine = store.create_conversation(ALICE, "secret plans")
    store.add_message(ALICE, mine.id, None, Role.USER, "the password is swordfish")
    assert store.conversations(BOB) == []
    assert store.search(BOB, "swordfish") == []
    for attempt in (
        lambda: store.conversation(BOB, mine.id),
        lambda: store.messages(BOB, mine.id),
        lambda: store.update_conversation(BOB, mine.id, title="mine now"),
        lambda: store.delete_conversation(BOB, mine.id),
        lambda: store.add_message(BOB, mine.id, None, Role.USER, "hi"),
    ):
        with pytest.raises(NotFoundError):
            attempt()
    assert store.conversation(ALICE, mine.id).title == "secret plans"
    assert "owner" not in mine.to_dict()


def test_delete_removes_the_whole_tree(store: ChatStore) -> None:
    chat = store.create_conversation(ALICE)
    _exchange(store, chat.id, None, "needle in a haystack")
    kept = store.create_conversation(ALICE)
    _exchange(store, kept.id, None, "another needle")
    store.delete_conversation(ALICE, chat.id)
    with pytest.raises(NotFoundError):
        store.messages(ALICE, chat.id)
    count = sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    assert count == 2
    assert {h.conversation_id for h in store.search(ALICE, "needle")} == {kept.id}


def test_settings_are_validated_and_kept(store: ChatStore) -> None:
    settings = GenerationSettings(temperature=0.7, top_k=40, max_new_tokens=64)
    chat = store.create_conversation(ALICE, system_prompt="Be terse.", settings=settings)
    reopened = ChatStore(store.path).conversation(ALICE, chat.id)
    assert reopened.settings == settings
    assert reopened.system_prompt == "Be terse."
    for bad in (
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": 2.5},
        {"top_k": True},
        {"max_new_tokens": 0},
        {"repetition_penalty": float("nan")},
        {"temperature": "hot"},
        {"nucleus": 0.9},
    ):
        with pytest.raises(InvalidRequestError):
            GenerationSettings.from_dict(bad)


def test_bad_input_changes_nothing(store: ChatStore) -> None:
    chat = store.create_conversation(ALICE, "kept")
    before = sqlite3.connect(store.path).execute("SELECT * FROM conversations").fetchall()
    for attempt in (
        lambda: store.update_conversation(ALICE, chat.id, title="x" * 1000),
        lambda: store.update_conversation(ALICE, chat.id, title="ok", current_leaf_id="nope"),
        lambda: store.add_message(ALICE, chat.id, None, Role.USER, "   "),
        lambda: store.add_message(ALICE, chat.id, None, Role.USER, "nul \x00 byte"),
    ):
        with pytest.raises((InvalidRequestError, NotFoundError)):
            attempt()
    after = sqlite3.connect(store.path).execute("SELECT * FROM conversations").fetchall()
    assert before == after
    assert store.messages(ALICE, chat.id) == []


def test_search_is_literal(store: ChatStore) -> None:
    chat = store.create_conversation(ALICE, "fruit")
    _exchange(store, chat.id, None, "strawberries are red")
    assert [h.snippet for h in store.search(ALICE, "STRAWBERRIES red")] == [
        "strawberries are red",
        "re: strawberries are red",
    ]
    # FTS5 syntax in a query is just text.
    for query in ('"', "red OR blue", "content:red", "*", "NEAR(", "   "):
        store.search(ALICE, query)
    assert store.search(ALICE, "red OR blue") == []


def test_an_answer_cut_by_a_crash_is_marked_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "chat.sqlite3"
    store = ChatStore(path)
    chat = store.create_conversation(ALICE)
    question = store.add_message(ALICE, chat.id, None, Role.USER, "tell me a story")
    answer = store.add_message(
        ALICE, chat.id, question.id, Role.ASSISTANT, "", MessageStatus.STREAMING, model="m"
    )
    store.update_message(answer.id, "Once upon a", MessageStatus.STREAMING)
    # The server dies here: the file is reopened by the next one.
    reopened = ChatStore(path)
    assert reopened.num_interrupted == 1
    found = reopened.message(ALICE, chat.id, answer.id)
    assert (found.content, found.status) == ("Once upon a", MessageStatus.INTERRUPTED)


def test_migrations_from_the_first_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    assert migrate(old, target=1) == 0
    old.execute(
        "INSERT INTO conversations (id, owner, title, created_at, updated_at) "
        "VALUES ('c1', ?, 'old chat', 1, 1)",
        (ALICE,),
    )
    old.execute(
        "INSERT INTO messages (id, conversation_id, parent_id, role, content, status, "
        "created_at) VALUES ('m1', 'c1', NULL, 'user', 'written before search existed', "
        "'complete', 1)"
    )
    old.close()

    store = ChatStore(path)  # migrates to the latest schema on open
    assert schema_version(store._db) == LATEST_VERSION
    assert [h.message_id for h in store.search(ALICE, "search existed")] == ["m1"]
    assert store.messages(ALICE, "c1")[0].content == "written before search existed"
    store.close()
    assert migrate(sqlite3.connect(path, isolation_level=None)) == LATEST_VERSION  # idempotent


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite3"
    ChatStore(path).close()
    future = sqlite3.connect(path)
    future.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    future.close()
    with pytest.raises(ConfigError, match="newer than this kiln knows"):
        ChatStore(path)


def test_a_failed_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "half.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, target=1)
    # Something in the way of migration 2: it must fail whole, not halfway.
    db.execute("CREATE TABLE messages_fts (x)")
    with pytest.raises(sqlite3.OperationalError):
        migrate(db)
    assert schema_version(db) == 1
    triggers = db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    assert triggers == []
