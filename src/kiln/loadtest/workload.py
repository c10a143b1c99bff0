"""What a load test sends: random prompts of exact token counts, prompts from a file, the Dolly
records, or multi-turn conversations that grow turn by turn.

A workload hands out :class:`Prompt` objects and is told when each one's answer came back, so a
conversation's next turn carries the previous answer (and its prefix is cached by servers that
cache prefixes). Token counts use the model's own tokenizer (``tokenizer.json`` of a local model
directory) so ``--input-tokens 104`` means 104 tokens to the server, not 104 words.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kiln.errors import ConfigError
from kiln.text.tokenizer import Tokenizer

# The Dolly records this repository's data directory keeps beside it (../shared/data/dolly).
DEFAULT_DOLLY_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "dolly"


class WorkloadError(ConfigError):
    """A workload that cannot be built (bad file, no tokenizer where one is needed...)."""


class TokenCounter:
    """The model's tokenizer, for counting and for building prompts of exact lengths.

    Text APIs (TGI, OpenAI completions) count a prompt as the server does: with the special
    tokens the tokenizer adds (a Llama BOS). Chat prompts count the message text alone, since
    the server's chat template adds tokens we cannot see; the server's usage gives the total.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.num_special = len(tokenizer.encode("", add_special_tokens=True))
        special = set(tokenizer.all_special_ids)
        vocab = tokenizer.backend.get_vocab()
        # Whole-word pieces (a leading space marker, then letters) re-tokenize as themselves far
        # more often than arbitrary pieces, so random prompts reach an exact length quickly.
        words = [
            i
            for piece, i in vocab.items()
            if i not in special and piece[:1] in ("▁", "Ġ") and piece[1:].isalpha()
        ]
        self.word_ids = sorted(words) if len(words) >= 20 else sorted(set(vocab.values()) - special)

    @classmethod
    def from_path(cls, path: str | Path) -> TokenCounter:
        """Load ``tokenizer.json`` (and ``tokenizer_config.json`` beside it) from a model
        directory or the file itself."""
        import tokenizers

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise WorkloadError(f"no tokenizer.json at {path}")
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls(Tokenizer(tokenizers.Tokenizer.from_file(str(file)), config))

    def count(self, text: str, special: bool = True) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=special))

    def random_text(self, num_tokens: int, rng: random.Random, special: bool = True) -> str:
        """Text of random words that encodes to exactly ``num_tokens`` tokens (counting the
        special tokens the tokenizer adds when ``special``)."""
        target = num_tokens - (self.num_special if special else 0)
        if target < 1:
            raise WorkloadError(f"--input-tokens must leave room for text: got {num_tokens}")
        ids = rng.choices(self.word_ids, k=target)
        for _ in range(50):
            text = self.tokenizer.decode(ids)
            got = self.tokenizer.encode(text, add_special_tokens=False)
            if len(got) == target:
                return text
            # Merges across word boundaries change the count: cut or top up, then re-check.
            ids = got[:target] if len(got) > target else got + rng.choices(self.word_ids, k=1)
        raise WorkloadError(f"could not build a prompt of exactly {num_tokens} tokens")


@dataclass
class Prompt:
    """One request's content.

    Args:
        messages: the conversation so far, OpenAI-style ``{"role", "content"}`` dicts ending
            with the user's turn.
        max_new_tokens: tokens to ask for.
        input_tokens: our count of the prompt (text APIs: as the server counts it; chat: the
            messages' text only); None without a tokenizer.
        conversation: which conversation it belongs to (multi-turn), else None.
        turn: its turn in that conversation, from 0.
    """

    messages: list[dict[str, str]]
    max_new_tokens: int
    input_tokens: int | None = None
    conversation: int | None = None
    turn: int = 0

    def as_text(self) -> str:
        """The prompt for text APIs: a lone message as is; a conversation as a transcript
        ending where the assistant speaks next (its shared prefix still grows turn by turn)."""
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in self.messages]
        return "\n".join([*lines, "Assistant:"])


