"""The web chat API, under ``/api/chat``: conversations, their message trees, answers.

- ``GET /conversations``: the owner's conversations, the most recently active first.
- ``POST /conversations`` (201), ``GET|PATCH|DELETE /conversations/{id}``; GET answers the
  conversation with every message of every branch (``parent_id`` links them) and ``branch``,
  the ids from the first message to ``current_leaf_id`` (the branch shown). PATCH changes the
  title, system prompt, settings, or the branch shown (``current_leaf_id``).
- ``POST /conversations/{id}/messages``: a user message, answered as a stream of server-sent
  events (see :mod:`kiln.server.chat.answers`).
- ``POST /conversations/{id}/messages/{message_id}/regenerate``: another answer to the user
  message that an assistant message answered (or to a user message itself): a sibling.
- ``POST /conversations/{id}/messages/{message_id}/stop``: stop an answer being generated
  (202); its engine request is aborted and its text so far kept, marked ``stopped``.
- ``GET /search?q=``: messages containing every word; ``GET /defaults``: the active model
  and its default settings.
- ``GET /conversations/{id}/export?format=json|markdown``: one conversation as a download,
  JSON (lossless: every branch, settings, the model of each message) or Markdown (the branch
  shown); ``GET /export``: all of the owner's conversations as JSON; ``POST /import`` (201): a
  JSON export, stored as new conversations of the caller (see :mod:`.transfer`).

Another owner's conversation answers 404, as one that does not exist. Errors have TGI's shape
(``{"error", "error_type"}``): 422 for invalid input, 404, 409, 403 for a cross-site write.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from kiln.errors import ConflictError, InvalidRequestError
from kiln.server.chat.answers import AnswerRequest, RunningAnswers, default_settings, stream_answer
from kiln.server.chat.owner import OwnerDep, same_origin
from kiln.server.chat.schemas import ConversationChanges, NewConversation, NewMessage, Settings
from kiln.server.chat.transfer import export_file, filename, parse_import, to_markdown, to_records
from kiln.server.errors import TGIRoute
from kiln.server.state import ServingDep
from kiln.store import ChatStore, GenerationSettings, Role

PREFIX = "/api/chat"

# NOTE: left out of /openapi.json, which documents the TGI and OpenAI APIs that clients
# are generated from (and is fuzzed as such); this one is the page's own.
router = APIRouter(
    prefix=PREFIX,
    tags=["chat"],
    route_class=TGIRoute,
    dependencies=[Depends(same_origin)],
    include_in_schema=False,
)


def _store(request: Request) -> ChatStore:
    return request.app.state.chat_store


def _running(request: Request) -> RunningAnswers:
    return request.app.state.chat_answers


StoreDep = Annotated[ChatStore, Depends(_store)]
RunningDep = Annotated[RunningAnswers, Depends(_running)]


def _settings(settings: Settings) -> GenerationSettings:
    return GenerationSettings(**settings.model_dump())


def _conversation_body(store: ChatStore, owner: str, conversation_id: str) -> dict[str, Any]:
    conversation = store.conversation(owner, conversation_id)
    messages = store.messages(owner, conversation_id)
    branch = store.branch(owner, conversation_id, conversation.current_leaf_id)
    return {
        **conversation.to_dict(),
        "messages": [m.to_dict() for m in messages],
        "branch": [m.id for m in branch],
    }


# --- conversations ----------------------------------------------------------------------------


@router.get("/conversations")
async def list_conversations(store: StoreDep, owner: OwnerDep) -> list[dict[str, Any]]:
    return [c.to_dict() for c in store.conversations(owner)]


@router.post("/conversations", status_code=201)
async def create_conversation(
    body: NewConversation, store: StoreDep, owner: OwnerDep
) -> dict[str, Any]:
    conversation = store.create_conversation(
        owner, body.title, body.system_prompt, _settings(body.settings)
    )
    return _conversation_body(store, owner, conversation.id)


@router.get("/conversations/{conversation_id}")
async def get_conversation(
    conversation_id: str, store: StoreDep, owner: OwnerDep
) -> dict[str, Any]:
    return _conversation_body(store, owner, conversation_id)


@router.patch("/conversations/{conversation_id}")
async def update_conversation(
    conversation_id: str, body: ConversationChanges, store: StoreDep, owner: OwnerDep
) -> dict[str, Any]:
    given = body.model_fields_set
    changes: dict[str, Any] = {}
    for name in ("title", "system_prompt", "current_leaf_id"):
        if name in given:
            value = getattr(body, name)
            if value is None:
                raise InvalidRequestError(f"{name} must not be null", param=name)
            changes[name] = value
    if "settings" in given:
        changes["settings"] = _settings(body.settings or Settings())
    store.update_conversation(owner, conversation_id, **changes)
    return _conversation_body(store, owner, conversation_id)


@router.delete("/conversations/{conversation_id}", status_code=204)
async def delete_conversation(
    conversation_id: str, store: StoreDep, owner: OwnerDep, running: RunningDep
) -> Response:
    for message in store.messages(owner, conversation_id):
        running.stop(message.id)  # an answer being written to it has nowhere to go
    store.delete_conversation(owner, conversation_id)
    return Response(status_code=204)


# --- messages ---------------------------------------------------------------------------------


@router.post("/conversations/{conversation_id}/messages")
async def send_message(
    conversation_id: str,
    body: NewMessage,
    request: Request,
    serving: ServingDep,
    store: StoreDep,
    owner: OwnerDep,
    running: RunningDep,
) -> Response:
    """Send a user message; the answer streams back as server-sent events."""
    conversation = store.conversation(owner, conversation_id)
    if not body.content.strip():
        raise InvalidRequestError("content must not be empty", param="content")
    given = "parent_id" in body.model_fields_set
    parent_id = body.parent_id if given else conversation.current_leaf_id
    history = store.branch(owner, conversation_id, parent_id)
    if history and history[-1].role is not Role.ASSISTANT:
        raise InvalidRequestError(
            "a message must follow an answer: regenerate the unanswered message instead",
            param="parent_id",
        )
    what = AnswerRequest(owner, conversation, history, body.content, parent_id)
    return await stream_answer(serving, store, running, request, what)


@router.post("/conversations/{conversation_id}/messages/{message_id}/regenerate")
async def regenerate(
    conversation_id: str,
    message_id: str,
    request: Request,
    serving: ServingDep,
    store: StoreDep,
    owner: OwnerDep,
    running: RunningDep,
) -> Response:
    """Answer again: a new sibling of assistant message ``message_id`` (or a new answer to
    user message ``message_id``)."""
    conversation = store.conversation(owner, conversation_id)
    message = store.message(owner, conversation_id, message_id)
    question_id = message.id if message.role is Role.USER else message.parent_id
    history = store.branch(owner, conversation_id, question_id)
    what = AnswerRequest(owner, conversation, history)
    return await stream_answer(serving, store, running, request, what)


@router.post("/conversations/{conversation_id}/messages/{message_id}/stop", status_code=202)
async def stop(
    conversation_id: str,
    message_id: str,
    store: StoreDep,
    owner: OwnerDep,
    running: RunningDep,
) -> JSONResponse:
    """Stop an answer being generated: its engine request is aborted at once."""
    store.message(owner, conversation_id, message_id)  # 404 unless it is the owner's
    if not running.stop(message_id):
        raise ConflictError("this answer is not being generated")
    return JSONResponse({"stopping": message_id}, status_code=202)


# --- search, defaults -------------------------------------------------------------------------


@router.get("/search")
async def search(
    store: StoreDep,
    owner: OwnerDep,
    q: Annotated[str, Query(max_length=500)],
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[dict[str, Any]]:
    return [hit.to_dict() for hit in store.search(owner, q, limit)]


@router.get("/defaults")
async def defaults(serving: ServingDep) -> dict[str, Any]:
    """The model that answers now, and the settings a conversation gets when it sets none."""
    model = serving.models.current()
    return {"model": model.name, "settings": default_settings(model)}


# --- export, import ---------------------------------------------------------------------------


def _download(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


@router.get("/conversations/{conversation_id}/export")
async def export_conversation(
    conversation_id: str,
    store: StoreDep,
    owner: OwnerDep,
    kind: Annotated[Literal["json", "markdown"], Query(alias="format")] = "json",
) -> Response:
    conversation = store.conversation(owner, conversation_id)
    if kind == "markdown":
        branch = store.branch(owner, conversation_id, conversation.current_leaf_id)
        return Response(
            to_markdown(conversation, branch),
            media_type="text/markdown; charset=utf-8",
            headers=_download(filename(conversation, ".md")),
        )
    document = export_file([(conversation, store.messages(owner, conversation_id))])
    return JSONResponse(document, headers=_download(filename(conversation, ".json")))


@router.get("/export")
async def export_all(store: StoreDep, owner: OwnerDep) -> JSONResponse:
    conversations = store.conversations(owner)
    document = export_file([(c, store.messages(owner, c.id)) for c in conversations])
    return JSONResponse(document, headers=_download("kiln-chats.json"))


@router.post("/import", status_code=201)
async def import_conversations(
    body: Annotated[dict[str, Any], Body()], store: StoreDep, owner: OwnerDep
) -> dict[str, Any]:
    """Store the conversations of a JSON export as new ones of the caller (all or none)."""
    created = store.import_conversations(owner, to_records(parse_import(body)))
    return {"conversations": [c.to_dict() for c in created]}
