"""IncrementalDetokenizer: token ids in, text deltas out, for streaming."""

from __future__ import annotations

from collections.abc import Sequence

from kiln.text.tokenizer import Tokenizer

# How many prompt tokens seed the decode window: enough context for the first output token's
# leading space (SentencePiece drops it when a token is decoded alone). vLLM and TGI use 5 too.
_INITIAL_PREFIX_TOKENS = 5

# A character is at most 4 UTF-8 bytes, so at most this many trailing tokens can hold the
# unfinished part of one. A decode that still ends in U+FFFD with more new tokens than that
# behind the last clean point holds invalid bytes, not a partial character: emit them rather
# than hold the stream (and grow the window) until the end of generation.
_MAX_INCOMPLETE_TOKENS = 4

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas.

    Decoding token by token is wrong (SentencePiece drops a lone token's leading space; one
    character can span several byte tokens) and re-decoding the whole output each step is
    O(n) per token. Instead keep two offsets into the ids (the technique of TGI and vLLM):
    ``prefix`` .. ``read`` is a short window already emitted, ``read`` .. end is new. Decode
    the window with and without the new ids; the difference is the delta.

    A decode ending in U+FFFD is a character still being spelled out in byte tokens: the text
    before the tokens that spell it is emitted, they are held until a later token completes it.
    (Byte-fallback decoders turn a whole run of byte tokens into U+FFFD when its end is
    unfinished, so diffing the full decode against the window would emit garbage.)

    Concatenated deltas (plus :meth:`flush`) equal ``tokenizer.decode(output_ids)`` without a
    prompt, and the output's part of ``tokenizer.decode(prompt_ids + output_ids)`` with one,
    for any split of the ids into :meth:`add` calls.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only the window is kept: ids before `_prefix_offset` are never decoded again, so
        # they are dropped (offsets are relative to `_ids`).
        self._ids: list[int] = list(self._prompt_window(prompt_token_ids))
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []
        self._num_output_tokens = 0

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the text they complete (possibly "")."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        self._num_output_tokens += len(token_ids)
        return self._advance(force=False)

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (an unfinished byte sequence
        decodes to U+FFFD, as in ``tokenizer.decode``)."""
        return self._advance(force=True)

    def _prompt_window(self, prompt_token_ids: Sequence[int]) -> Sequence[int]:
        """The last few prompt ids, starting on a character boundary: a window that starts
        inside a character decodes to U+FFFD, and byte-fallback decoders then turn the whole
        run of byte tokens after it into U+FFFD as well."""
        start = max(len(prompt_token_ids) - _INITIAL_PREFIX_TOKENS, 0)
        for candidate in range(start, max(start - _MAX_INCOMPLETE_TOKENS, 0) - 1, -1):
            text = self._tokenizer.decode_raw(
                prompt_token_ids[candidate:], self._skip_special_tokens
            )
            if not text.startswith(_REPLACEMENT_CHAR):
                return prompt_token_ids[candidate:]
        return prompt_token_ids[start:]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode_raw(self._ids[start:end], self._skip_special_tokens)

    def _advance(self, force: bool) -> str:
        end = len(self._ids)
        if self._read_offset == end:
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, end)
        if not force and new_text.endswith(_REPLACEMENT_CHAR):
            end, new_text = self._complete_head(prefix_text, end)
        if len(new_text) <= len(prefix_text):
            # Nothing new yet (a skipped special token, or only the start of a character).
            if force:
                self._emit_through(len(self._ids))
            return ""
        delta = new_text[len(prefix_text) :]
        self._emit_through(end)
        self._pieces.append(delta)
        return delta

    def _complete_head(self, prefix_text: str, end: int) -> tuple[int, str]:
        """The longest decode of the window, held-back tokens excluded, that does not end in an
        unfinished character: ``(end offset, text)``."""
        num_new = end - self._read_offset
        for num_held in range(1, min(num_new, _MAX_INCOMPLETE_TOKENS) + 1):
            head = self._decode(self._prefix_offset, end - num_held)
            if not head.endswith(_REPLACEMENT_CHAR):
                return end - num_held, head
        if num_new > _MAX_INCOMPLETE_TOKENS:
            # No clean point in reach: invalid bytes, which no later token can repair.
            return end, self._decode(self._prefix_offset, end)
        return self._read_offset, prefix_text  # hold everything new

    def _emit_through(self, end: int) -> None:
        """Ids up to `end` are emitted: the new ones become the next window's prefix."""
        emitted_before = self._read_offset
        del self._ids[:emitted_before]
        self._prefix_offset = 0
        self._read_offset = end - emitted_before
