"""TGI request handling: generation, streaming, disconnects, metrics and TGI's response shapes
(the checks on a request are in ``validation``).

Where kiln and TGI differ on purpose:

- Errors found before the first token (validation, overload, a dead engine) are HTTP errors on
  ``/generate_stream`` too (422 / 429 / 503), where TGI answers 200 and sends the error as the
  only event. Clients see the same error either way; load balancers and retries see a status.
- ``decoder_input_details`` returns the prompt tokens with ``logprob: null``: kiln does not
  compute prompt log-probabilities (TGI gives null for the first one only).
- Token ``logprob`` is the log-probability under the model's raw logits (TGI: after its
  temperature/top-k/top-p warpers).
- ``frequency_penalty`` counts generated tokens only (OpenAI's definition; TGI also counts the
  prompt's).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from kiln import __version__
from kiln.engine.outputs import RequestOutput
from kiln.engine.request import FinishReason
from kiln.errors import KilnError
from kiln.server.errors import ClientDisconnectedError, GenerationError, failure_type
from kiln.server.sse import SSE_HEADERS, sse_event
from kiln.server.state import ServerState
from kiln.server.tgi.schemas import (
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Info,
    PrefillToken,
    SimpleToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from kiln.server.tgi.validation import (
    MAX_BEST_OF,
    MAX_STOP_SEQUENCES,
    MAX_TOP_N_TOKENS,
    Prepared,
    encode,
    invalid,
    prepare,
)
from kiln.text.detokenizer import IncrementalDetokenizer
from kiln.text.tokenizer import Tokenizer

T = TypeVar("T")

_TGI_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "eos_token",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
}


def _engine_failure(exc: Exception) -> Exception:
    """What the client is told of an exception from the engine: kiln's own errors as they are
    (validation, overload, engine down), anything else as a failed generation."""
    if isinstance(exc, (KilnError, ClientDisconnectedError)):
        return exc
    return GenerationError(f"Request failed during generation: {exc}")


def _error_type(exc: BaseException) -> str:
    return failure_type(exc, client_gone="cancelled")


# --- bookkeeping ----------------------------------------------------------------------------


@dataclass
class _Run:
    """One request's timing, admission seat and metrics (each recorded exactly once)."""

    state: ServerState
    started: float = field(default_factory=time.monotonic)
    first_output_at: float | None = None
    _seat: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _recorded: bool = False

    def __post_init__(self) -> None:
        self.state.metrics.record_start()

    async def admit(self) -> ServerState:
        """Take a seat of ``max_concurrent_requests`` (OverloadedError, 429) and pin the active
        model (503 when a model switch takes too long): answers the state to serve with."""
        self.state = self._seat.enter_context(await self.state.admit())
        return self.state

    def saw_output(self) -> None:
        if self.first_output_at is None:
            self.first_output_at = time.monotonic()

    @property
    def queue_seconds(self) -> float:
        # NOTE: time to the first token: the engine reports no per-request queue time, and the
        # first token is when a request stops waiting from its client's point of view.
        end = self.first_output_at if self.first_output_at is not None else time.monotonic()
        return end - self.started

    def succeed(self, num_input: int, num_generated: int) -> None:
        if not self._recorded:
            self._recorded = True
            duration = time.monotonic() - self.started
            self.state.metrics.record_success(
                duration, self.queue_seconds, num_input, num_generated
            )
        self._seat.close()

    def fail(self, error_type: str) -> None:
        if not self._recorded:
            self._recorded = True
            self.state.metrics.record_failure(error_type)
        self._seat.close()

    def close(self) -> None:
        """Release the seat; a request that neither succeeded nor failed was cancelled."""
        self.fail("cancelled")


