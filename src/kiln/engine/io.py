"""Typed objects that cross the step boundary: schedule -> execute -> update."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.engine.request import FinishReason, Request


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens ``[start, start + num_new_tokens)`` of ``request`` this step."""

    request: Request
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's last token, so its logits give a new token."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step computes, decided by :meth:`Scheduler.schedule`."""

    chunks: list[ScheduledChunk]
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class ModelOutput:
    """What one forward pass produced: a token for each chunk that samples, in chunk order."""

    request_ids: list[str]
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class TokenOutput:
    """One new token of one request, after the scheduler applied it."""

    request: Request
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]
    finish_reason: FinishReason | None
