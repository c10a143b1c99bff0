"""OpenAI-compatible handlers: request -> prompt + SamplingParams -> engine -> response or SSE.

Checks what the schemas cannot (the model name, unsupported features, the context), builds
each choice's prompt and SamplingParams, runs them with :class:`~.generation.Run` and shapes
the outputs as OpenAI's responses or chunks.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.engine.request import FinishReason
from kiln.errors import ContextLengthError, InvalidRequestError, KilnError
from kiln.sampling import SamplingParams
from kiln.server.errors import error_response
from kiln.server.openai.generation import Choice, Run
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
)
from kiln.server.sse import sse_event
from kiln.server.state import ServerState

PLACEHOLDER_MODELS = frozenset({"tgi", "dummy"})
"""``model`` values accepted besides the served id: what TGI clients and huggingface_hub's
InferenceClient send when pointed at a URL rather than a model."""


class OpenAIError(InvalidRequestError):
    """An error answered as-is in OpenAI's shape: status, message, ``code`` and ``param``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def response(self, request: Request) -> JSONResponse:
        return error_response(request, self.status, self.message, self.code, self.param)


def _invalid(message: str, param: str | None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param)


# --- models -----------------------------------------------------------------------------------


def list_models(state: ServerState) -> ModelList:
    return ModelList(data=[_model_card(state)])


def retrieve_model(state: ServerState, model: str) -> ModelCard:
    if model != state.model_id:
        raise _model_not_found(state, model)
    return _model_card(state)


def _model_card(state: ServerState) -> ModelCard:
    return ModelCard(
        id=state.model_id,
        created=int(state.started_at),
        root=state.llm.model_name,
        max_model_len=state.max_total_tokens,
    )


def _model_not_found(state: ServerState, model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist; this server serves `{state.model_id}`.",
        "model_not_found",
        "model",
    )


def check_model(state: ServerState, model: str | None) -> None:
    """A request naming another model is refused (404), as vLLM does; none at all is fine."""
    if model and model != state.model_id and model not in PLACEHOLDER_MODELS:
        raise _model_not_found(state, model)


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
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        kind = body.response_format.get("type")
        raise _invalid(
            f"response_format {kind!r} is not supported; only 'text' is", "response_format"
        )
    if body.top_logprobs and not body.logprobs:
        raise _invalid("top_logprobs needs logprobs=true", "top_logprobs")


