"""How a route reaches the serving layer, and how it learns that its client left."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from kiln.serving.service import Serving


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]
"""Declare ``serving: ServingDep`` in a route to receive the server's :class:`Serving`."""


def disconnect_watch(request: Request) -> Callable[[], Awaitable[None]]:
    """A function that returns when ``request``'s client disconnects.

    NOTE: call it only once the body has been read: the next ASGI message is then the
    disconnect (or the end of the response, which nobody waits for).
    """

    async def until_disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return until_disconnected
