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
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from kiln import __version__
from kiln.engine.outputs import RequestOutput
from kiln.engine.request import FinishReason
from kiln.errors import EngineFailureError
from kiln.server.sse import EventStream, sse_event
from kiln.server.state import disconnect_watch
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
    check_unicode,
    invalid,
    prepare,
)
from kiln.serving.generation import Choice, ClientDisconnectedError, Generation, failure_type
from kiln.serving.service import Serving
from kiln.text.detokenizer import IncrementalDetokenizer
from kiln.text.tokenizer import Tokenizer

_TGI_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "eos_token",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


def _generation(serving: Serving, request: Request) -> Generation:
    return serving.generation("cancelled", disconnect_watch(request))


def _error_event(error: Exception) -> str:
    return sse_event({"error": str(error), "error_type": failure_type(error, "cancelled")})


# --- tokens ---------------------------------------------------------------------------------


def _logprob(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class _TokenMaker:
    """Engine outputs -> TGI tokens. A token's text is the text it completes, special tokens
    included (TGI streams ``</s>`` with ``special: true``): the engine detokenizes it so (the
    request's params keep special tokens and stop strings), so it is read, not decoded again.
    ``generated_text`` leaves special tokens out, decoded once at the end."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
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
            logprob = out.logprobs[i] if i < len(out.logprobs) else None
            top = out.top_logprobs[i] if i < len(out.top_logprobs) else []
            token = Token(
                id=token_id,
                text=out.text if i == last else "",  # the text the tokens complete together
                logprob=_logprob(logprob),
                special=self._is(token_id),
            )
            tokens.append((token, [self._alone(t, lp) for t, lp in top]))
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
        raise EngineFailureError(
            f"Request failed during generation: it ended ({out.finish_reason})"
        )
    return reason


async def _start(
    serving: Serving, body: GenerateRequest, request: Request, *, stream: bool
) -> tuple[Generation, Prepared]:
    """Admit, validate and tokenize, and start the engine request (up to its first output)."""
    generation = _generation(serving, request)
    await generation.admit()
    with generation.failures_recorded():
        prep = await prepare(generation, body, stream=stream)
        choice = Choice(0, f"tgi-{uuid.uuid4().hex}", prep.prompt_ids, prep.params)
        await generation.start([choice])
    return generation, prep


# --- /generate ------------------------------------------------------------------------------


@dataclass
class _Result:
    tokens: list[Token]
    top_tokens: list[list[Token]]
    maker: _TokenMaker
    finish_reason: str


async def _collect(generation: Generation, prep: Prepared) -> _Result:
    assert generation.model is not None
    maker = _TokenMaker(generation.model.tokenizer, prep.prompt_ids)
    tokens: list[Token] = []
    top_tokens: list[list[Token]] = []
    async for _, out in generation.outputs():
        for token, top in maker.add(out):
            tokens.append(token)
            top_tokens.append(top)
        if out.finished:
            return _Result(tokens, top_tokens, maker, _finish_reason(out))
    raise EngineFailureError("Incomplete generation")


async def _generate(
    serving: Serving, body: GenerateRequest, request: Request
) -> tuple[Generation, Prepared, _Result]:
    generation, prep = await _start(serving, body, request, stream=False)
    result = await generation.answer(_collect(generation, prep))
    return generation, prep, result


def _generate_response(prep: Prepared, result: _Result) -> GenerateResponse:
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


def _timing_headers(generation: Generation, prep: Prepared, result: _Result) -> dict[str, str]:
    assert generation.model is not None
    total = time.monotonic() - generation.started_at
    queue = generation.queue_seconds
    inference = total - queue
    num = len(result.tokens)
    return {
        "x-compute-type": generation.model.device.type,
        "x-total-time": str(round(total * 1000)),
        "x-queue-time": str(round(queue * 1000)),
        "x-inference-time": str(round(inference * 1000)),
        "x-time-per-token": str(round(inference * 1000 / num) if num else 0),
        "x-prompt-tokens": str(len(prep.prompt_ids)),
        "x-generated-tokens": str(num),
    }


async def generate(
    serving: Serving, body: GenerateRequest, request: Request, *, as_list: bool = False
) -> Response:
    """``POST /generate`` (an object) and ``POST /`` without streaming (a one-element list)."""
    try:
        generation, prep, result = await _generate(serving, body, request)
    except ClientDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody is listening
    response = _generate_response(prep, result).model_dump()
    return JSONResponse(
        [response] if as_list else response, headers=_timing_headers(generation, prep, result)
    )


# --- /generate_stream -----------------------------------------------------------------------


async def _events(generation: Generation, prep: Prepared) -> AsyncIterator[str]:
    assert generation.model is not None
    maker = _TokenMaker(generation.model.tokenizer, prep.prompt_ids)
    index = 0
    async for _, out in generation.outputs():
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
            yield sse_event(event.model_dump())
        if out.finished:
            if not pieces:  # finished without a token to carry the end
                _finish_reason(out)  # raises when it was aborted
                break
            return
    raise EngineFailureError("Incomplete generation")


async def generate_stream(serving: Serving, body: GenerateRequest, request: Request) -> Response:
    """``POST /generate_stream`` and ``POST /`` with ``stream: true``: server-sent events."""
    try:
        generation, prep = await _start(serving, body, request, stream=True)
    except ClientDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    events = generation.stream(_events(generation, prep), _error_event)
    return EventStream(
        events,
        on_close=lambda: generation.fail(ClientDisconnectedError()),
        shutdown_events=lambda error: [_error_event(error)],
    )


# --- /info, /tokenize, /infer ---------------------------------------------------------------


def info(serving: Serving) -> Info:
    model = serving.models.current()
    window = serving.window(model)
    return Info(
        model_id=model.name,
        model_sha=None,
        model_dtype=str(model.dtype),
        model_device_type=model.device.type,
        model_pipeline_tag="text-generation",
        max_concurrent_requests=serving.config.max_concurrent_requests,
        max_best_of=MAX_BEST_OF,
        max_stop_sequences=MAX_STOP_SEQUENCES,
        max_input_tokens=window.max_input_tokens,
        max_input_length=window.max_input_tokens,
        max_total_tokens=window.max_total_tokens,
        max_top_n_tokens=MAX_TOP_N_TOKENS,
        validation_workers=1,
        max_client_batch_size=1,
        router="text-generation-router",
        version=__version__,
        sha=None,
        docker_label=None,
        sampling_defaults=model.generation_defaults,
    )


async def tokenize(serving: Serving, body: GenerateRequest) -> list[SimpleToken]:
    """``POST /tokenize``: the prompt's tokens with their character spans in ``inputs``."""
    truncate = body.parameters.truncate if body.parameters is not None else None
    if truncate is not None and truncate <= 0:
        raise invalid(f"`truncate` must be strictly positive. Given: {truncate}")
    check_unicode(body.inputs, "`inputs`")
    model = serving.models.current()
    ids, offsets = await asyncio.to_thread(model.tokenizer.encode_with_offsets, body.inputs)
    tokens = [
        SimpleToken(id=token_id, text=body.inputs[start:stop], start=start, stop=stop)
        for token_id, (start, stop) in zip(ids, offsets, strict=True)
    ]
    return tokens[-truncate:] if truncate is not None else tokens


async def infer(serving: Serving, sentence: str, request: Request) -> Response:
    """``GET /infer?sentence=...``: the Ray Serve blueprint's endpoint (data-on-eks Llama-2 on
    Inferentia). Like its ``LlamaModel.infer``, answers a JSON list with one string: the prompt
    and its continuation decoded together, special tokens skipped. Greedy; ``max_new_tokens``
    as TGI's default."""
    body = GenerateRequest(inputs=sentence, parameters=GenerateParameters())
    try:
        generation, prep, result = await _generate(serving, body, request)
    except ClientDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    assert generation.model is not None
    text = generation.model.tokenizer.decode(prep.prompt_ids + result.maker.token_ids)
    return JSONResponse([text])