class Workload(Protocol):
    def next_prompt(self) -> Prompt: ...

    def finished(self, prompt: Prompt, reply: str | None) -> None: ...

    def describe(self) -> str: ...


class RandomWorkload:
    """Random-word prompts of ``input_tokens`` tokens each (normally distributed with
    ``stddev``, at least 2), so every prompt is new and no prefix cache helps."""

    def __init__(
        self,
        counter: TokenCounter,
        input_tokens: int,
        stddev: float,
        max_new_tokens: int,
        chat: bool,
        seed: int = 0,
    ) -> None:
        self.counter, self.input_tokens, self.stddev = counter, input_tokens, stddev
        self.max_new_tokens, self.chat = max_new_tokens, chat
        self.rng = random.Random(seed)

    def next_prompt(self) -> Prompt:
        n = self.input_tokens
        if self.stddev > 0:
            n = max(2, round(self.rng.gauss(self.input_tokens, self.stddev)))
        text = self.counter.random_text(n, self.rng, special=not self.chat)
        return Prompt([{"role": "user", "content": text}], self.max_new_tokens, n)

    def finished(self, prompt: Prompt, reply: str | None) -> None:
        """Single-turn: nothing to remember."""

    def describe(self) -> str:
        spread = f" (stddev {self.stddev:g})" if self.stddev else ""
        return f"random prompts of {self.input_tokens} tokens{spread}"


@dataclass
class TextItem:
    """A prompt from a file or dataset, with the output length it asks for (None: the
    run's --max-new-tokens)."""

    text: str
    max_new_tokens: int | None = None


class ListWorkload:
    """Prompts from a list (a file or the Dolly records), in order, cycling."""

    def __init__(
        self,
        items: Sequence[TextItem],
        max_new_tokens: int,
        counter: TokenCounter | None,
        chat: bool,
        name: str,
    ) -> None:
        if not items:
            raise WorkloadError(f"{name}: no prompts")
        self.items, self.max_new_tokens, self.counter = list(items), max_new_tokens, counter
        self.chat, self.name = chat, name
        self._next = 0

    def next_prompt(self) -> Prompt:
        item = self.items[self._next % len(self.items)]
        self._next += 1
        counted = self.counter.count(item.text, special=not self.chat) if self.counter else None
        return Prompt(
            [{"role": "user", "content": item.text}],
            item.max_new_tokens or self.max_new_tokens,
            counted,
        )

    def finished(self, prompt: Prompt, reply: str | None) -> None:
        """Single-turn: nothing to remember."""

    def describe(self) -> str:
        return f"{len(self.items)} prompts from {self.name}"


@dataclass
class _Conversation:
    id: int
    messages: list[dict[str, str]] = field(default_factory=list)
    turns_done: int = 0
    busy: bool = False


