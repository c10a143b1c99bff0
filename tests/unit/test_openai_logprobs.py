"""Token text and bytes for OpenAI logprobs: exact bytes on byte-level BPE (SmolLM2) and on
SentencePiece with byte fallback (stories260K), so a character split over tokens rejoins."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.server.openai.logprobs import TokenRenderer
from kiln.text.tokenizer import Tokenizer
from kiln.weights.resolve import resolve_checkpoint

TEXT = " Hello café 🎉 naïve\n\tdone <|im_end|>"


@pytest.fixture(params=["smollm2", "stories"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    path: Path = request.getfixturevalue(
        "smollm2_gguf" if request.param == "smollm2" else "stories_dir"
    )
    checkpoint = resolve_checkpoint(str(path))
    return Tokenizer(checkpoint.tokenizer, checkpoint.tokenizer_config)


def test_bytes_rejoin_into_the_text(tokenizer: Tokenizer) -> None:
    renderer = TokenRenderer(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    rendered = [renderer.render(i) for i in ids]
    assert b"".join(raw for _, raw in rendered) == TEXT.encode()
    # A token holding part of a character shows U+FFFD, as OpenAI's API does.
    assert any("\ufffd" in text for text, _ in rendered)


def test_leading_spaces_are_kept(tokenizer: Tokenizer) -> None:
    renderer = TokenRenderer(tokenizer)
    (first, *_) = tokenizer.encode(" Hello", add_special_tokens=False)
    assert renderer.render(first)[0].startswith(" ")
