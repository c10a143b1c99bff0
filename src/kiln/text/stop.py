"""StopStringMatcher: find stop strings in streamed text without leaking any of them."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Streaming stop-string detection over text deltas.

    A stop string can arrive split over several deltas, so text that could be the start of
    one is held back until the next delta shows whether it is; everything else is released at
    once, so streaming latency only suffers while a stop string might be forming.

    With several stop strings, the one that completes first in the text wins, and the text
    before it is emitted. Once a stop string is hit the matcher is finished: later feeds return
    ``("", True)``.

    With ``keep_stop`` (TGI's behaviour: a stop sequence stays in the text), nothing is held
    back nor cut: every delta is emitted whole, the one that completes a stop string included,
    and only the hit is reported.
    """

    def __init__(self, stops: Sequence[str], keep_stop: bool = False) -> None:
        if isinstance(stops, str):
            raise TypeError("stops must be a sequence of strings, not one string")
        # NOTE: an empty stop string would match before any text; OpenAI-style clients do send
        # `stop: [""]`, and the only sensible reading of it is "no stop string".
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._buffer = ""
        self._matched: str | None = None
        self._keep_stop = keep_stop
        # With keep_stop, the text already emitted that a stop string could still end in.
        self._tail_length = max((len(s) for s in self._stops), default=1) - 1

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._matched

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add a delta; return ``(text safe to emit now, whether a stop string was hit)``.

        On a hit the text is everything up to (not including) the stop string.
        """
        if self._matched is not None:
            return "", True
        if not self._stops:
            return delta, False
        # The held-back buffer contains no whole stop string, but one may begin inside it.
        buffer = self._buffer + delta
        # The stop that completes first wins: what a character-by-character stream would
        # see, so the outcome does not depend on how the text was cut into deltas. On a tie
        # the longer one, which starts earlier, so none of it leaks.
        hit_end, hit_at, hit = -1, -1, None
        for stop in self._stops:
            at = buffer.find(stop)
            if at == -1:
                continue
            end = at + len(stop)
            if hit is None or end < hit_end or (end == hit_end and at < hit_at):
                hit_end, hit_at, hit = end, at, stop
        if self._keep_stop:
            self._buffer = buffer[-self._tail_length :] if self._tail_length else ""
            if hit is not None:
                self._matched = hit
            return delta, hit is not None
        if hit is not None:
            self._matched = hit
            self._buffer = ""
            return buffer[:hit_at], True
        hold = self._partial_match_length(buffer)
        self._buffer = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """At the end of generation: the held-back tail (it never became a stop string)."""
        tail, self._buffer = self._buffer, ""
        return "" if self._matched is not None or self._keep_stop else tail

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
