"""Server-sent events: the framing TGI and OpenAI streams use, and how OpenAPI documents it."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any) -> str:
    """One ``data:`` event; ``data`` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


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
