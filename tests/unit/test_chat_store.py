"""The web chat's conversation store, the same suite on a real SQLite file and on a real
PostgreSQL server (tests/postgres_server.py): message trees and branches, order, owners, bad
input leaving the database untouched, imports, crash recovery, concurrent writers and the
Alembic schema migrations (from the first revision, and from files of the first hand-written
SQLite store)."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DatabaseError, IntegrityError

from kiln.errors import ConfigError, InvalidRequestError, NotFoundError
from kiln.store import ChatStore, GenerationSettings, MessageStatus, Role
from kiln.store.database import database_url, describe
from kiln.store.migrations import current_revision, migrate, scripts
from postgres_server import PostgresServer

ALICE, BOB = "owner-alice", "owner-bob"
HEAD = scripts().get_current_head()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "chat.sqlite3")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def store(database: str) -> ChatStore:
    opened = ChatStore(database)
    yield opened
    opened.close()


def _rows(store: ChatStore, query: str) -> list[tuple]:
    with store.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.text(query))]


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
    assert store.branch(ALICE, chat.id, None) == []


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
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO messages (id, conversation_id, parent_id, role, content, status, "
                "created_at) VALUES ('x', :two, :question, 'assistant', '', 'complete', 0)"
            ),
            {"two": two.id, "question": question.id},
        )
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO messages (id, conversation_id, role, content, status, created_at) "
                "VALUES ('y', :one, 'system', '', 'complete', 0)"
            ),
            {"one": one.id},
        )


def test_newest_first_and_activity_moves_a_conversation_up(store: ChatStore) -> None:
    first = store.create_conversation(ALICE, "first")
    second = store.create_conversation(ALICE, "second")
    third = store.create_conversation(ALICE, "third")
    assert [c.title for c in store.conversations(ALICE)] == ["third", "second", "first"]
    store.add_message(ALICE, first.id, None, Role.USER, "bump")
    assert [c.id for c in store.conversations(ALICE)] == [first.id, third.id, second.id]
    # Renaming is not activity.
    store.update_conversation(ALICE, second.id, title="  renamed \n twice ")
    assert store.conversations(ALICE)[2].title == "renamed twice"
    assert [c.id for c in store.conversations(ALICE, limit=1)] == [first.id]


def test_owners_see_only_their_own(store: ChatStore) -> None:
    mine = store.create_conversation(ALICE, "secret plans")
    question = store.add_message(ALICE, mine.id, None, Role.USER, "the password is swordfish")
    assert store.conversations(BOB) == []
    assert store.search(BOB, "swordfish") == []
    assert [h.message_id for h in store.search(ALICE, "swordfish")] == [question.id]
    for attempt in (
        lambda: store.conversation(BOB, mine.id),
        lambda: store.messages(BOB, mine.id),
        lambda: store.message(BOB, mine.id, question.id),
        lambda: store.branch(BOB, mine.id, question.id),
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
    assert _rows(store, "SELECT COUNT(*) FROM messages") == [(2,)]
    assert {h.conversation_id for h in store.search(ALICE, "needle")} == {kept.id}


def test_settings_are_validated_and_kept(database: str, store: ChatStore) -> None:
    settings = GenerationSettings(temperature=0.7, top_k=40, max_new_tokens=64)
    chat = store.create_conversation(ALICE, system_prompt="Be terse.", settings=settings)
    reopened = ChatStore(database)
    assert reopened.conversation(ALICE, chat.id).settings == settings
    assert reopened.conversation(ALICE, chat.id).system_prompt == "Be terse."
    reopened.close()
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
    before = _rows(store, "SELECT * FROM conversations")
    for attempt in (
        lambda: store.update_conversation(ALICE, chat.id, title="x" * 1000),
        lambda: store.update_conversation(ALICE, chat.id, title="ok", current_leaf_id="nope"),
        lambda: store.add_message(ALICE, chat.id, None, Role.USER, "   "),
        lambda: store.add_message(ALICE, chat.id, None, Role.USER, "nul \x00 byte"),
    ):
        with pytest.raises((InvalidRequestError, NotFoundError)):
            attempt()
    assert _rows(store, "SELECT * FROM conversations") == before
    assert store.messages(ALICE, chat.id) == []


def test_search_is_literal(store: ChatStore) -> None:
    chat = store.create_conversation(ALICE, "fruit")
    _exchange(store, chat.id, None, "strawberries are red")
    hits = store.search(ALICE, "STRAWBERRIES red")
    assert [h.snippet for h in hits] == ["strawberries are red", "re: strawberries are red"]
    assert {h.conversation_title for h in hits} == {"fruit"}
    assert store.search(ALICE, "strawberries blue") == []  # every word, not any
    # Query syntax of either backend is just text.
    for query in ('"', "red OR blue", "content:red", "*", "NEAR(", "   ", "red & !blue", "a:*"):
        store.search(ALICE, query)
    assert store.search(ALICE, "red OR blue") == []
    assert store.search(ALICE, "red & !blue") == []
    assert len(store.search(ALICE, "Red!")) == 2  # punctuation is no part of a word
    # The index follows edits: an answer's text as it is now is what is found.
    answer = store.messages(ALICE, chat.id)[1]
    store.update_message(answer.id, "now about bananas", MessageStatus.COMPLETE)
    assert [h.message_id for h in store.search(ALICE, "bananas")] == [answer.id]
    assert [h.role for h in store.search(ALICE, "strawberries")] == [Role.USER]


def test_an_answer_cut_by_a_crash_is_marked_interrupted(database: str) -> None:
    store = ChatStore(database)
    chat = store.create_conversation(ALICE)
    question = store.add_message(ALICE, chat.id, None, Role.USER, "tell me a story")
    answer = store.add_message(
        ALICE, chat.id, question.id, Role.ASSISTANT, "", MessageStatus.STREAMING, model="m"
    )
    store.update_message(answer.id, "Once upon a", MessageStatus.STREAMING)
    # The server dies here: its connections end, and the answer is never finished.
    store.close()
    reopened = ChatStore(database)
    assert reopened.num_interrupted == 1
    found = reopened.message(ALICE, chat.id, answer.id)
    assert (found.content, found.status) == ("Once upon a", MessageStatus.INTERRUPTED)
    third = ChatStore(database)
    assert third.num_interrupted == 0
    third.close()
    reopened.close()


def test_a_server_starting_beside_a_running_one(database: str) -> None:
    """On PostgreSQL (a store that several servers share) a server that starts leaves alone
    the answers a running server is writing, and marks those of a server that is gone. On
    SQLite (one server per file) every answer left streaming counts as interrupted."""
    running = ChatStore(database)
    chat = running.create_conversation(ALICE)
    question = running.add_message(ALICE, chat.id, None, Role.USER, "tell me a story")
    answer = running.add_message(
        ALICE, chat.id, question.id, Role.ASSISTANT, "", MessageStatus.STREAMING
    )
    beside = ChatStore(database)
    status = beside.message(ALICE, chat.id, answer.id).status
    if running.backend == "postgresql":
        assert (beside.num_interrupted, status) == (0, MessageStatus.STREAMING)
        running.close()  # now it is gone
        after = ChatStore(database)
        assert after.num_interrupted == 1
        assert after.message(ALICE, chat.id, answer.id).status is MessageStatus.INTERRUPTED
        after.close()
    else:
        assert (beside.num_interrupted, status) == (1, MessageStatus.INTERRUPTED)
        running.close()
    beside.close()


def test_a_write_that_fails_midway_leaves_no_trace(store: ChatStore) -> None:
    """A fault injected into the database connection on the third message row of an import
    (after the conversation row and two messages went in): the transaction is rolled back
    whole, and the store works on."""
    source = store.create_conversation(ALICE, "source")
    leaf = None
    for i in range(3):
        leaf = _exchange(store, source.id, leaf, f"question {i}")
    conversation, messages = store.conversation(ALICE, source.id), store.messages(ALICE, source.id)
    before = (
        _rows(store, "SELECT COUNT(*) FROM conversations"),
        _rows(store, "SELECT COUNT(*) FROM messages"),
    )
    inserts = []

    def fail_on_the_third_message(conn, cursor, statement, parameters, context, many) -> None:
        if statement.startswith("INSERT INTO messages"):
            inserts.append(statement)
            if len(inserts) == 3:
                raise RuntimeError("the server died here")

    sa.event.listen(store.engine, "before_cursor_execute", fail_on_the_third_message)
    try:
        with pytest.raises(RuntimeError, match="died"):
            store.import_conversations(BOB, [(conversation, messages)])
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", fail_on_the_third_message)
    assert len(inserts) == 3
    after = (
        _rows(store, "SELECT COUNT(*) FROM conversations"),
        _rows(store, "SELECT COUNT(*) FROM messages"),
    )
    assert after == before
    assert store.conversations(BOB) == []
    [copy] = store.import_conversations(BOB, [(conversation, messages)])
    assert len(store.messages(BOB, copy.id)) == 6


def test_import_copies_a_tree_with_new_ids(store: ChatStore) -> None:
    source = store.create_conversation(
        ALICE, "Original", "Be kind.", GenerationSettings(temperature=0.3)
    )
    first = store.add_message(ALICE, source.id, None, Role.USER, "Hello")
    a1 = store.add_message(ALICE, source.id, first.id, Role.ASSISTANT, "Hi", model="m1")
    store.add_message(ALICE, source.id, first.id, Role.ASSISTANT, "Hey", model="m2")
    cut = store.add_message(ALICE, source.id, a1.id, Role.USER, "More?")
    store.add_message(ALICE, source.id, cut.id, Role.ASSISTANT, "Once", MessageStatus.STREAMING)
    store.update_conversation(ALICE, source.id, current_leaf_id=a1.id)
    original = store.conversation(ALICE, source.id)
    messages = store.messages(ALICE, source.id)

    [copy] = store.import_conversations(BOB, [(original, messages)])
    assert copy.id != source.id and copy.owner == BOB
    assert (copy.title, copy.system_prompt, copy.settings) == (
        "Original",
        "Be kind.",
        original.settings,
    )
    assert (copy.created_at, copy.updated_at) == (original.created_at, original.updated_at)
    copied = store.messages(BOB, copy.id)
    assert not {m.id for m in copied} & {m.id for m in messages}
    index = {m.id: i for i, m in enumerate(copied)}
    old_index = {m.id: i for i, m in enumerate(messages)}
    assert [None if m.parent_id is None else index[m.parent_id] for m in copied] == [
        None if m.parent_id is None else old_index[m.parent_id] for m in messages
    ]
    assert [(m.role, m.content, m.model, m.created_at) for m in copied] == [
        (m.role, m.content, m.model, m.created_at) for m in messages
    ]
    assert copied[-1].status is MessageStatus.INTERRUPTED  # nothing generates it here
    assert [m.content for m in store.branch(BOB, copy.id, copy.current_leaf_id)] == [
        "Hello",
        "Hi",
    ]
    assert store.conversations(ALICE) == [original]  # the source is untouched
    with pytest.raises(InvalidRequestError, match="appears twice"):
        store.import_conversations(BOB, [(original, messages), (original, [messages[0]] * 2)])
    with pytest.raises(InvalidRequestError, match="must answer a user message"):
        wrong = [messages[0], messages[1], replace(messages[2], parent_id=a1.id)]
        store.import_conversations(BOB, [(original, wrong)])
    assert len(store.conversations(BOB)) == 1


def test_concurrent_writers_all_land(database: str) -> None:
    """Two servers on one database, each writing from two threads at once: every write lands
    (SQLite: one writer at a time, the others wait; PostgreSQL: row locks)."""
    stores = [ChatStore(database), ChatStore(database)]
    chat = stores[0].create_conversation(ALICE)
    root = stores[0].add_message(ALICE, chat.id, None, Role.USER, "start")
    errors: list[BaseException] = []

    def answer_many(store: ChatStore, tag: str) -> None:
        try:
            for i in range(15):
                store.add_message(ALICE, chat.id, root.id, Role.ASSISTANT, f"{tag} {i}")
        except BaseException as e:  # reported below, with the test's failure
            errors.append(e)

    threads = [
        threading.Thread(target=answer_many, args=(store, f"{n}-{k}"))
        for n, store in enumerate(stores)
        for k in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    messages = stores[1].messages(ALICE, chat.id)
    assert len(messages) == 1 + 4 * 15
    assert len({m.id for m in messages}) == len(messages)
    for store in stores:
        store.close()


# --- migrations -------------------------------------------------------------------------------


def test_migrations_from_the_first_revision(database: str) -> None:
    engine = sa.create_engine(database_url(database))
    assert migrate(engine, "0001") is None
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO conversations (id, owner, title, created_at, updated_at) "
                "VALUES ('c1', :owner, 'old chat', 1, 1)"
            ),
            {"owner": ALICE},
        )
        connection.execute(
            sa.text(
                "INSERT INTO messages (id, conversation_id, parent_id, role, content, status, "
                "created_at) VALUES ('m1', 'c1', NULL, 'user', 'written before search existed', "
                "'streaming', 1)"
            )
        )
    engine.dispose()

    store = ChatStore(database)  # migrates to the newest revision on open
    with store.engine.connect() as connection:
        assert current_revision(connection) == HEAD
    assert [h.message_id for h in store.search(ALICE, "search existed")] == ["m1"]
    assert store.messages(ALICE, "c1")[0].content == "written before search existed"
    assert store.num_interrupted == 1
    assert store.messages(ALICE, "c1")[0].truncated is False  # the column's default
    store.close()
    assert migrate(store.engine) == HEAD  # nothing left to do


def test_servers_starting_together_migrate_once(database: str) -> None:
    """Three servers open a new database at the same moment: one runs the migrations, the
    others wait for it and find nothing left to do; none fails."""
    opened: list[ChatStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def open_store() -> None:
        barrier.wait()
        try:
            opened.append(ChatStore(database))
        except BaseException as e:  # reported below, with the test's failure
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(opened) == 3
    chat = opened[0].create_conversation(ALICE, "seen by all")
    assert all(store.conversation(ALICE, chat.id).title == "seen by all" for store in opened)
    assert _rows(opened[1], "SELECT COUNT(*) FROM alembic_version") == [(1,)]
    for store in opened:
        store.close()


# The first, hand-written SQLite store's schema (src/kiln/store/migrations.py before Alembic),
# as its files are out there: its version in PRAGMA user_version.
FIRST_STORE_SCHEMA = (
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL,
        system_prompt TEXT NOT NULL DEFAULT '', settings TEXT NOT NULL DEFAULT '{}',
        current_leaf_id TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL
    );
    CREATE INDEX conversations_by_owner ON conversations (owner, updated_at DESC);
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        parent_id TEXT,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('complete', 'streaming', 'stopped', 'error', 'interrupted')),
        model TEXT, error TEXT, truncated INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        UNIQUE (conversation_id, id),
        FOREIGN KEY (conversation_id, parent_id)
            REFERENCES messages (conversation_id, id) ON DELETE CASCADE
    );
    CREATE INDEX messages_by_parent ON messages (conversation_id, parent_id);
    CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';
    PRAGMA user_version = 1;
    """,
    """
    CREATE VIRTUAL TABLE messages_fts USING fts5 (
        content, content = 'messages', content_rowid = 'seq', tokenize = 'unicode61'
    );
    INSERT INTO messages_fts (rowid, content) SELECT seq, content FROM messages;
    CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
    END;
    CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.seq, old.content);
    END;
    CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.seq, old.content);
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
    END;
    PRAGMA user_version = 2;
    """,
)


