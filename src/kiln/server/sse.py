"""Server-sent events: the framing TGI and OpenAI streams use, and how OpenAPI documents it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Message, Receive, Scope, Send

from kiln.errors import UnavailableError

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any) -> str:
    """One ``data:`` event; ``data`` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


class EventStream(StreamingResponse):
    """A ``text/event-stream`` answer that ends cleanly however it ends.

    ``on_close`` runs whether the stream finished, failed, was cut by a disconnect, or was
    never iterated at all (a client gone before the first byte), so the request's seat and
    engine requests are always given back. When the server's shutdown timeout cancels a stream
    still running, it ends with ``shutdown_events`` (the API's error event, then its end
    marker) and one log line, instead of a cut connection and an ASGI traceback.
    """

    def __init__(
        self,
        body: AsyncIterator[str],
        on_close: Callable[[], None],
        shutdown_events: Callable[[Exception], list[str]],
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close
        self._shutdown_events = shutdown_events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await super().__call__(scope, receive, send_tracked)
        except asyncio.CancelledError:
            if not started:
                raise  # the app answers 503 for a request cancelled before its answer
            logger.warning("a stream was still running at the shutdown timeout: ended it")
            error = UnavailableError("the server is shutting down")
            with contextlib.suppress(Exception):  # the client may be gone too
                for event in self._shutdown_events(error):
                    await send(
                        {"type": "http.response.body", "body": event.encode(), "more_body": True}
                    )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._on_close()


def event_stream_response(
    *models: type[BaseModel], description: str, done: str | None = None
) -> dict[str, Any]:
    """An OpenAPI response (for a route's ``responses``) that is a ``text/event-stream`` whose
    events' ``data`` is the JSON of one of ``models`` (or, the last one, ``done`` verbatim).

    NOTE: OpenAPI 3.1 tools read a stream's ``schema`` as the schema of one event, parsed as
    ``{"data": ..., "event": ...}`` (OpenAPI 3.2's SSE convention, which FastAPI follows too).
    The models are inlined: pydantic's ``#/$defs/...`` references would not resolve inside
    an OpenAPI document.
    """
    data_schemas = [_inline(m.model_json_schema(mode="serialization")) for m in models]
    data: dict[str, Any] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": data_schemas[0] if len(data_schemas) == 1 else {"anyOf": data_schemas},
    }
    if done is not None:
        data = {"anyOf": [{"const": done}, data]}
    event = {
        "type": "object",
        "properties": {
            "data": data,
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
        "required": ["data"],
    }
    return {"description": description, "content": {"text/event-stream": {"schema": event}}}


def _inline(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """``schema`` with its ``$defs`` references replaced by what they name (no cycles here)."""
    if isinstance(schema, dict):
        defs = {**(defs or {}), **schema.get("$defs", {})}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema
