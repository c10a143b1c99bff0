"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Request bodies are validated by the schemas (errors.py answers a bad field with a 400 in
OpenAI's shape); :class:`~kiln.server.openai.handlers.OpenAIError` carries the errors whose
``code`` and ``param`` only the handlers know (``model_not_found``, ``context_length_exceeded``,
an unsupported parameter).
"""

from __future__ import annotations

from collections.abc import Awaitable

from fastapi import APIRouter, Request, Response

from kiln.server.errors import ClientDisconnectedError
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
from kiln.server.state import State

router = APIRouter(prefix="/v1", tags=["openai"])

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


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


async def _answer(request: Request, handling: Awaitable[Response]) -> Response:
    try:
        return await handling
    except handlers.OpenAIError as e:
        return e.response(request)
    except ClientDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it


@router.get("/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    return handlers.list_models(state)


@router.get("/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
async def retrieve_model(model: str, state: State, request: Request) -> Response | ModelCard:
    try:
        return handlers.retrieve_model(state, model)
    except handlers.OpenAIError as e:
        return e.response(request)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=_with_stream(ChatCompletionChunk),
)
async def chat_completions(body: ChatCompletionRequest, state: State, request: Request) -> Response:
    """Chat; ``stream: true`` answers ``chat.completion.chunk`` server-sent events."""
    return await _answer(request, handlers.chat_completion(state, body, request))


@router.post(
    "/completions", response_model=CompletionResponse, responses=_with_stream(CompletionChunk)
)
async def completions(body: CompletionRequest, state: State, request: Request) -> Response:
    """Text completion; ``stream: true`` answers ``text_completion`` server-sent events."""
    return await _answer(request, handlers.completion(state, body, request))