@pytest.mark.parametrize("version", [1, 2])
def test_a_file_of_the_first_store_keeps_its_conversations(tmp_path: Path, version: int) -> None:
    path = tmp_path / "chat.sqlite3"
    old = sqlite3.connect(path)
    for script in FIRST_STORE_SCHEMA[:version]:
        old.executescript(script)
    old.executescript(
        f"""
        INSERT INTO conversations (id, owner, title, created_at, updated_at, current_leaf_id)
            VALUES ('c1', '{ALICE}', 'old chat', 1, 2, 'm2');
        INSERT INTO messages (id, conversation_id, parent_id, role, content, status, created_at)
            VALUES ('m1', 'c1', NULL, 'user', 'a question from last year', 'complete', 1);
        INSERT INTO messages (id, conversation_id, parent_id, role, content, status, model,
                              truncated, created_at)
            VALUES ('m2', 'c1', 'm1', 'assistant', 'an old answer', 'complete', 'm', 1, 2);
        """
    )
    old.close()

    store = ChatStore(path)
    with store.engine.connect() as connection:
        assert current_revision(connection) == HEAD
    assert [c.title for c in store.conversations(ALICE)] == ["old chat"]
    branch = store.branch(ALICE, "c1", "m2")
    assert [(m.content, m.model, m.truncated) for m in branch] == [
        ("a question from last year", None, False),
        ("an old answer", "m", True),
    ]
    assert [h.message_id for h in store.search(ALICE, "last year")] == ["m1"]
    answer = store.add_message(ALICE, "c1", "m2", Role.USER, "and a new question")
    assert {h.message_id for h in store.search(ALICE, "question")} == {"m1", answer.id}
    store.close()
    reopened = ChatStore(path)  # stamped once: opens as any other file now
    assert len(reopened.messages(ALICE, "c1")) == 3
    reopened.close()


