"""SamplingParams: how one request wants its next tokens chosen, validated once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kiln.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20
"""The most alternatives a request may ask for per token (OpenAI's limit)."""

GREEDY_TEMPERATURE_EPS = 1e-5
"""Temperatures below this are treated as greedy (see :attr:`SamplingParams.greedy`)."""

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a u64, as TGI's `seed` does


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters (TGI / OpenAI semantics).

    Validated in ``__post_init__``: a bad value raises :class:`InvalidRequestError` naming the
    field and the range it must be in. Lists given for ``stop`` / ``stop_token_ids`` are
    normalised to tuples (a lone string for ``stop`` becomes a 1-tuple), integral floats fields
    given as ints become floats, so equal params compare and hash equal.
    """

    max_new_tokens: int = 256
    """Stop after this many generated tokens (>= 1)."""
    min_new_tokens: int = 0
    """EOS and ``stop_token_ids`` are blocked until this many tokens were generated."""
    temperature: float = 1.0
    """Softmax temperature (>= 0); 0 means greedy (argmax), skipping every warper below."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    typical_p: float = 1.0
    """Typical decoding mass (transformers' ``typical_p``); 1.0 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below ``min_p * p(most likely token)``; 0 disables."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty over prompt and output tokens (transformers semantics); 1.0 disables."""
    frequency_penalty: float = 0.0
    """OpenAI: subtract ``frequency_penalty * count`` for each token already generated."""
    presence_penalty: float = 0.0
    """OpenAI: subtract ``presence_penalty`` once for each token already generated."""
    seed: int | None = None
    """Seed for this request's own RNG; None uses the global RNG (not reproducible)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation (matched on detokenized text, not by the sampler)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, in addition to the model's EOS."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks); EOS is then not blocked by ``min_new_tokens``."""
    logprobs: bool = False
    """Return the chosen token's log-probability (under the unprocessed logits)."""
    top_logprobs: int = 0
    """Also return this many most likely alternatives per token (0..20)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    include_stop_str_in_output: bool = False
    """Keep the stop string (and the rest of the token that completes it) in the text, as TGI
    does; by default the text ends before it, as OpenAI's does."""

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("min_new_tokens", self.min_new_tokens, minimum=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                f"min_new_tokens must be <= max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )
        self._set_float("temperature", "a finite number >= 0", lambda v: 0.0 <= v < math.inf)
        _check_int("top_k", self.top_k, minimum=0, hint="0 disables")
        self._set_float("top_p", "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        self._set_float("typical_p", "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        self._set_float("min_p", "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        self._set_float("repetition_penalty", "a finite number > 0", lambda v: 0.0 < v < math.inf)
        self._set_float("frequency_penalty", "in [-2, 2]", lambda v: -2.0 <= v <= 2.0)
        self._set_float("presence_penalty", "in [-2, 2]", lambda v: -2.0 <= v <= 2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=_MAX_SEED)
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_token_ids(self.stop_token_ids))
        for name in ("ignore_eos", "logprobs", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        _check_int("top_logprobs", self.top_logprobs, minimum=0, maximum=MAX_TOP_LOGPROBS)

        # NOTE: computed once here because the sampler reads it for every row on every decode
        # step; an attribute (not a dataclass field) keeps it out of eq/repr/asdict.
        plain_greedy = (
            self.greedy
            and self.repetition_penalty == 1.0
            and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0
            and self.min_new_tokens == 0
            and not self.logprobs
            and self.top_logprobs == 0
        )
        object.__setattr__(self, "_plain_greedy", plain_greedy)

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0).

        NOTE: temperatures below ``GREEDY_TEMPERATURE_EPS`` count as 0 (as in vLLM): dividing
        logits by them would overflow float32 to inf and turn the softmax into NaN.
        """
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits and no logprobs: a bare argmax."""
        return self._plain_greedy  # type: ignore[attr-defined]

    @property
    def wants_logprobs(self) -> bool:
        """True when the sampler must compute log-probabilities for this request."""
        return self.logprobs or self.top_logprobs > 0

    @classmethod
    def greedy_params(cls, **kwargs: Any) -> SamplingParams:
        """Greedy decoding (temperature 0) with any other field overridden by ``kwargs``."""
        return cls(**{"temperature": 0.0, **kwargs})

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)

    def _set_float(self, name: str, allowed: str, ok: Any) -> None:
        value = getattr(self, name)
        # bool is an int subclass; True as a temperature is a client bug, not 1.0.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequestError(f"{name} must be a number {allowed}, got {value!r}")
        value = float(value)
        if not ok(value):  # NaN fails every comparison, so it lands here too
            raise InvalidRequestError(f"{name} must be {allowed}, got {value}")
        object.__setattr__(self, name, value)


def _check_int(
    name: str, value: Any, *, minimum: int, maximum: int | None = None, hint: str = ""
) -> None:
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if hint:
        allowed += f" ({hint})"
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer {allowed}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise InvalidRequestError(f"{name} must be {allowed}, got {value}")


def _normalise_stop(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str):  # OpenAI accepts a single string
        stop = (stop,)
    if not isinstance(stop, Iterable):
        raise InvalidRequestError(f"stop must be a list of strings, got {stop!r}")
    stop = tuple(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(f"stop must be a list of non-empty strings, got {s!r}")
    return stop


def _normalise_token_ids(token_ids: Any) -> tuple[int, ...]:
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
        raise InvalidRequestError(
            f"stop_token_ids must be a list of integers >= 0, got {token_ids!r}"
        )
    token_ids = tuple(token_ids)
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InvalidRequestError(f"stop_token_ids must be integers >= 0, got {t!r}")
    return token_ids
