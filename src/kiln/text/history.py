"""History truncation: fit a conversation into the context by forgetting its oldest turns."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kiln.errors import ContextLengthError, InvalidRequestError
from kiln.text.chat_template import ChatTemplate
from kiln.text.tokenizer import Tokenizer

Message = Mapping[str, Any]


def _split_exchanges(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """Leading system messages, then exchanges: each starts at a user message and runs up to
    the next one (the assistant reply, tool calls and results in between go with it)."""
    start = 0
    while start < len(messages) and messages[start].get("role") == "system":
        start += 1
    system = list(messages[:start])
    exchanges: list[list[Message]] = []
    for message in messages[start:]:
        if message.get("role") == "user" or not exchanges:
            exchanges.append([])
        exchanges[-1].append(message)
    return system, exchanges


def fit_history(
    messages: Sequence[Message],
    count_tokens: Callable[[list[Message]], int],
    max_tokens: int,
) -> list[Message]:
    """Drop the oldest exchanges until ``count_tokens(kept) <= max_tokens``.

    Leading system messages are always kept, and so is the last exchange (the question being
    asked). A user message and the replies after it are dropped together, so the kept history
    still alternates user/assistant as strict templates demand.

    ``count_tokens`` renders and tokenizes a candidate list; it is called O(log n) times: the
    count only shrinks as exchanges are dropped, so the fewest drops that fit are found by
    bisection rather than by rendering every candidate.

    Raises:
        ContextLengthError: the system messages plus the last exchange alone exceed the budget.
    """
    system, exchanges = _split_exchanges(messages)

    def kept(num_dropped: int) -> list[Message]:
        return system + [m for exchange in exchanges[num_dropped:] for m in exchange]

    needed = count_tokens(kept(0))
    if needed <= max_tokens:
        return kept(0)
    most = len(exchanges) - 1  # drop all but the last exchange
    if most > 0:
        needed = count_tokens(kept(most))
    if most <= 0 or needed > max_tokens:
        raise ContextLengthError(
            f"the prompt needs {needed} tokens even with only the system prompt and the last "
            f"message kept, but the budget is {max_tokens} tokens; shorten the last message"
        )
    # Invariant: dropping `high` exchanges fits, dropping `low - 1` does not.
    low, high = 1, most
    while low < high:
        middle = (low + high) // 2
        if count_tokens(kept(middle)) <= max_tokens:
            high = middle
        else:
            low = middle + 1
    return kept(high)


def render_prompt(
    template: ChatTemplate,
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    max_tokens: int | None = None,
    **template_kwargs: Any,
) -> tuple[str, list[int], list[Message]]:
    """Render and tokenize a chat, truncating its history to `max_tokens` prompt tokens.

    The tokenizer's special tokens (``bos_token``, ``eos_token``...) are passed to the template,
    as transformers does; ``template_kwargs`` (``add_generation_prompt``, ``tools``...) win over
    them. The prompt is encoded with :meth:`Tokenizer.encode_chat` (no extra BOS).
    `max_tokens` is the prompt budget: the context length minus the tokens kept for the reply.

    Returns:
        ``(prompt_text, prompt_token_ids, kept_messages)``.
    """
    if max_tokens is not None and max_tokens <= 0:
        raise InvalidRequestError(f"no room for a prompt: the token budget is {max_tokens}")
    kwargs = {**tokenizer.special_tokens_map, **template_kwargs}
    # Keyed by how many messages are kept: each candidate is a distinct length, and the one
    # fit_history settles on has always been rendered already.
    rendered: dict[int, tuple[str, list[int]]] = {}

    def render(candidate: Sequence[Message]) -> tuple[str, list[int]]:
        if len(candidate) not in rendered:
            text = template.render(candidate, **kwargs)
            rendered[len(candidate)] = (text, tokenizer.encode_chat(text))
        return rendered[len(candidate)]

    kept = list(messages)
    if max_tokens is not None:
        kept = fit_history(messages, lambda candidate: len(render(candidate)[1]), max_tokens)
    text, token_ids = render(kept)
    return text, token_ids, kept
