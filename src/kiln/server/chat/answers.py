"""An assistant answer: the branch rendered as a prompt, generated through the serving layer,
streamed as server-sent events and written to the store as it goes.

The answer runs as one :class:`~kiln.serving.generation.Generation`, as an OpenAI chat
completion does: it takes a seat, pins the active model, renders and tokenizes off the event
loop, and is aborted (its KV blocks freed) when its client leaves or asks it to stop.
Nothing is stored until the engine has accepted the request, so a refused one (too long, server
busy) leaves the conversation as it was. The answer row is written when it starts
(``streaming``), then with the text so far about every second, and once at the end
(``complete``, ``stopped`` or ``error``): a crash leaves the partial text, marked
``interrupted`` at the next start.

Events (``data:`` JSON): ``{"type": "start", "user": message|null, "assistant": message}``,
then ``{"type": "delta", "text": ...}`` per piece of text, then ``{"type": "end", "message":
message}``; a failure after the start ends the stream with ``{"type": "error", "error": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response

from kiln.engine.outputs import RequestOutput
from kiln.errors import InvalidRequestError, KilnError
from kiln.sampling import SamplingParams
from kiln.server.sse import EventStream, sse_event
from kiln.server.state import disconnect_watch
from kiln.serving.generation import Choice, ClientDisconnectedError, Generation
from kiln.serving.served_model import ServedModel
from kiln.serving.service import Serving
from kiln.store import (
    DEFAULT_TITLE,
    ChatStore,
    Conversation,
    GenerationSettings,
    Message,
    MessageStatus,
    Role,
)
from kiln.text.history import render_prompt

TUTORIAL_DEFAULTS: dict[str, Any] = {
    "temperature": 0.9,
    "top_p": 1.0,
    "top_k": 50,
    "repetition_penalty": 1.2,
    "max_new_tokens": 512,
}
"""The tutorial chatbot's sampling (``do_sample=True, temperature=0.9, top_k=50,
repetition_penalty=1.2``), for what the model's ``generation_config.json`` does not set."""

TITLE_CHARS = 60
"""How much of its first question names an untitled conversation."""

SAVE_EVERY_S = 1.0
"""How often the text of an answer being generated is written (what a crash can lose)."""

T = TypeVar("T")


def default_settings(model: ServedModel) -> dict[str, Any]:
    """Each setting's default on ``model``: its generation config's, else the tutorial's."""
    return {
        name: model.generation_defaults.get(name, value)
        for name, value in TUTORIAL_DEFAULTS.items()
    }


@dataclass
class RunningAnswers:
    """The answers being generated, by assistant message id: what Stop reaches."""

    stops: dict[str, asyncio.Event] = field(default_factory=dict)

    def stop(self, message_id: str) -> bool:
        """Ask an answer to stop; False when it is not being generated (here)."""
        event = self.stops.get(message_id)
        if event is None:
            return False
        event.set()
        return True


@dataclass(frozen=True)
class AnswerRequest:
    """What to answer: ``history`` (the branch, oldest first) and, for a new message, the
    user's ``question`` with the message it follows."""

    owner: str
    conversation: Conversation
    history: list[Message]
    question: str | None = None
    question_parent_id: str | None = None


async def stream_answer(
    serving: Serving,
    store: ChatStore,
    running: RunningAnswers,
    request: Request,
    what: AnswerRequest,
) -> Response:
    generation = serving.generation("aborted", disconnect_watch(request))
    model = await generation.admit()
    with generation.failures_recorded():
        chat = _chat_messages(what)
        prompt_ids, params, truncated = await _prepare(generation, model, chat, what)
        request_id = f"chat-{uuid.uuid4().hex}"
        await generation.start([Choice(0, request_id, prompt_ids, params)])
        user, assistant = _store_start(store, what, model.name, truncated)
    stop = asyncio.Event()
    running.stops[assistant.id] = stop

    def closed() -> None:
        running.stops.pop(assistant.id, None)
        generation.fail(ClientDisconnectedError())  # a no-op unless it ended early

    events = _events(generation, store, what.owner, user, assistant, stop)
    return EventStream(
        generation.stream(events, _error_event),
        on_close=closed,
        shutdown_events=lambda error: [_error_event(error)],
    )


def _chat_messages(what: AnswerRequest) -> list[dict[str, str]]:
    chat = []
    if what.conversation.system_prompt.strip():
        chat.append({"role": "system", "content": what.conversation.system_prompt})
    chat += [{"role": m.role.value, "content": m.content} for m in what.history]
    if what.question is not None:
        chat.append({"role": "user", "content": what.question})
    return chat


