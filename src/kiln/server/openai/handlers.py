"""OpenAI-compatible handlers: request -> prompt + SamplingParams -> serving -> response or SSE.

Checks what the schemas cannot (the model name, unsupported features, the context), builds
each choice's prompt (chat rendering and tokenization off the event loop) and SamplingParams,
runs them as one :class:`~kiln.serving.generation.Generation` and shapes the outputs as
OpenAI's responses or chunks. Errors are kiln's own (``param`` and ``code`` set where OpenAI
clients read them); ``server/errors.py`` gives them OpenAI's shape.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.engine.request import FinishReason
from kiln.errors import ContextLengthError, InvalidRequestError, KilnError, NotFoundError
from kiln.sampling import SamplingParams
from kiln.server.openai.logprobs import (
    TokenRenderer,
    chat_logprobs,
    extend_completion_logprobs,
    token_renderer,
)
from kiln.server.openai.schemas import (
    MAX_CHOICES,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    FinishReasonLiteral,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from kiln.server.sse import EventStream, sse_event
from kiln.server.state import disconnect_watch
from kiln.serving.generation import Choice, ClientDisconnectedError, Generation
from kiln.serving.limits import ContextWindow
from kiln.serving.served_model import ServedModel
from kiln.serving.service import Serving

PLACEHOLDER_MODELS = frozenset({"tgi", "dummy"})
"""``model`` values accepted besides the served id: what TGI clients and huggingface_hub's
InferenceClient send when pointed at a URL rather than a model."""

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
_DONE = sse_event("[DONE]")


def _invalid(message: str, param: str | None) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_request_error")


def _context_error(message: str, param: str | None) -> ContextLengthError:
    return ContextLengthError(message, param=param, code="context_length_exceeded")


# --- models -----------------------------------------------------------------------------------


def list_models(serving: Serving) -> ModelList:
    return ModelList(data=[_model_card(serving, serving.models.current())])


def retrieve_model(serving: Serving, name: str) -> ModelCard:
    model = serving.models.current()
    if name != model.name:
        raise _model_not_found(model, name)
    return _model_card(serving, model)


def _model_card(serving: Serving, model: ServedModel) -> ModelCard:
    return ModelCard(
        id=model.name,
        created=int(serving.started_at),
        root=model.source,
        max_model_len=serving.window(model).max_total_tokens,
        sampling_defaults=model.generation_defaults,
    )


def _model_not_found(model: ServedModel, name: str) -> NotFoundError:
    return NotFoundError(
        f"The model `{name}` does not exist; this server serves `{model.name}`.",
        param="model",
        code="model_not_found",
    )


def check_model(model: ServedModel, name: str | None) -> None:
    """A request naming another model is refused (404), as vLLM does; none at all is fine."""
    if name and name != model.name and name not in PLACEHOLDER_MODELS:
        raise _model_not_found(model, name)


# --- request checks -------------------------------------------------------------------------


def _check_common(body: SamplingFields) -> None:
    if body.logit_bias:
        raise _invalid("logit_bias is not supported", "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise _invalid("stream_options is only allowed with stream=true", "stream_options")


def _check_chat(body: ChatCompletionRequest) -> None:
    _check_common(body)
    if body.tools or body.functions:
        param = "tools" if body.tools else "functions"
        raise _invalid(f"{param} (tool calling) is not supported", param)
    if body.tool_choice not in (None, "none", "auto"):
        raise _invalid("tool_choice is not supported (no tools can be called)", "tool_choice")
    _check_response_format(body.response_format)
    if body.top_logprobs and not body.logprobs:
        raise _invalid("top_logprobs needs logprobs=true", "top_logprobs")


def _check_response_format(response_format: dict[str, Any] | None) -> None:
    if response_format is not None and response_format.get("type", "text") != "text":
        kind = response_format.get("type")
        raise _invalid(
            f"response_format {kind!r} is not supported; only 'text' is", "response_format"
        )


def _check_completion(body: CompletionRequest) -> None:
    _check_common(body)
    _check_response_format(body.response_format)
    if body.suffix:
        raise _invalid("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of > 1:
        raise _invalid("best_of > 1 is not supported; use n for several choices", "best_of")
    if body.echo and body.logprobs is not None:
        raise _invalid(
            "echo with logprobs is not supported (prompt logprobs are not computed)", "echo"
        )


# --- prompts and sampling parameters --------------------------------------------------------


def _context_message(limit: int, num_prompt: int, max_tokens: int | None, what: str) -> str:
    if max_tokens is None:
        return (
            f"This model's maximum context length is {limit} tokens. However, your {what} "
            f"has {num_prompt} tokens, which leaves no room for the completion. Please reduce "
            f"the length of the {what}."
        )
    return (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{num_prompt + max_tokens} tokens ({num_prompt} in the {what}, {max_tokens} in the "
        f"completion). Please reduce the length of the {what} or completion."
    )


def _resolve_max_tokens(
    window: ContextWindow,
    num_prompt: int,
    requested: int | None,
    what: str,
    default: int | None = None,
) -> int:
    """``requested``, checked against the context; when None, the model's default (its
    generation_config's ``max_new_tokens``) or all the room the prompt leaves, whichever is
    less."""
    if num_prompt > window.max_input_tokens:
        raise _context_error(
            f"Your {what} has {num_prompt} tokens, over this server's limit of "
            f"{window.max_input_tokens} input tokens. Please reduce the length of the {what}.",
            what,
        )
    room = window.room(num_prompt)
    limit = window.max_total_tokens
    if requested is None:
        if room < 1:
            raise _context_error(_context_message(limit, num_prompt, None, what), what)
        return min(room, default) if default else room
    if requested > room:
        raise _context_error(_context_message(limit, num_prompt, requested, what), "max_tokens")
    return requested


async def _chat_prompt(
    generation: Generation, body: ChatCompletionRequest
) -> tuple[list[int], int]:
    """The rendered, tokenized conversation (oldest exchanges dropped to fit) and max tokens."""
    model = generation.model
    assert model is not None
    window = generation.window
    requested = body.max_completion_tokens or body.max_tokens
    budget = window.max_input_tokens
    if requested is not None:
        if requested >= window.max_total_tokens:
            raise _context_error(
                f"This model's maximum context length is {window.max_total_tokens} tokens. "
                f"However, you requested {requested} tokens for the completion, which leaves no "
                "room for the messages.",
                "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            )
        budget = min(budget, window.room(requested))
    try:
        prompt_ids = await generation.off_loop(model.render_chat, body.messages, budget)
    except ContextLengthError as e:
        raise _context_error(str(e), "messages") from e
    except InvalidRequestError as e:
        raise _invalid(str(e), "messages") from e
    except KilnError as e:  # no chat template for this checkpoint
        raise _invalid(str(e), None) from e
    default = model.generation_defaults.get("max_new_tokens")
    max_new_tokens = _resolve_max_tokens(window, len(prompt_ids), requested, "messages", default)
    return prompt_ids, max_new_tokens


def _tokenize_prompts(model: ServedModel, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt (texts are tokenized: blocking, run it off the event loop)."""
    vocab_size = model.config.vocab_size
    result = []
    for p in prompts:
        if not p:
            raise _invalid("prompt must not be empty", "prompt")
        if isinstance(p, str):
            result.append(model.encode(p))
            continue
        bad = next((t for t in p if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _invalid(f"prompt token id {bad} is not in [0, {vocab_size})", "prompt")
        result.append(list(p))
    return result


async def _completion_prompts(generation: Generation, prompt: Any) -> list[list[int]]:
    """Token ids of each prompt: a text, texts, token ids or lists of token ids."""
    assert generation.model is not None
    prompts: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt)
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    if not prompts:
        raise _invalid("prompt must not be empty", "prompt")
    return await generation.off_loop(_tokenize_prompts, generation.model, prompts)


def _sampling_params(
    body: SamplingFields,
    defaults: dict[str, Any],
    max_new_tokens: int,
    choice: int,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    seed = None if body.seed is None else (body.seed + choice) % 2**64
    try:
        return _make_params(body, defaults, max_new_tokens, seed, logprobs, top_logprobs)
    except InvalidRequestError as e:  # a combination the schema cannot see (min > max...)
        field = str(e).split(" ", 1)[0]
        message = str(e)
        for ours, theirs in _OPENAI_NAMES.items():
            message = message.replace(ours, theirs)
        raise _invalid(message, _OPENAI_NAMES.get(field, field)) from e


_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


# OpenAI's defaults of the fields a checkpoint's generation_config.json may override.
_API_DEFAULTS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


def _with_defaults(body: SamplingFields, defaults: dict[str, Any]) -> dict[str, Any]:
    """The request's value of each overridable field; where it gave none (omitted or null),
    the model's default, else OpenAI's."""
    values = {}
    for name, api_default in _API_DEFAULTS.items():
        given = getattr(body, name) if name in body.model_fields_set else None
        values[name] = given if given is not None else defaults.get(name, api_default)
    values["top_k"] = max(values["top_k"], 0)  # vLLM's -1 means "off" too
    return values


def _make_params(
    body: SamplingFields,
    defaults: dict[str, Any],
    max_new_tokens: int,
    seed: int | None,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=body.min_tokens,
        **_with_defaults(body, defaults),
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        seed=seed,
        stop=body.stop or (),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=body.skip_special_tokens,
    )


def _finish_reason(reason: FinishReason | None) -> FinishReasonLiteral | None:
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


def _dump_chunk(chunk: ChatCompletionChunk | CompletionChunk) -> dict[str, Any]:
    data = chunk.model_dump()
    if isinstance(chunk, ChatCompletionChunk):
        for choice in data["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


# --- chat completions -----------------------------------------------------------------------


def _generation(serving: Serving, request: Request) -> Generation:
    return serving.generation("aborted", disconnect_watch(request))


def _usage(generation: Generation) -> Usage:
    prompt, completion = generation.num_prompt_tokens, generation.num_output_tokens
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _error_event(error: Exception) -> str:
    invalid = isinstance(error, InvalidRequestError)
    return sse_event(
        {
            "error": {
                "message": str(error) or type(error).__name__,
                "type": "invalid_request_error" if invalid else "server_error",
                "param": None,
                "code": 400 if invalid else 503,
            }
        }
    )


def _stream(generation: Generation, events: AsyncIterator[str]) -> Response:
    return EventStream(
        generation.stream(events, _error_event, _DONE),
        on_close=lambda: generation.fail(ClientDisconnectedError()),
        shutdown_events=lambda error: [_error_event(error), _DONE],
    )


async def chat_completion(
    serving: Serving, body: ChatCompletionRequest, request: Request
) -> Response:
    try:
        return await _chat_completion(serving, body, request)
    except ClientDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it


async def _chat_completion(
    serving: Serving, body: ChatCompletionRequest, request: Request
) -> Response:
    generation = _generation(serving, request)
    model = await generation.admit()
    with generation.failures_recorded():
        check_model(model, body.model)
        _check_chat(body)
        prompt_ids, max_new_tokens = await _chat_prompt(generation, body)
        defaults = model.generation_defaults
        top_logprobs = body.top_logprobs or 0
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        await generation.start(
            [
                Choice(
                    i,
                    f"{request_id}-{i}",
                    prompt_ids,
                    _sampling_params(
                        body, defaults, max_new_tokens, i, body.logprobs, top_logprobs
                    ),
                )
                for i in range(body.n)
            ]
        )
    renderer = token_renderer(model.tokenizer) if body.logprobs else None
    header = {"id": request_id, "created": int(time.time()), "model": model.name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(generation, _chat_events(generation, header, renderer, include_usage))

    async def collect() -> ChatCompletionResponse:
        texts = [""] * body.n
        logprobs: list[ChatLogprobs | None] = [
            ChatLogprobs(content=[]) if renderer else None for _ in range(body.n)
        ]
        reasons: list[FinishReasonLiteral | None] = [None] * body.n
        async for choice, out in generation.outputs():
            texts[choice.index] += out.text
            target = logprobs[choice.index]
            if target is not None and renderer is not None:
                target.content += chat_logprobs(
                    renderer, out.token_ids, out.logprobs, out.top_logprobs
                )
            if out.finished:
                reasons[choice.index] = _finish_reason(out.finish_reason)
        return ChatCompletionResponse(
            **header,
            choices=[
                ChatChoice(
                    index=i,
                    message=ChatMessage(content=texts[i]),
                    logprobs=logprobs[i],
                    finish_reason=reasons[i],
                )
                for i in range(body.n)
            ],
            usage=_usage(generation),
        )

    response = await generation.answer(collect())
    return JSONResponse(response.model_dump())


async def _chat_events(
    generation: Generation,
    header: dict[str, Any],
    renderer: TokenRenderer | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choice: ChatChunkChoice) -> str:
        return sse_event(_dump_chunk(ChatCompletionChunk(**header, choices=[choice])))

    for choice in generation.choices:
        yield chunk(
            ChatChunkChoice(index=choice.index, delta=DeltaMessage(role="assistant", content=""))
        )
    async for choice, out in generation.outputs():
        logprobs = None
        if renderer is not None and out.token_ids:
            content = chat_logprobs(renderer, out.token_ids, out.logprobs, out.top_logprobs)
            logprobs = ChatLogprobs(content=content)
        if not (out.text or logprobs or out.finished):
            continue  # a token that completes no character yet
        yield chunk(
            ChatChunkChoice(
                index=choice.index,
                delta=DeltaMessage(content=out.text or None),
                logprobs=logprobs,
                finish_reason=_finish_reason(out.finish_reason),
            )
        )
    if include_usage:
        final = ChatCompletionChunk(**header, choices=[], usage=_usage(generation))
        yield sse_event(_dump_chunk(final))


# --- text completions -----------------------------------------------------------------------


async def completion(serving: Serving, body: CompletionRequest, request: Request) -> Response:
    try:
        return await _completion(serving, body, request)
    except ClientDisconnectedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _completion(serving: Serving, body: CompletionRequest, request: Request) -> Response:
    generation = _generation(serving, request)
    model = await generation.admit()
    with generation.failures_recorded():
        check_model(model, body.model)
        _check_completion(body)
        prompts = await _completion_prompts(generation, body.prompt)
        if len(prompts) * body.n > MAX_CHOICES:
            raise _invalid(
                f"{len(prompts)} prompts x n={body.n} asks for more than {MAX_CHOICES} choices",
                "n",
            )
        wants_logprobs = body.logprobs is not None
        defaults = model.generation_defaults
        # OpenAI's default of 16 tokens applies only to a model that sets none of its own.
        default = defaults.get("max_new_tokens")
        requested = body.max_tokens if "max_tokens" in body.model_fields_set else None
        if requested is None and default is None:
            requested = body.max_tokens
        request_id = f"cmpl-{uuid.uuid4().hex}"
        choices = []
        for p, prompt_ids in enumerate(prompts):
            max_new_tokens = _resolve_max_tokens(
                generation.window, len(prompt_ids), requested, "prompt", default
            )
            for i in range(body.n):
                index = p * body.n + i
                params = _sampling_params(
                    body, defaults, max_new_tokens, i, wants_logprobs, body.logprobs or 0
                )
                choices.append(Choice(index, f"{request_id}-{index}", prompt_ids, params))
        await generation.start(choices)
    renderer = token_renderer(model.tokenizer) if wants_logprobs else None
    echoes = [_echo_text(model, body, c) for c in choices]
    header = {"id": request_id, "created": int(time.time()), "model": model.name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(
            generation, _completion_events(generation, header, renderer, echoes, include_usage)
        )

    async def collect() -> CompletionResponse:
        texts = list(echoes)
        logprobs = [CompletionLogprobs() if renderer else None for _ in choices]
        offsets = [len(e) for e in echoes]
        reasons: list[FinishReasonLiteral | None] = [None] * len(choices)
        async for choice, out in generation.outputs():
            texts[choice.index] += out.text
            target = logprobs[choice.index]
            if target is not None and renderer is not None:
                offsets[choice.index] = extend_completion_logprobs(
                    target,
                    renderer,
                    out.token_ids,
                    out.logprobs,
                    out.top_logprobs,
                    offsets[choice.index],
                )
            if out.finished:
                reasons[choice.index] = _finish_reason(out.finish_reason)
        return CompletionResponse(
            **header,
            choices=[
                CompletionChoice(
                    index=i,
                    text=texts[i],
                    logprobs=logprobs[i],
                    finish_reason=reasons[i],
                )
                for i in range(len(choices))
            ],
            usage=_usage(generation),
        )

    response = await generation.answer(collect())
    return JSONResponse(response.model_dump())


def _echo_text(model: ServedModel, body: CompletionRequest, choice: Choice) -> str:
    if not body.echo:
        return ""
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], str):
        return prompt[choice.index // body.n]  # type: ignore[return-value]
    return model.tokenizer.decode(choice.prompt_ids, body.skip_special_tokens)


async def _completion_events(
    generation: Generation,
    header: dict[str, Any],
    renderer: TokenRenderer | None,
    echoes: list[str],
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choice: CompletionChoice) -> str:
        return sse_event(_dump_chunk(CompletionChunk(**header, choices=[choice])))

    pending_echo = list(echoes)
    offsets = [len(e) for e in echoes]
    async for choice, out in generation.outputs():
        logprobs = None
        if renderer is not None and out.token_ids:
            logprobs = CompletionLogprobs()
            offsets[choice.index] = extend_completion_logprobs(
                logprobs,
                renderer,
                out.token_ids,
                out.logprobs,
                out.top_logprobs,
                offsets[choice.index],
            )
        text = pending_echo[choice.index] + out.text
        pending_echo[choice.index] = ""
        if not (text or logprobs or out.finished):
            continue
        yield chunk(
            CompletionChoice(
                index=choice.index,
                text=text,
                logprobs=logprobs,
                finish_reason=_finish_reason(out.finish_reason),
            )
        )
    if include_usage:
        final = CompletionChunk(**header, choices=[], usage=_usage(generation))
        yield sse_event(_dump_chunk(final))
