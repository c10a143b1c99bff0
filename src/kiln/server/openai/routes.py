"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Request bodies are validated by the schemas (errors.py answers a bad field with a 400 in
OpenAI's shape); :class:`~kiln.server.openai.handlers.OpenAIError` carries the errors whose
``code`` and ``param`` only the handlers know (``model_not_found``, ``context_length_exceeded``,
an unsupported parameter).
"""

from __future__ import annotations

from collections.abc import Awaitable

from fastapi import APIRouter, Request, Response

from kiln.server.openai import handlers
from kiln.server.openai.generation import ClientGone
from kiln.server.openai.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from kiln.server.state import State

router = APIRouter(prefix="/v1", tags=["openai"])

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


async def _answer(request: Request, handling: Awaitable[Response]) -> Response:
    try:
        return await handling
    except handlers.OpenAIError as e:
        return e.response(request)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it


@router.get("/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    return handlers.list_models(state)


@router.get("/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, state: State, request: Request) -> Response | ModelCard:
    try:
        return handlers.retrieve_model(state, model)
    except handlers.OpenAIError as e:
        return e.response(request)


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, state: State, request: Request) -> Response:
    """Chat; ``stream: true`` answers ``chat.completion.chunk`` server-sent events."""
    return await _answer(request, handlers.chat_completion(state, body, request))


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, state: State, request: Request) -> Response:
    """Text completion; ``stream: true`` answers ``text_completion`` server-sent events."""
    return await _answer(request, handlers.completion(state, body, request))
