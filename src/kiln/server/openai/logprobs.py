"""Log-probabilities in OpenAI's two shapes, and the text and bytes of a single token.

A token's ``bytes`` are exact (a byte-level BPE piece maps back to its bytes, a byte-fallback
piece ``<0x0A>`` is its byte), so a client can join the bytes of consecutive tokens into
characters that span several of them; the token's ``token`` string is those bytes decoded
(U+FFFD for an incomplete character), which is what OpenAI and vLLM show.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from kiln.server.openai.schemas import CompletionLogprobs, TokenLogprob, TopLogprob
from kiln.text.byte_level import byte_decoder
from kiln.text.tokenizer import Tokenizer

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"  # "▁"


class TokenRenderer:
    """Token id -> (text, bytes) for one tokenizer, cached per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = tokenizer.backend.decoder
        # NOTE: a decoder serialises to its JSON config; its types say how pieces map to bytes.
        config = decoder.__getstate__().decode() if decoder is not None else ""
        self._byte_level = '"ByteLevel"' in config
        self._sentencepiece = "Metaspace" in config or _SENTENCEPIECE_SPACE in config
        self._cache: dict[int, tuple[str, bytes]] = {}

    def render(self, token_id: int) -> tuple[str, bytes]:
        cached = self._cache.get(token_id)
        if cached is None:
            raw = self._bytes(token_id)
            cached = (raw.decode("utf-8", errors="replace"), raw)
            self._cache[token_id] = cached
        return cached

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        match = _BYTE_FALLBACK.fullmatch(piece)
        if match is not None:
            return bytes([int(match.group(1), 16)])
        if self._byte_level:
            table = byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        elif self._sentencepiece:
            return piece.replace(_SENTENCEPIECE_SPACE, " ").encode()
        # Added tokens written as plain text, and tokenizers of other kinds.
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()


@functools.lru_cache(maxsize=8)
def token_renderer(tokenizer: Tokenizer) -> TokenRenderer:
    return TokenRenderer(tokenizer)


def chat_logprobs(
    renderer: TokenRenderer,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    top_logprobs: Sequence[Sequence[tuple[int, float]]],
) -> list[TokenLogprob]:
    """``choices[].logprobs.content``: one entry per generated token."""
    content = []
    for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs, strict=False)):
        text, raw = renderer.render(token_id)
        tops = []
        for top_id, top_logprob in top_logprobs[i] if i < len(top_logprobs) else ():
            top_text, top_raw = renderer.render(top_id)
            tops.append(TopLogprob(token=top_text, logprob=top_logprob, bytes=list(top_raw)))
        content.append(
            TokenLogprob(token=text, logprob=logprob, bytes=list(raw), top_logprobs=tops)
        )
    return content


def extend_completion_logprobs(
    target: CompletionLogprobs,
    renderer: TokenRenderer,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    top_logprobs: Sequence[Sequence[tuple[int, float]]],
    text_offset: int,
) -> int:
    """Append tokens to a legacy ``logprobs`` object; returns the text offset after them.

    As in vLLM, each ``top_logprobs`` entry maps the alternatives' text to their logprobs and
    always includes the chosen token.
    """
    for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs, strict=False)):
        text, _ = renderer.render(token_id)
        tops = {
            renderer.render(t)[0]: lp
            for t, lp in (top_logprobs[i] if i < len(top_logprobs) else ())
        }
        tops.setdefault(text, logprob)
        target.tokens.append(text)
        target.token_logprobs.append(logprob)
        target.top_logprobs.append(tops)
        target.text_offset.append(text_offset)
        text_offset += len(text)
    return text_offset
