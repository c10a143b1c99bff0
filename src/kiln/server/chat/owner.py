"""Who the web chat acts for, and the cross-site guard on what changes state.

Each browser gets an owner id in an HTTP-only cookie the first time it reaches the page or the
chat API; the store shows an owner only their own conversations. The cookie is
``SameSite=Lax`` rather than ``Strict``: a Strict cookie is not sent when the page is opened
from a link on another site, and the browser would then be given a new id (and lose sight of
its conversations). Cross-site writes are refused by :func:`same_origin` instead.
"""

from __future__ import annotations

import re
import secrets
from http.cookies import SimpleCookie
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "kiln_chat_owner"
_VALID = re.compile(r"[0-9a-f]{32}")
_MAX_AGE = 5 * 365 * 24 * 3600


class OwnerCookie:
    """Put the request's owner id in ``scope["state"]["chat_owner"]`` for the chat's paths,
    issuing a new one (``Set-Cookie``) when the request has none or a malformed one."""

    def __init__(self, app: ASGIApp, prefix: str, page: str) -> None:
        self.app = app
        self.prefix = prefix
        self.page = page

    def _covers(self, scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        path = scope.get("path", "")
        # The page itself only when it is fetched (POST / is TGI's generate route).
        if path == self.page:
            return scope.get("method") in ("GET", "HEAD")
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._covers(scope):
            await self.app(scope, receive, send)
            return
        owner = _cookie_owner(scope)
        issue = owner is None
        if owner is None:
            owner = secrets.token_hex(16)
        scope.setdefault("state", {})["chat_owner"] = owner

        async def send_with_cookie(message: Message) -> None:
            if issue and message["type"] == "http.response.start":
                cookie = (
                    f"{COOKIE}={owner}; Path=/; Max-Age={_MAX_AGE}; HttpOnly; SameSite=Lax"
                ).encode()
                message = {**message, "headers": [*message["headers"], (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _cookie_owner(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            jar = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # a malformed Cookie header: treat as no cookie
                continue
            morsel = jar.get(COOKIE)
            if morsel is not None and _VALID.fullmatch(morsel.value):
                return morsel.value
    return None


def owner_of(request: Request) -> str:
    owner = getattr(request.state, "chat_owner", None)
    if owner is None:  # the middleware covers every chat path: a wiring bug if reached
        raise RuntimeError("no chat owner: OwnerCookie is not installed for this path")
    return owner


OwnerDep = Annotated[str, Depends(owner_of)]


def same_origin(request: Request) -> None:
    """Refuse (403) a state-changing request sent by a page of another site.

    NOTE: browsers send ``Origin`` with every cross-origin POST/PATCH/DELETE (and
    ``Sec-Fetch-Site``): a request from another site carries one that does not name this
    server. Clients that are not browsers send neither, and are not forging anyone's cookie.
    """
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise HTTPException(403, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        if origin == "null" or urlsplit(origin).netloc != host:
            raise HTTPException(403, "cross-site request refused")
