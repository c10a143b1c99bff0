"""IncrementalDetokenizer: streamed deltas add up to the full decode, never broken UTF-8."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers

from kiln.text import IncrementalDetokenizer, Tokenizer

MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
MODEL_DIRS = ["stories260K", "smollm2-135m-instruct-gguf"]

TEXTS = {
    "english": "Once upon a time, there was a little girl named Lily. She liked to play.",
    "chinese": "从前有一个小女孩，她的名字叫莉莉。她喜欢在公园里玩。",
    "korean": "옛날 옛적에 릴리라는 작은 소녀가 살았습니다.",
    "emoji": "I love 🍓 and 🫐! 👩🏽‍💻 codes; 🇫🇷 flag.",
    "mixed": " leading space, then 中文 and 한국어 mixed with emoji 🙂 and   spaces.",
    "newlines": "line one\nline two\n\n  indented\n\tTabbed\n",
    "code": 'def greet(name: str) -> str:\n    return f"Hello, {name}!"  # 👋\n',
}


@pytest.fixture(params=MODEL_DIRS, scope="module")
def tokenizer(request) -> Tokenizer:
    path = MODELS / request.param
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"shared model {request.param} not available")
    config = json.loads((path / "tokenizer_config.json").read_text())
    return Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = next(chunk_sizes)
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


def _ones():
    while True:
        yield 1


def _random_sizes(seed: int):
    rng = random.Random(seed)
    while True:
        yield rng.randint(1, 7)


@pytest.mark.parametrize("name", TEXTS)
def test_one_token_at_a_time(tokenizer, name):
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detok, ids, _ones())
    assert "".join(deltas) == tokenizer.decode(ids) == detok.text
    assert deltas[-1] == ""  # nothing was left held back for flush
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", TEXTS)
def test_random_chunks(tokenizer, name, seed):
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detok, ids, _random_sizes(seed))
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_multi_byte_characters_are_held_back(tokenizer):
    # Some single tokens spell only part of an emoji or CJK character: they must emit nothing.
    ids = tokenizer.encode(TEXTS["emoji"] + TEXTS["chinese"], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids]
    assert "" in deltas
    assert "".join(deltas) == tokenizer.decode(ids)


def _clean_split_points(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Prompt/output boundaries that do not cut a character in two."""
    full = tokenizer.decode(ids)
    return [k for k in range(1, len(ids)) if full.startswith(tokenizer.decode(ids[:k]))]


@pytest.mark.parametrize("name", TEXTS)
def test_with_prompt(tokenizer, name):
    ids = tokenizer.encode(TEXTS[name])  # with BOS where the model adds one
    full = tokenizer.decode(ids)
    points = _clean_split_points(tokenizer, ids)
    assert points
    for k in points[:: max(1, len(points) // 12)]:
        detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=ids[:k])
        deltas = _stream(detok, ids[k:], _random_sizes(k))
        assert "".join(deltas) == full[len(tokenizer.decode(ids[:k])) :]


def test_sentencepiece_first_output_token_keeps_its_space():
    path = MODELS / "stories260K"
    if not path.is_dir():
        pytest.fail("shared model stories260K not available")
    config = json.loads((path / "tokenizer_config.json").read_text())
    tok = Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)
    prompt = tok.encode("Once upon a time")
    output = tok.encode("Once upon a time there was", add_special_tokens=True)[len(prompt) :]
    assert tok.decode(output).startswith("t")  # decoded alone, SentencePiece drops the space
    detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt)
    first = detok.add(output[:1])
    assert first.startswith(" ")
    detok.add(output[1:])
    assert detok.text == " there was"


def test_special_tokens_skipped_or_kept():
    path = MODELS / "smollm2-135m-instruct-gguf"
    if not path.is_dir():
        pytest.fail("shared model smollm2 not available")
    config = json.loads((path / "tokenizer_config.json").read_text())
    tok = Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)
    ids = tok.encode_chat("Hi there!<|im_end|>\n<|im_start|>user")
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        text = "".join(detok.add([i]) for i in ids) + detok.flush()
        assert text == tok.decode(ids, skip_special_tokens=skip)
        assert ("<|im_end|>" in text) is not skip


def test_unfinished_character_is_flushed_as_replacement(tokenizer):
    ids = tokenizer.encode("好", add_special_tokens=False)
    # Cut the character's bytes short: only flush() may emit the replacement character.
    partial = next(
        ids[:k] for k in range(1, len(ids) + 1) if tokenizer.decode(ids[:k]).endswith("\ufffd")
    )
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(partial) == ""
    assert detok.flush() == tokenizer.decode(partial)
    assert detok.text.endswith("\ufffd")


def test_invalid_bytes_do_not_stall_the_stream():
    path = MODELS / "stories260K"
    if not path.is_dir():
        pytest.fail("shared model stories260K not available")
    config = json.loads((path / "tokenizer_config.json").read_text())
    tok = Tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)
    continuation_byte = tok.token_to_id("<0x80>")  # never valid on its own
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([continuation_byte]) for _ in range(30)]
    assert any(deltas)
    assert "".join(deltas) + detok.flush() == tok.decode([continuation_byte] * 30)


class _CountingTokenizer:
    """Records how many ids each decode is asked for."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.window_sizes: list[int] = []

    def decode_raw(self, ids, skip_special_tokens=True):
        self.window_sizes.append(len(ids))
        return self.inner.decode_raw(ids, skip_special_tokens)


def test_work_per_token_is_constant(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS.values()) * 20, add_special_tokens=False)
    counting = _CountingTokenizer(tokenizer)
    full = tokenizer.decode(ids)
    split = next(k for k in range(50, len(ids)) if full.startswith(tokenizer.decode(ids[:k])))
    prompt, output = ids[:split], ids[split:]
    detok = IncrementalDetokenizer(counting, prompt_token_ids=prompt)  # type: ignore[arg-type]
    for i in output:
        detok.add([i])
    assert detok.text == tokenizer.decode(ids)[len(tokenizer.decode(prompt)) :]
    assert max(counting.window_sizes) <= 16
    assert sum(counting.window_sizes) <= 16 * len(ids)