def test_a_newer_schema_is_refused(database: str) -> None:
    ChatStore(database).close()
    engine = sa.create_engine(database_url(database))
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = 'f00d'"))
    engine.dispose()
    with pytest.raises(ConfigError, match="newer than this kiln knows"):
        ChatStore(database)


def test_an_unknown_first_store_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(FIRST_STORE_SCHEMA[0] + "PRAGMA user_version = 7;")
    old.close()
    with pytest.raises(ConfigError, match="schema version 7"):
        ChatStore(path)


def test_a_failed_migration_leaves_the_previous_revision(database: str) -> None:
    engine = sa.create_engine(database_url(database))
    migrate(engine, "0001")
    # Something in the way of revision 0002 (it makes a table or index of this name): it
    # must fail whole, not halfway.
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE messages_fts (x integer)"))
    with pytest.raises((ConfigError, DatabaseError)):
        ChatStore(database)
    with engine.connect() as connection:
        assert current_revision(connection) == "0001"
        inspector = sa.inspect(connection)
        assert [c["name"] for c in inspector.get_columns("messages_fts")] == ["x"]
        if connection.dialect.name == "sqlite":
            triggers = connection.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'trigger'"
            ).all()
            assert triggers == []
    engine.dispose()


# --- where the store lives --------------------------------------------------------------------


