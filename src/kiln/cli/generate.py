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
) -> int:
    """Complete a prompt and stream the text to stdout.

    Without --prompt, reads prompts from the terminal one line at a time until `exit` or Ctrl-D
    (like the GPT-J tutorial's prompt loop). Greedy unless --temperature is set.

    Args:
        prompt: the text to complete.
    """
    llm = model.load()
    params = sampling.to_params(temperature=0.0)
    if prompt is not None:
        _stream(llm, prompt, params)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("prompt> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() == "exit":
            return 0
        if line.strip():
            _stream(llm, line, params)


def _stream(llm: LLM, prompt: str, params: SamplingParams) -> None:
    out = sys.stdout
    out.write(prompt)
    out.flush()
    try:
        for delta in llm.stream(prompt, params):
            out.write(delta.text)
            out.flush()
    except KeyboardInterrupt:
        pass  # stop this generation, keep the program alive
    out.write("\n")
    out.flush()
