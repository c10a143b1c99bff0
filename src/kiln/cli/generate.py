"""`kiln generate`: complete a prompt, streaming the text to stdout."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from kiln.cli.options import ModelOptions, SamplingOptions

if TYPE_CHECKING:
    from kiln.llm import LLM
    from kiln.sampling import SamplingParams


def generate(
    model: ModelOptions,
    sampling: SamplingOptions,
    prompt: str | None = None,
    instruction: str | None = None,
    context: str | None = None,
) -> int:
    """Complete a prompt and stream the text to stdout.

    Without --prompt, reads prompts from the terminal one line at a time until `exit` or Ctrl-D
    (like the GPT-J tutorial's prompt loop). Greedy unless --temperature is set.

    Args:
        prompt: the text to complete.
        instruction: an instruction to answer, in the Dolly prompt `kiln finetune` trains with
            (### Instruction, ### Context, ### Answer), instead of --prompt.
        context: a passage the --instruction refers to (the prompt's ### Context section).
    """
    from kiln.errors import InvalidRequestError, KilnError

    if instruction is not None:
        from kiln.train.data import dolly_prompt

        if prompt is not None:
            raise InvalidRequestError("give --prompt or --instruction, not both")
        prompt = dolly_prompt(instruction, context or "")
    elif context is not None:
        raise InvalidRequestError("--context goes with --instruction")

    # NOTE: built before the model loads, so a bad sampling flag fails at once.
    params = sampling.to_params(temperature=0.0)
    llm = model.load()
    if prompt is not None:
        _stream(llm, prompt, params)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("prompt> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        if line.strip() == "exit":
            return 0
        if not line.strip():
            continue
        try:
            _stream(llm, line, params)
        except KilnError as e:  # e.g. a prompt too long: report it and take the next one
            print(f"error: {e}", file=sys.stderr)


def _stream(llm: LLM, prompt: str, params: SamplingParams) -> None:
    out = sys.stdout
    deltas = llm.stream(prompt, params)
    try:
        # NOTE: the request is checked (context length...) on the first step: nothing is
        # printed for a prompt that is refused.
        first = next(deltas, None)
        out.write(prompt + (first.text if first else ""))
        out.flush()
        for delta in deltas:
            out.write(delta.text)
            out.flush()
    except KeyboardInterrupt:
        pass  # stop this generation, keep the program alive
    finally:
        deltas.close()  # frees the request's KV blocks if it was cut short
    out.write("\n")
    out.flush()