def _resolved(settings: GenerationSettings, model: ServedModel) -> dict[str, Any]:
    defaults = default_settings(model)
    chosen = settings.to_dict()
    return {name: chosen[name] if chosen[name] is not None else defaults[name] for name in defaults}


async def _prepare(
    generation: Generation,
    model: ServedModel,
    chat: list[dict[str, str]],
    what: AnswerRequest,
) -> tuple[list[int], SamplingParams, bool]:
    """The prompt (oldest exchanges dropped to fit, as ``kiln chat`` does), the sampling
    parameters, and whether the history was cut."""
    window = generation.window
    values = _resolved(what.conversation.settings, model)
    wanted = values.pop("max_new_tokens")
    if what.conversation.settings.max_new_tokens is not None:
        if wanted >= window.max_total_tokens:
            raise InvalidRequestError(
                f"max_new_tokens is {wanted}, but this model's context holds "
                f"{window.max_total_tokens} tokens in all: lower it in the chat's settings",
                param="max_new_tokens",
            )
        reserved = wanted
    else:
        # NOTE: a default is not a demand: it must not crowd the history out of a short context.
        reserved = min(wanted, window.max_total_tokens // 4)
    budget = min(window.max_input_tokens, window.max_total_tokens - reserved)
    try:
        template = model.chat_template
    except KilnError as e:  # a checkpoint without a chat template
        raise InvalidRequestError(f"this model cannot chat: {e}") from e
    _, prompt_ids, kept = await generation.off_loop(
        render_prompt, template, model.tokenizer, chat, budget
    )
    max_new_tokens = min(wanted, window.room(len(prompt_ids)))
    params = SamplingParams(max_new_tokens=max_new_tokens, **values)
    return prompt_ids, params, len(kept) < len(chat)


def _store_start(
    store: ChatStore, what: AnswerRequest, model_name: str, truncated: bool
) -> tuple[Message | None, Message]:
    conversation_id = what.conversation.id
    user = None
    if what.question is not None:
        user = store.add_message(
            what.owner, conversation_id, what.question_parent_id, Role.USER, what.question
        )
        if not what.history and what.conversation.title == DEFAULT_TITLE:
            # An untitled conversation is named after its first question, as chat-ui does.
            title = what.question.strip().splitlines()[0][:TITLE_CHARS]
            store.update_conversation(what.owner, conversation_id, title=title)
    parent = user if user is not None else what.history[-1]
    assistant = store.add_message(
        what.owner,
        conversation_id,
        parent.id,
        Role.ASSISTANT,
        "",
        MessageStatus.STREAMING,
        model=model_name,
        truncated=truncated,
    )
    return user, assistant


async def _events(
    generation: Generation,
    store: ChatStore,
    owner: str,
    user: Message | None,
    assistant: Message,
    stop: asyncio.Event,
) -> AsyncIterator[str]:
    yield sse_event(
        {
            "type": "start",
            "user": None if user is None else user.to_dict(),
            "assistant": assistant.to_dict(),
        }
    )
    text = ""
    saved_at = time.monotonic()
    try:
        async for _, output in _until(generation.outputs(), stop):
            if output.text:
                text += output.text
                yield sse_event({"type": "delta", "text": output.text})
            if time.monotonic() - saved_at > SAVE_EVERY_S:
                store.update_message(assistant.id, text, MessageStatus.STREAMING)
                saved_at = time.monotonic()
    except Exception as e:  # the engine failed mid-answer: generation.stream reports it
        store.update_message(assistant.id, text, MessageStatus.ERROR, error=str(e))
        raise
    except BaseException:  # the client left: what was generated stays, as stopped
        store.update_message(assistant.id, text, MessageStatus.STOPPED)
        raise
    status = MessageStatus.STOPPED if stop.is_set() else MessageStatus.COMPLETE
    if stop.is_set():
        # Aborts the engine request (its KV blocks are freed now) and counts it as aborted.
        generation.fail(ClientDisconnectedError())
    store.update_message(assistant.id, text, status)
    final = store.message(owner, assistant.conversation_id, assistant.id)
    yield sse_event({"type": "end", "message": final.to_dict()})


async def _until(
    outputs: AsyncIterator[tuple[Choice, RequestOutput]], stop: asyncio.Event
) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """``outputs`` until they end or ``stop`` is set, whichever comes first.

    NOTE: a race, not a check between outputs: an engine that is slow to produce the next
    token (a long prefill, a busy batch) must not delay a Stop.
    """
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            following = asyncio.ensure_future(anext(outputs))
            await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await following
                return
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stopped.cancel()


def _error_event(error: Exception) -> str:
    return sse_event({"type": "error", "error": str(error) or type(error).__name__})
