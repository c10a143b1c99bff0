"""Text Generation Inference's HTTP API: the routes, each handing over to ``handlers``."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from kiln.server.errors import TGIRoute
from kiln.server.sse import event_stream_response
from kiln.server.state import ServingDep
from kiln.server.tgi import handlers
from kiln.server.tgi.schemas import (
    CompatGenerateRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Info,
    SimpleToken,
    StreamResponse,
    TokenizeRequest,
)

router = APIRouter(tags=["Text Generation Inference"], route_class=TGIRoute)

_INPUT_ERRORS = {
    400: {"model": ErrorResponse, "description": "The body is not UTF-8"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ErrorResponse, "description": "Input validation error"},
}
_ERRORS = {
    **_INPUT_ERRORS,
    424: {"model": ErrorResponse, "description": "The generation failed"},
    429: {"model": ErrorResponse, "description": "Model is overloaded"},
    503: {"model": ErrorResponse, "description": "The engine is not running"},
}
_STREAM_DESCRIPTION = (
    "One event per token; the last carries `generated_text`. An error after the first token "
    "is an event `{error, error_type}`."
)
_SSE = {200: event_stream_response(StreamResponse, ErrorResponse, description=_STREAM_DESCRIPTION)}
_COMPAT_SSE = {
    200: event_stream_response(
        StreamResponse,
        ErrorResponse,
        description=f"A one-element list; with `stream: true`: {_STREAM_DESCRIPTION}",
    )
}


@router.post("/", response_model=list[GenerateResponse], responses={**_ERRORS, **_COMPAT_SSE})
async def compat_generate(
    body: CompatGenerateRequest, request: Request, serving: ServingDep
) -> Response:
    """``/generate`` (answering a one-element list) or, with ``stream: true``,
    ``/generate_stream``."""
    if body.stream:
        return await handlers.generate_stream(serving, body, request)
    return await handlers.generate(serving, body, request, as_list=True)


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(body: GenerateRequest, request: Request, serving: ServingDep) -> Response:
    """Generate a continuation of ``inputs``."""
    return await handlers.generate(serving, body, request)


@router.post("/generate_stream", response_class=StreamingResponse, responses={**_ERRORS, **_SSE})
async def generate_stream(body: GenerateRequest, request: Request, serving: ServingDep) -> Response:
    """Generate a continuation of ``inputs``, one server-sent event per token; the last one
    carries ``generated_text`` (and ``details`` when asked)."""
    return await handlers.generate_stream(serving, body, request)


@router.get("/info", response_model=Info)
async def info(serving: ServingDep) -> Response:
    """The model and the server's limits."""
    return JSONResponse(handlers.info(serving).model_dump())


@router.post("/tokenize", response_model=list[SimpleToken], responses=_INPUT_ERRORS)
async def tokenize(body: TokenizeRequest, serving: ServingDep) -> Response:
    """The tokens of ``inputs``, each with its ``[start, stop)`` character span."""
    tokens = await handlers.tokenize(serving, body)
    return JSONResponse([t.model_dump() for t in tokens])


@router.get("/infer", response_model=list[str], responses=_ERRORS)
async def infer(request: Request, serving: ServingDep, sentence: str = Query(...)) -> Response:
    """The Ray Serve tutorial's endpoint: ``["<sentence and its greedy continuation>"]``."""
    return await handlers.infer(serving, sentence, request)
