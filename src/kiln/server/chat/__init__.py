"""The web chat: its API (``routes``), answers (``answers``), owners (``owner``) and the page
(``page``). :func:`install_chat` wires them into the app."""

from __future__ import annotations

from fastapi import FastAPI

from kiln.store import ChatStore


def install_chat(app: FastAPI, chat_db: str | None) -> ChatStore:
    """Mount the chat API and page on ``app`` with a store at ``chat_db`` (a SQLite file or a
    ``postgresql://`` URL; None: in memory, gone when the server stops). Returns the store,
    for the app to close at shutdown."""
    from kiln.server.chat import page, routes
    from kiln.server.chat.answers import RunningAnswers
    from kiln.server.chat.owner import OwnerCookie

    store = ChatStore(chat_db if chat_db is not None else ":memory:")
    app.state.chat_store = store
    app.state.chat_answers = RunningAnswers()
    app.include_router(routes.router)
    app.include_router(page.router)
    app.add_middleware(OwnerCookie, prefix=routes.PREFIX, page="/")
    return store
