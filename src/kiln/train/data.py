"""Instruction records -> token ids with a loss mask, and the seeded train/eval split."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ConfigError
from kiln.text import Tokenizer

DOLLY_KEYS = ("instruction", "context", "response")


@dataclass(frozen=True)
class Record:
    """One instruction-following example (databricks-dolly-15k's fields)."""

    instruction: str
    response: str
    context: str = ""


@dataclass(frozen=True)
class Example:
    """A tokenized record: ``token_ids`` is prompt + response + EOS; ``loss_mask[i]`` says
    whether token ``i`` is one the model learns to produce (the response and its EOS)."""

    token_ids: list[int]
    loss_mask: list[bool]

    def __len__(self) -> int:
        return len(self.token_ids)


def dolly_prompt(instruction: str, context: str = "") -> str:
    """The Dolly prompt up to where the answer starts: ``### Instruction``, the optional
    ``### Context`` (left out when empty) and the ``### Answer`` header, sections separated by
    a blank line. Inference uses the same text, so a tuned model sees what it was trained on."""
    sections = [f"### Instruction\n{instruction.strip()}"]
    if context.strip():
        sections.append(f"### Context\n{context.strip()}")
    sections.append("### Answer\n")
    return "\n\n".join(sections)


def read_dolly(path: str | Path) -> list[Record]:
    """Records from a Dolly JSONL file, or from every ``*.jsonl`` file of a directory (sorted
    by name). A line without the Dolly keys is an error naming the file and line."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"{path}: no .jsonl files")
    records: list[Record] = []
    for file in files:
        with file.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{file}:{line_no}: not JSON ({e.msg})") from None
                missing = [
                    k for k in ("instruction", "response") if not isinstance(row.get(k), str)
                ]
                if missing:
                    raise ConfigError(f"{file}:{line_no}: no string {', '.join(missing)}")
                context = row.get("context") or ""
                records.append(Record(row["instruction"], row["response"], context))
    return records


def tokenize_dolly(record: Record, tokenizer: Tokenizer) -> Example:
    return tokenize_prompt_response(
        dolly_prompt(record.instruction, record.context), record.response, tokenizer
    )


def tokenize_prompt_response(prompt: str, response: str, tokenizer: Tokenizer) -> Example:
    """Prompt and response tokenized apart (so the boundary, and the mask, are exact), the
    response followed by EOS so the model learns where an answer stops."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token: packing needs one between samples")
    prompt_ids = tokenizer.encode(prompt)
    response_ids = [*tokenizer.encode(response.strip(), add_special_tokens=False), eos]
    return Example(
        token_ids=prompt_ids + response_ids,
        loss_mask=[False] * len(prompt_ids) + [True] * len(response_ids),
    )


def split(
    examples: list[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded shuffle, then the first ``eval_fraction`` (at least one example
    when the fraction is above zero) held out. The same seed always holds out the same ones."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_eval = max(1, round(len(examples) * eval_fraction)) if eval_fraction > 0 else 0
    if num_eval >= len(examples):
        raise ConfigError(f"{len(examples)} examples leave nothing to train on after the split")
    eval_set = [examples[i] for i in order[:num_eval]]
    train_set = [examples[i] for i in order[num_eval:]]
    return train_set, eval_set