def _request_id() -> str:
    return f"tgi-{uuid.uuid4().hex}"


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read already, so the next message is the disconnect (or the end of the
    # response, which the caller never waits for).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; cancel it and raise ClientDisconnectedError if the client leaves.

    NOTE: Starlette cancels a streaming body when its client disconnects, but never a plain
    endpoint: without this a client that gives up on a long ``/generate`` would keep its
    request generating (and holding KV blocks) to the end.
    """
    task: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # lets the engine's generator abort the request
        raise ClientDisconnectedError
    finally:
        watcher.cancel()
        task.cancel()
        # NOTE: awaited, so the watcher's receive() is over before the response listens for
        # the disconnect itself: two tasks in receive() at once would race for the message.
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# --- tokens ---------------------------------------------------------------------------------


def _logprob(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class _TokenMaker:
    """Engine outputs -> TGI tokens. A token's text is the text it completes, special tokens
    included (TGI streams ``</s>`` with ``special: true``); ``generated_text`` leaves them out."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=False)
        self._special = frozenset(tokenizer.all_special_ids)
        self.token_ids: list[int] = []

    def _alone(self, token_id: int, logprob: float | None) -> Token:
        text = self._tokenizer.decode_raw([token_id], skip_special_tokens=False)
        return Token(id=token_id, text=text, logprob=_logprob(logprob), special=self._is(token_id))

    def _is(self, token_id: int) -> bool:
        return token_id in self._special

    def add(self, out: RequestOutput) -> list[tuple[Token, list[Token]]]:
        """``(token, its top alternatives)`` for each new token of ``out``."""
        tokens = []
        last = len(out.token_ids) - 1
        for i, token_id in enumerate(out.token_ids):
            self.token_ids.append(token_id)
            text = self._detokenizer.add([token_id])
            if out.finished and i == last:
                text += self._detokenizer.flush()
            logprob = out.logprobs[i] if i < len(out.logprobs) else None
            top = out.top_logprobs[i] if i < len(out.top_logprobs) else []
            tokens.append(
                (
                    Token(
                        id=token_id,
                        text=text,
                        logprob=_logprob(logprob),
                        special=self._is(token_id),
                    ),
                    [self._alone(t, lp) for t, lp in top],
                )
            )
        return tokens

    def generated_text(self) -> str:
        """The output as ``tokenizer.decode`` gives it after the prompt: a stop sequence that
        ended generation stays in, as in TGI."""
        detokenizer = IncrementalDetokenizer(self._tokenizer, self._prompt_ids)
        return detokenizer.add(self.token_ids) + detokenizer.flush()

    def prefill(self) -> list[PrefillToken]:
        return [
            PrefillToken(
                id=t, text=self._tokenizer.decode_raw([t], skip_special_tokens=False), logprob=None
            )
            for t in self._prompt_ids
        ]


def _finish_reason(out: RequestOutput) -> str:
    reason = _TGI_FINISH_REASONS.get(out.finish_reason)  # type: ignore[arg-type]
    if reason is None:  # aborted by the engine (FinishReason.ABORT)
        raise GenerationError(f"Request failed during generation: it ended ({out.finish_reason})")
    return reason


# --- /generate ------------------------------------------------------------------------------


@dataclass
class _Generation:
    tokens: list[Token]
    top_tokens: list[list[Token]]
    maker: _TokenMaker
    finish_reason: str


async def _run_to_end(state: ServerState, prep: Prepared, run: _Run) -> _Generation:
    maker = _TokenMaker(state.llm.tokenizer, prep.prompt_ids)
    tokens: list[Token] = []
    top_tokens: list[list[Token]] = []
    try:
        async for out in state.engine.generate(prep.prompt_ids, prep.params, _request_id()):
            run.saw_output()
            for token, top in maker.add(out):
                tokens.append(token)
                top_tokens.append(top)
            if out.finished:
                return _Generation(tokens, top_tokens, maker, _finish_reason(out))
    except Exception as e:
        raise _engine_failure(e) from e
    raise GenerationError("Incomplete generation")


async def _generate(
    state: ServerState, prep_request: GenerateRequest, request: Request
) -> tuple[Prepared, _Generation, _Run]:
    run = _Run(state)
    try:
        state = await run.admit()
        prep = await prepare(state, prep_request, stream=False)
        result = await _unless_disconnected(request, _run_to_end(state, prep, run))
    except BaseException as e:
        run.fail(_error_type(e))
        raise
    run.succeed(len(prep.prompt_ids), len(result.tokens))
    return prep, result, run


def _generate_response(prep: Prepared, result: _Generation) -> GenerateResponse:
    text = result.maker.generated_text()
    details = None
    if prep.details:
        details = Details(
            finish_reason=result.finish_reason,
            generated_tokens=len(result.tokens),
            seed=prep.seed,
            prefill=result.maker.prefill() if prep.decoder_input_details else [],
            tokens=result.tokens,
            top_tokens=result.top_tokens if prep.top_n_tokens else [],
        )
    return GenerateResponse(
        generated_text=prep.inputs + text if prep.return_full_text else text, details=details
    )


def _timing_headers(state: ServerState, prep: Prepared, result: _Generation, run: _Run) -> dict:
    total = time.monotonic() - run.started
    queue = run.queue_seconds
    inference = total - queue
    num = len(result.tokens)
    return {
        "x-compute-type": state.llm.device.type,
        "x-total-time": str(round(total * 1000)),
        "x-queue-time": str(round(queue * 1000)),
        "x-inference-time": str(round(inference * 1000)),
        "x-time-per-token": str(round(inference * 1000 / num) if num else 0),
        "x-prompt-tokens": str(len(prep.prompt_ids)),
        "x-generated-tokens": str(num),
    }


async def generate(
    state: ServerState, body: GenerateRequest, request: Request, *, as_list: bool = False
) -> Response:
    """``POST /generate`` (an object) and ``POST /`` without streaming (a one-element list)."""
    try:
        prep, result, run = await _generate(state, body, request)
    except ClientDisconnectedError:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed"
    response = _generate_response(prep, result).model_dump()
    return JSONResponse(
        [response] if as_list else response, headers=_timing_headers(run.state, prep, result, run)
    )


# --- /generate_stream -----------------------------------------------------------------------


class _EventStream(StreamingResponse):
    """An SSE response that runs ``on_close`` however it ends: finished, failed, cancelled by
    a disconnect, or never iterated at all (so the seat and the engine request are freed)."""

    def __init__(
        self, body: AsyncIterator[str], on_close: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._on_close()


async def _events(
    state: ServerState,
    prep: Prepared,
    run: _Run,
    first: RequestOutput,
    outputs: AsyncIterator[RequestOutput],
) -> AsyncIterator[str]:
    maker = _TokenMaker(state.llm.tokenizer, prep.prompt_ids)
    index = 0
    out = first
    try:
        while True:
            pieces = maker.add(out)
            for i, (token, top) in enumerate(pieces):
                index += 1
                event = StreamResponse(index=index, token=token, top_tokens=top)
                if out.finished and i == len(pieces) - 1:
                    text = maker.generated_text()
                    event.generated_text = prep.inputs + text if prep.return_full_text else text
                    if prep.details:
                        event.details = StreamDetails(
                            finish_reason=_finish_reason(out),
                            generated_tokens=index,
                            seed=prep.seed,
                            input_length=len(prep.prompt_ids),
                        )
                    run.succeed(len(prep.prompt_ids), index)
                yield sse_event(event.model_dump())
            if out.finished:
                if not pieces:  # finished without a token to carry the end
                    _finish_reason(out)  # raises when it was aborted
                    raise StopAsyncIteration  # caught below, as an engine that stops short
                return
            out = await outputs.__anext__()
    except StopAsyncIteration:
        run.fail("incomplete_generation")
        yield sse_event({"error": "Incomplete generation", "error_type": "incomplete_generation"})
    except Exception as e:
        # NOTE: the status line went out with the first token, so the error is an event.
        error = _engine_failure(e)
        run.fail(_error_type(error))
        yield sse_event({"error": str(error), "error_type": _error_type(error)})
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
        run.close()


async def generate_stream(state: ServerState, body: GenerateRequest, request: Request) -> Response:
    """``POST /generate_stream`` and ``POST /`` with ``stream: true``: server-sent events."""
    run = _Run(state)
    try:
        state = await run.admit()
        prep = await prepare(state, body, stream=True)
        outputs = state.engine.generate(prep.prompt_ids, prep.params, _request_id())
        try:
            first = await _unless_disconnected(request, outputs.__anext__())
        except Exception as e:
            await outputs.aclose()
            raise _engine_failure(e) from e
        except BaseException:
            await outputs.aclose()
            raise
        run.saw_output()
    except ClientDisconnectedError:
        run.close()
        return Response(status_code=499)
    except BaseException as e:
        run.fail(_error_type(e))
        raise

    async def close() -> None:
        await outputs.aclose()
        run.close()

    return _EventStream(_events(state, prep, run, first, outputs), close)


# --- /info, /tokenize, /infer ---------------------------------------------------------------


def info(state: ServerState) -> Info:
    return Info(
        model_id=state.model_id,
        model_sha=None,
        model_dtype=str(state.llm.dtype),
        model_device_type=state.llm.device.type,
        model_pipeline_tag="text-generation",
        max_concurrent_requests=state.config.max_concurrent_requests,
        max_best_of=MAX_BEST_OF,
        max_stop_sequences=MAX_STOP_SEQUENCES,
        max_input_tokens=state.max_input_tokens,
        max_input_length=state.max_input_tokens,
        max_total_tokens=state.max_total_tokens,
        max_top_n_tokens=MAX_TOP_N_TOKENS,
        validation_workers=1,
        max_client_batch_size=1,
        router="text-generation-router",
        version=__version__,
        sha=None,
        docker_label=None,
    )


def _offsets(tokenizer: Tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character offsets of ``ids`` (what ``tokenizer.encode(text)`` gave) into ``text``.

    kiln's tokenizer may add BOS/EOS itself rather than through the backend's post-processor,
    so the backend's offsets are aligned on the ids; added tokens get an empty span.
    """
    for add_special_tokens in (True, False):
        encoding = tokenizer.backend.encode(text, add_special_tokens=add_special_tokens)
        if encoding.ids == ids:
            return list(encoding.offsets)
    plain = tokenizer.backend.encode(text, add_special_tokens=False)
    n = len(plain.ids)
    for start in range(len(ids) - n + 1):
        if ids[start : start + n] == plain.ids:
            end = len(text)
            return [(0, 0)] * start + list(plain.offsets) + [(end, end)] * (len(ids) - start - n)
    return [(0, 0)] * len(ids)


async def tokenize(state: ServerState, body: GenerateRequest) -> list[SimpleToken]:
    """``POST /tokenize``: the prompt's tokens with their character spans in ``inputs``."""
    truncate = body.parameters.truncate if body.parameters is not None else None
    if truncate is not None and truncate <= 0:
        raise invalid(f"`truncate` must be strictly positive. Given: {truncate}")
    tokenizer = state.llm.tokenizer
    ids = await encode(tokenizer, body.inputs)
    offsets = _offsets(tokenizer, body.inputs, ids)
    tokens = [
        SimpleToken(id=token_id, text=body.inputs[start:stop], start=start, stop=stop)
        for token_id, (start, stop) in zip(ids, offsets, strict=True)
    ]
    return tokens[-truncate:] if truncate is not None else tokens


async def infer(state: ServerState, sentence: str, request: Request) -> Response:
    """``GET /infer?sentence=...``: the Ray Serve blueprint's endpoint (data-on-eks Llama-2 on
    Inferentia). Like its ``LlamaModel.infer``, answers a JSON list with one string: the prompt
    and its continuation decoded together, special tokens skipped. Greedy; ``max_new_tokens``
    as TGI's default."""
    body = GenerateRequest(inputs=sentence, parameters=GenerateParameters())
    try:
        prep, result, run = await _generate(state, body, request)
    except ClientDisconnectedError:
        return Response(status_code=499)
    text = run.state.llm.tokenizer.decode(prep.prompt_ids + result.maker.token_ids)
    return JSONResponse([text])
