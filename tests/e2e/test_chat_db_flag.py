"""``kiln serve --db``: the web chat's store on a SQLite file or on a PostgreSQL server, named
on the command line of a real ``kiln serve`` process; what the server stored is found in that
database afterwards, by a store opened on it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kiln.server.chat.owner import COOKIE
from kiln.store import ChatStore
from postgres_server import PostgresServer
from server_harness import kiln_serve


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kiln_serve_db_flag(
    backend: str, request: pytest.FixtureRequest, stories_dir: Path, tmp_path: Path
) -> None:
    if backend == "sqlite":
        db = str(tmp_path / "chats" / "chat.sqlite3")  # its folder is made too
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        db = server.new_database()
    with kiln_serve(stories_dir, tmp_path, "--db", db) as served, httpx.Client(timeout=30) as api:
        created = api.post(served.url + "/api/chat/conversations", json={"title": "Stored here"})
        assert created.status_code == 201, created.text
        owner = api.cookies[COOKIE]
        log = served.output()
    store = ChatStore(db)
    assert [c.title for c in store.conversations(owner)] == ["Stored here"]
    store.close()
    assert "Traceback" not in log
    if backend == "sqlite":
        assert (tmp_path / "chats" / "chat.sqlite3").is_file()
