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
    exchanges are dropped (the system prompt stays).

    Args:
        system: a system prompt for the conversation.
        max_input_tokens: token budget for the rendered history (default: the context minus
            --max-new-tokens).
    """
    from kiln.errors import KilnError

    llm = model.load()
    params = sampling.to_params(**CHAT_DEFAULTS)
    budget = max_input_tokens or max(1, llm.max_model_len - params.max_new_tokens)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    out = sys.stdout
    if interactive:
        print(f"kiln chat: {llm.model_name}. {HELP}")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
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
        try:
            _, kept = llm.chat_prompt(messages, budget)
            reply = ""
            for delta in llm.stream_chat(kept, params, max_input_tokens=budget):
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
        history = [*kept, {"role": "assistant", "content": reply}]
