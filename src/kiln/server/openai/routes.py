"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Request bodies are validated by the schemas (errors.py answers a bad field with a 400 in
OpenAI's shape); :class:`~kiln.server.openai.handlers.OpenAIError` carries the errors whose
``code`` and ``param`` only the handlers know (``model_not_found``, ``context_length_exceeded``,
an unsupported parameter).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from kiln.server.errors import OpenAIRoute
from kiln.server.openai import handlers
from kiln.server.openai.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
)
from kiln.server.sse import event_stream_response
from kiln.server.state import ServingDep

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

# NOTE: "4XX" rather than 400: every client error here has this shape, and it keeps FastAPI
# from documenting its own 422, which these routes never answer (errors.py makes it a 400).
_ERRORS = {
    "4XX": {
        "model": OpenAIErrorResponse,
        "description": "Invalid request (400), unknown model (404), body too large (413), "
        "overloaded (429, with Retry-After)",
    },
    503: {"model": OpenAIErrorResponse, "description": "The engine is not running"},
}
_STREAM_DESCRIPTION = "With `stream: true`: one event per chunk, then `data: [DONE]`"


def _with_stream(chunk: type[ChatCompletionChunk | CompletionChunk]) -> dict:
    sse = event_stream_response(
        chunk, OpenAIErrorResponse, description=_STREAM_DESCRIPTION, done="[DONE]"
    )
    return {**_ERRORS, 200: sse}


@router.get("/models", response_model=ModelList)
async def list_models(serving: ServingDep) -> ModelList:
    return handlers.list_models(serving)


@router.get("/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
async def retrieve_model(model: str, serving: ServingDep) -> ModelCard:
    return handlers.retrieve_model(serving, model)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=_with_stream(ChatCompletionChunk),
)
async def chat_completions(
    body: ChatCompletionRequest, serving: ServingDep, request: Request
) -> Response:
    """Chat; ``stream: true`` answers ``chat.completion.chunk`` server-sent events."""
    return await handlers.chat_completion(serving, body, request)


@router.post(
    "/completions", response_model=CompletionResponse, responses=_with_stream(CompletionChunk)
)
async def completions(body: CompletionRequest, serving: ServingDep, request: Request) -> Response:
    """Text completion; ``stream: true`` answers ``text_completion`` server-sent events."""
    return await handlers.completion(serving, body, request)