def _check_completion(body: CompletionRequest) -> None:
    _check_common(body)
    if body.suffix:
        raise _invalid("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of > 1:
        raise _invalid("best_of > 1 is not supported; use n for several choices", "best_of")
    if body.echo and body.logprobs is not None:
        raise _invalid(
            "echo with logprobs is not supported (prompt logprobs are not computed)", "echo"
        )


# --- prompts and sampling parameters --------------------------------------------------------


def _context_limit(state: ServerState) -> int:
    """Prompt + output tokens one request may take: the server's limit, the model's context,
    and what the whole KV cache holds."""
    engine = state.llm.engine
    return min(state.max_total_tokens, state.llm.max_model_len, engine.max_cache_tokens)


def _context_error(limit: int, num_prompt: int, max_tokens: int | None, what: str) -> OpenAIError:
    if max_tokens is None:
        message = (
            f"This model's maximum context length is {limit} tokens. However, your {what} "
            f"has {num_prompt} tokens, which leaves no room for the completion. Please reduce "
            f"the length of the {what}."
        )
    else:
        message = (
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the {what}, {max_tokens} in the "
            f"completion). Please reduce the length of the {what} or completion."
        )
    return OpenAIError(
        400, message, "context_length_exceeded", "max_tokens" if max_tokens else what
    )


def _resolve_max_tokens(
    state: ServerState, num_prompt: int, requested: int | None, what: str
) -> int:
    """``requested``, checked against the context, or (None) all the room the prompt leaves."""
    limit = _context_limit(state)
    if num_prompt > state.max_input_tokens:
        raise OpenAIError(
            400,
            f"Your {what} has {num_prompt} tokens, over this server's limit of "
            f"{state.max_input_tokens} input tokens. Please reduce the length of the {what}.",
            "context_length_exceeded",
            what,
        )
    room = limit - num_prompt
    if requested is None:
        if room < 1:
            raise _context_error(limit, num_prompt, None, what)
        return room
    if requested > room:
        raise _context_error(limit, num_prompt, requested, what)
    return requested


def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> tuple[list[int], int]:
    """The rendered, tokenized conversation (oldest exchanges dropped to fit) and max tokens."""
    requested = body.max_completion_tokens or body.max_tokens
    limit = _context_limit(state)
    budget = state.max_input_tokens
    if requested is not None:
        if requested >= limit:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{requested} tokens for the completion, which leaves no room for the messages.",
                "context_length_exceeded",
                "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            )
        budget = min(budget, limit - requested)
    try:
        prompt_ids, _ = state.llm.chat_prompt(body.messages, budget)
    except ContextLengthError as e:
        raise OpenAIError(400, str(e), "context_length_exceeded", "messages") from e
    except InvalidRequestError as e:
        raise _invalid(str(e), "messages") from e
    except KilnError as e:  # no chat template for this checkpoint
        raise _invalid(str(e), None) from e
    return prompt_ids, _resolve_max_tokens(state, len(prompt_ids), requested, "messages")


def _completion_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    """Token ids of each prompt: a text, texts, token ids or lists of token ids."""
    prompts: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt)
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    if not prompts:
        raise _invalid("prompt must not be empty", "prompt")
    vocab_size = state.llm.config.vocab_size
    result = []
    for p in prompts:
        if not p:
            raise _invalid("prompt must not be empty", "prompt")
        if isinstance(p, str):
            result.append(state.llm.tokenizer.encode(p))
            continue
        bad = next((t for t in p if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _invalid(f"prompt token id {bad} is not in [0, {vocab_size})", "prompt")
        result.append(list(p))
    return result


def _sampling_params(
    body: SamplingFields,
    max_new_tokens: int,
    choice: int,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    seed = None if body.seed is None else (body.seed + choice) % 2**64
    try:
        return _make_params(body, max_new_tokens, seed, logprobs, top_logprobs)
    except InvalidRequestError as e:  # a combination the schema cannot see (min > max...)
        field = str(e).split(" ", 1)[0]
        message = str(e)
        for ours, theirs in _OPENAI_NAMES.items():
            message = message.replace(ours, theirs)
        raise _invalid(message, _OPENAI_NAMES.get(field, field)) from e


_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def _make_params(
    body: SamplingFields, max_new_tokens: int, seed: int | None, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=body.min_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
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


async def chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
) -> Response:
    run = Run(state, request)
    state = await run.admit()
    with run.failures_recorded():
        check_model(state, body.model)
        _check_chat(body)
        prompt_ids, max_new_tokens = _chat_prompt(state, body)
        top_logprobs = body.top_logprobs or 0
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        await run.start(
            [
                Choice(
                    i,
                    f"{request_id}-{i}",
                    prompt_ids,
                    _sampling_params(body, max_new_tokens, i, body.logprobs, top_logprobs),
                )
                for i in range(body.n)
            ]
        )
        renderer = token_renderer(state.llm.tokenizer) if body.logprobs else None
        header = {"id": request_id, "created": int(time.time()), "model": state.model_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return run.stream(_chat_events(run, header, renderer, include_usage))

        async def collect() -> ChatCompletionResponse:
            texts = [""] * body.n
            logprobs: list[ChatLogprobs | None] = [
                ChatLogprobs(content=[]) if renderer else None for _ in range(body.n)
            ]
            reasons: list[FinishReasonLiteral | None] = [None] * body.n
            async for choice, out in run.outputs():
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
                usage=run.usage(),
            )

        response = await run.answer(collect())
        return JSONResponse(response.model_dump())


async def _chat_events(
    run: Run,
    header: dict[str, Any],
    renderer: TokenRenderer | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choice: ChatChunkChoice) -> str:
        return sse_event(_dump_chunk(ChatCompletionChunk(**header, choices=[choice])))

    for choice in run.choices:
        yield chunk(
            ChatChunkChoice(index=choice.index, delta=DeltaMessage(role="assistant", content=""))
        )
    async for choice, out in run.outputs():
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
        final = ChatCompletionChunk(**header, choices=[], usage=run.usage())
        yield sse_event(_dump_chunk(final))


# --- text completions -----------------------------------------------------------------------


async def completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    run = Run(state, request)
    state = await run.admit()
    with run.failures_recorded():
        check_model(state, body.model)
        _check_completion(body)
        prompts = _completion_prompts(state, body.prompt)
        if len(prompts) * body.n > MAX_CHOICES:
            raise _invalid(
                f"{len(prompts)} prompts x n={body.n} asks for more than {MAX_CHOICES} choices",
                "n",
            )
        wants_logprobs = body.logprobs is not None
        request_id = f"cmpl-{uuid.uuid4().hex}"
        choice_list = []
        for p, prompt_ids in enumerate(prompts):
            max_new_tokens = _resolve_max_tokens(state, len(prompt_ids), body.max_tokens, "prompt")
            for i in range(body.n):
                index = p * body.n + i
                params = _sampling_params(
                    body, max_new_tokens, i, wants_logprobs, body.logprobs or 0
                )
                choice_list.append(Choice(index, f"{request_id}-{index}", prompt_ids, params))
        await run.start(choice_list)
        renderer = token_renderer(state.llm.tokenizer) if wants_logprobs else None
        echoes = [_echo_text(state, body, c) for c in choice_list]
        header = {"id": request_id, "created": int(time.time()), "model": state.model_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return run.stream(_completion_events(run, header, renderer, echoes, include_usage))

        async def collect() -> CompletionResponse:
            texts = list(echoes)
            logprobs = [CompletionLogprobs() if renderer else None for _ in choice_list]
            offsets = [len(e) for e in echoes]
            reasons: list[FinishReasonLiteral | None] = [None] * len(choice_list)
            async for choice, out in run.outputs():
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
                    for i in range(len(choice_list))
                ],
                usage=run.usage(),
            )

        response = await run.answer(collect())
        return JSONResponse(response.model_dump())


def _echo_text(state: ServerState, body: CompletionRequest, choice: Choice) -> str:
    if not body.echo:
        return ""
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], str):
        return prompt[choice.index // body.n]  # type: ignore[return-value]
    return state.llm.tokenizer.decode(choice.prompt_ids, body.skip_special_tokens)


async def _completion_events(
    run: Run,
    header: dict[str, Any],
    renderer: TokenRenderer | None,
    echoes: list[str],
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choice: CompletionChoice) -> str:
        return sse_event(_dump_chunk(CompletionChunk(**header, choices=[choice])))

    pending_echo = list(echoes)
    offsets = [len(e) for e in echoes]
    async for choice, out in run.outputs():
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
        yield sse_event(_dump_chunk(CompletionChunk(**header, choices=[], usage=run.usage())))
