"""`kiln chat`: a terminal chatbot that keeps and truncates its history."""

from __future__ import annotations

import sys
from typing import Any

from kiln.cli.options import ModelOptions, SamplingOptions

# The tutorials' chatbot samples with these (optimum-neuron Llama-2 chat tutorial).
CHAT_DEFAULTS: dict[str, Any] = dict(
    temperature=0.9, top_k=50, repetition_penalty=1.2, max_new_tokens=512
)
HELP = "Type a message. /reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply."


def chat(
    model: ModelOptions,
    sampling: SamplingOptions,
    system: str | None = None,
    max_input_tokens: int | None = None,
) -> int:
    """Chat with a model in the terminal.

    The history is kept between turns; when it no longer fits --max-input-tokens, the oldest
    exchanges are dropped (the system prompt stays). Samples like the tutorials' chatbot
    (temperature 0.9, top-k 50, repetition penalty 1.2, replies of up to 512 tokens or half the
    context) unless sampling flags say otherwise.

    Args:
        system: a system prompt for the conversation.
        max_input_tokens: token budget for the rendered history (default: the context minus
            --max-new-tokens).
    """
    from kiln.errors import InvalidRequestError, KilnError

    # NOTE: flags are checked before the model loads, so a bad one fails at once.
    params = sampling.to_params(**CHAT_DEFAULTS)
    if max_input_tokens is not None and max_input_tokens < 1:
        raise InvalidRequestError(f"--max-input-tokens must be >= 1, got {max_input_tokens}")
    llm = model.load()
    llm.chat_template  # noqa: B018 -- a model without a chat template fails here, not per turn
    context = llm.max_model_len
    if sampling.max_new_tokens is None:
        # The default reply length must leave room for the conversation in small contexts.
        max_new_tokens = min(params.max_new_tokens, context // 2)
        params = sampling.to_params(**{**CHAT_DEFAULTS, "max_new_tokens": max_new_tokens})
    elif params.max_new_tokens >= context:
        raise InvalidRequestError(
            f"--max-new-tokens {params.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {context} tokens"
        )
    budget = max_input_tokens or context - params.max_new_tokens
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    out = sys.stdout
    if interactive:
        print(f"kiln chat: {llm.model_name}. {HELP}")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()  # leave the shell's prompt on a line of its own
            return 0
        command = line.strip()
        if command in ("/exit", "/quit", "/bye"):
            return 0
        if command == "/reset":
            history = history[:1] if system else []
            print("(history cleared)")
            continue
        if not command:
            continue
        messages = [*history, {"role": "user", "content": line}]
        kept: list[dict[str, str]] | None = None
        reply = ""
        try:
            prompt_ids, kept = llm.chat_prompt(messages, budget)
            for delta in llm.stream(prompt_ids, params):  # rendered and tokenized once
                reply += delta.text
                out.write(delta.text)
                out.flush()
        except KeyboardInterrupt:
            pass  # keep the partial reply and the session
        except KilnError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        out.write("\n")
        out.flush()
        if kept is not None:  # None: interrupted before the reply started
            history = [*kept, {"role": "assistant", "content": reply}]