def test_database_urls(tmp_path: Path) -> None:
    assert database_url(tmp_path / "a.db").database == str(tmp_path / "a.db")
    assert database_url(":memory:").render_as_string() == "sqlite://"
    url = database_url("postgres://kiln:s3cret@db.example:5433/chats")
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+psycopg",
        "db.example",
        5433,
        "chats",
    )
    assert "s3cret" not in describe(url)
    with pytest.raises(ConfigError, match="SQLite or PostgreSQL"):
        database_url("mysql://db.example/chats")
    with pytest.raises(ConfigError, match="cannot open the chat database"):
        ChatStore("postgresql://kiln:s3cret@127.0.0.1:1/none")


def test_in_memory_store_works_across_threads() -> None:
    store = ChatStore(":memory:")
    chat = store.create_conversation(ALICE)
    done: list[str] = []
    thread = threading.Thread(
        target=lambda: done.append(store.add_message(ALICE, chat.id, None, Role.USER, "hi").id)
    )
    thread.start()
    thread.join(10)
    assert [m.id for m in store.messages(ALICE, chat.id)] == done
    store.close()


def test_a_sqlite_file_runs_in_wal_mode(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "deep" / "folder" / "chat.sqlite3")  # folders made too
    assert _rows(store, "PRAGMA journal_mode") == [("wal",)]
    assert _rows(store, "PRAGMA foreign_keys") == [(1,)]
    store.create_conversation(ALICE)
    store.close()
    assert (tmp_path / "deep" / "folder" / "chat.sqlite3").is_file()
