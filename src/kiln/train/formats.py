"""The record formats ``kiln finetune --format`` reads, each tokenized with its loss mask.

- ``dolly``: databricks-dolly-15k (``instruction``, optional ``context``, ``response``) in the
  Dolly prompt (``### Instruction`` / ``### Context`` / ``### Answer``).
- ``alpaca``: Stanford Alpaca (``instruction``, optional ``input``, ``output``) in Alpaca's
  own prompt (``Below is an instruction...`` / ``### Input:`` / ``### Response:``).
- ``chat``: ``{"messages": [{"role", "content"}, ...]}`` rendered with the model's chat
  template; the loss is on the assistant turns only (each with the template's end-of-turn text,
  so the model learns where a turn stops), never on system or user text.

Files are JSON Lines (``.jsonl``), or a JSON array (``.json``, as ``alpaca_data.json`` ships);
a directory means every such file in it, sorted by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, KilnError
from kiln.text import ChatTemplate, Tokenizer, validate_messages
from kiln.train.config import DATA_FORMATS
from kiln.train.data import Example, Record, read_dolly, tokenize_dolly, tokenize_prompt_response

_ALPACA_HEADER = "Below is an instruction that describes a task"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Alpaca's prompt up to where the response starts (its two variants: with an input and
    without)."""
    if input.strip():
        return (
            f"{_ALPACA_HEADER}, paired with an input that provides further context. Write a "
            "response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction.strip()}\n\n### Input:\n{input.strip()}\n\n"
            "### Response:\n"
        )
    return (
        f"{_ALPACA_HEADER}. Write a response that appropriately completes the request.\n\n"
        f"### Instruction:\n{instruction.strip()}\n\n### Response:\n"
    )


def load_examples(
    path: str | Path,
    data_format: str,
    tokenizer: Tokenizer,
    chat_template: Callable[[], ChatTemplate],
) -> list[Example]:
    """Every record of ``path`` in ``data_format``, tokenized. ``chat_template`` is called
    only for the chat format (a model without a template can still train on the others)."""
    if data_format == "dolly":
        return [tokenize_dolly(r, tokenizer) for r in read_dolly(path)]
    if data_format == "alpaca":
        return [
            tokenize_prompt_response(alpaca_prompt(r.instruction, r.context), r.response, tokenizer)
            for r in read_alpaca(path)
        ]
    if data_format == "chat":
        template = chat_template()
        examples = []
        for where, row in _rows(path):
            try:
                examples.append(tokenize_chat(row.get("messages"), tokenizer, template))
            except KilnError as e:
                raise ConfigError(f"{where}: {e}") from None
        return examples
    raise ConfigError(f"format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")


def read_alpaca(path: str | Path) -> list[Record]:
    """Alpaca records as :class:`Record` (``input`` is the context, ``output`` the response)."""
    records = []
    for where, row in _rows(path):
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise ConfigError(f"{where}: no string {', '.join(missing)}")
        records.append(Record(row["instruction"], row["output"], row.get("input") or ""))
    return records


def tokenize_chat(messages: Any, tokenizer: Tokenizer, template: ChatTemplate) -> Example:
    """A conversation as one example, masked to its assistant turns.

    The template renders the conversation up to each assistant turn twice, with the generation
    prompt (what the model is given) and with the turn (what it must produce); the difference is
    the turn's text. Segments are tokenized apart so the mask is exact at every boundary. A
    template whose renderings are not prefixes of each other (one that rewrites earlier turns)
    cannot be masked this way and is refused.
    """
    checked = validate_messages(messages)
    if not any(m["role"] == "assistant" for m in checked):
        raise ConfigError("a conversation without an assistant message has nothing to learn")
    if checked[0]["role"] == "assistant":
        raise ConfigError("a conversation must not start with an assistant message")
    special = tokenizer.special_tokens_map
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, message in enumerate(checked):
        if message["role"] != "assistant":
            continue
        prompt = template.render(checked[:i], add_generation_prompt=True, **special)
        full = template.render(checked[: i + 1], add_generation_prompt=False, **special)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ConfigError(
                f"chat template {template.name!r} renders earlier turns differently as the "
                "conversation grows: its assistant turns cannot be masked"
            )
        for text, learn in ((prompt[len(done) :], False), (full[len(prompt) :], True)):
            piece = tokenizer.encode_chat(text)
            ids += piece
            mask += [learn] * len(piece)
        done = full
    return Example(token_ids=ids, loss_mask=mask)


def _rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line`` or ``file[index]``, object) for every record of a file or directory."""
    path = Path(path)
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise ConfigError(f"{path}: no .jsonl or .json files")
    for file in files:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file}: not JSON ({e.msg})") from None
            if not isinstance(rows, list):
                raise ConfigError(f"{file}: expected a JSON array of records")
            items = [(f"{file}[{i}]", row) for i, row in enumerate(rows)]
        else:
            items = []
            for line_no, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    items.append((f"{file}:{line_no}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{file}:{line_no}: not JSON ({e.msg})") from None
        for where, row in items:
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: expected a JSON object")
            yield where, row