class MultiTurnWorkload:
    """Conversations of ``turns`` user turns; each turn resends the whole history plus the
    last answer and a new question, so the shared prefix grows and prefix caching shows in
    the later turns' TTFT. Any idle conversation takes the next turn; when none is idle (every
    one is waiting for its answer) a new one starts, so any load shape keeps it busy."""

    def __init__(
        self,
        questions: Sequence[str],
        turns: int,
        max_new_tokens: int,
        counter: TokenCounter | None,
        chat: bool,
        system: str | None = None,
    ) -> None:
        if not questions:
            raise WorkloadError("multi-turn chat: no questions")
        if turns < 1:
            raise WorkloadError(f"--turns must be at least 1: got {turns}")
        self.questions, self.turns, self.max_new_tokens = list(questions), turns, max_new_tokens
        self.counter, self.chat, self.system = counter, chat, system
        self._conversations: list[_Conversation] = []
        self._next_question = 0
        self._next_id = 0

    def next_prompt(self) -> Prompt:
        conversation = next((c for c in self._conversations if not c.busy), None)
        if conversation is None:
            conversation = _Conversation(self._next_id)
            self._next_id += 1
            if self.system:
                conversation.messages.append({"role": "system", "content": self.system})
            self._conversations.append(conversation)
        question = self.questions[self._next_question % len(self.questions)]
        self._next_question += 1
        conversation.messages.append({"role": "user", "content": question})
        conversation.busy = True
        prompt = Prompt(
            list(conversation.messages),
            self.max_new_tokens,
            None,
            conversation.id,
            conversation.turns_done,
        )
        if self.counter:
            text = "\n".join(m["content"] for m in prompt.messages) if self.chat else None
            prompt.input_tokens = (
                self.counter.count(text, special=False)
                if text is not None
                else self.counter.count(prompt.as_text())
            )
        return prompt

    def finished(self, prompt: Prompt, reply: str | None) -> None:
        conversation = next(c for c in self._conversations if c.id == prompt.conversation)
        conversation.busy = False
        conversation.turns_done += 1
        if reply is None or conversation.turns_done >= self.turns:
            # A failed turn leaves a history the server never answered: start afresh.
            self._conversations.remove(conversation)
        else:
            conversation.messages.append({"role": "assistant", "content": reply})

    def describe(self) -> str:
        return f"multi-turn chat, {self.turns} turns per conversation"


def read_prompt_file(path: Path) -> list[TextItem]:
    """A ``.jsonl`` file (each line a string, or an object with ``prompt``, ``text``,
    ``instruction`` [+ ``context``] or ``messages``; an optional ``max_new_tokens`` /
    ``max_tokens``) or a text file (one prompt per non-empty line)."""
    if not path.is_file():
        raise WorkloadError(f"no prompts file {path}")
    if path.suffix != ".jsonl":
        return [TextItem(line) for line in path.read_text().splitlines() if line.strip()]
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(_item(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WorkloadError(f"{path}:{number}: not a prompt record ({e})") from e
    return items


def _item(record: Any) -> TextItem:
    if isinstance(record, str):
        return TextItem(record)
    limit = record.get("max_new_tokens", record.get("max_tokens"))
    if "messages" in record:
        return TextItem("\n".join(m["content"] for m in record["messages"]), limit)
    if "instruction" in record:
        return TextItem(_dolly_text(record), limit)
    return TextItem(record.get("prompt", record.get("text")) or _missing(), limit)


def _missing() -> str:
    raise KeyError("prompt")


def _dolly_text(record: dict[str, Any]) -> str:
    context = (record.get("context") or "").strip()
    instruction = record["instruction"].strip()
    return f"{instruction}\n\n{context}" if context else instruction


def dolly_records(directory: Path = DEFAULT_DOLLY_DIR) -> Iterator[dict[str, Any]]:
    files = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    if not files:
        raise WorkloadError(f"no Dolly records (*.jsonl) in {directory}")
    for file in files:
        for line in file.read_text().splitlines():
            if line.strip():
                yield json.loads(line)


def dolly_items(
    counter: TokenCounter | None, max_new_tokens: int, directory: Path = DEFAULT_DOLLY_DIR
) -> list[TextItem]:
    """Dolly's instructions (with their context) as prompts; each asks for as many tokens as
    its reference response has (capped at ``max_new_tokens``), a realistic mix of lengths."""
    items = []
    for record in dolly_records(directory):
        limit = max_new_tokens
        if counter is not None:
            limit = max(1, min(max_new_tokens, counter.count(record["response"], special=False)))
        items.append(TextItem(_dolly_text(record), limit))
    return items


def dolly_questions(directory: Path = DEFAULT_DOLLY_DIR) -> list[str]:
    """Dolly's context-free instructions: short questions for multi-turn chat."""
    return [r["instruction"].strip() for r in dolly_records(directory) if not r.get("context")]
