"""Typed objects that cross the step boundary: schedule -> execute -> update.

:class:`SchedulerOutput` and :class:`ModelOutput` are plain data (ints, strings, lists,
frozen :class:`SamplingParams`): they pickle, so an executor may hand them to runners in other
processes. A request's prompt and params cross once, in :class:`NewRequestData`; after that a
step sends only what changed (:class:`CachedRequestData`), and the runner keeps the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.engine.request import FinishReason, Request
from kiln.sampling import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner does not hold: scheduled for the first time, or again after it was
    preempted (its KV cache was freed, so it is recomputed from ``num_computed_tokens``)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Tokens generated so far: empty unless the request was preempted."""
    params: SamplingParams
    block_ids: list[int]
    """The whole block table (prefix-cache hits first)."""
    num_computed_tokens: int
    """Tokens already in the KV cache (a prefix-cache hit); this step computes from here."""
    num_new_tokens: int


@dataclass(frozen=True)
class CachedRequestData:
    """A request the runner holds from an earlier step: only what changed since then.

    The runner appended the tokens it sampled for it itself, so no token crosses here."""

    request_id: str
    new_block_ids: list[int]
    """Blocks appended to the block table since the request was last scheduled."""
    num_computed_tokens: int
    num_new_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step computes, decided by :meth:`Scheduler.schedule`.

    The batch is ``cached_requests`` then ``new_requests``: running requests oldest first, then
    this step's admissions. Runners apply ``finished_request_ids`` and
    ``preempted_request_ids`` before the batch, so an id freed and reused between two steps
    is never confused with its new request.
    """

    cached_requests: list[CachedRequestData] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    """Finished or aborted since the previous output: the runner drops their state."""
    preempted_request_ids: list[str] = field(default_factory=list)
    """Preempted by this schedule, newest first: their KV blocks are freed; they come back as
    new requests later, and the runner keeps only what recomputing cannot give back (their
    random generator's state)."""

    @property
    def scheduled(self) -> list[CachedRequestData | NewRequestData]:
        """Every scheduled request in batch order."""
        return [*self.cached_requests, *self.new_requests]

    @property
    def num_batched_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.cached_requests) + sum(
            r.num_new_tokens for r in self.new_requests
        )

    @property
    def is_empty(self) -> bool:
        """Nothing for the executor: no token to compute and no state to change."""
        return not (
            self.cached_requests
            or self.new_requests
            or self.finished_request_ids
            or self.preempted_request_ids
        )


@dataclass(frozen=True)
class ModelOutput:
    """What one forward pass produced: a token for each request that samples, in batch order."""

    request_ids: list[str]
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class TokenOutput:
    """One new token of one request, after the scheduler appended it (engine side only)."""

    request: Request
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]
    finish_reason: FinishReason | None
    """Why generation ends on this token, judged on tokens alone (EOS, a stop token id, the
    length); the engine may still end it on a stop string found in the text."""
