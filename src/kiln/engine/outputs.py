"""What the engine hands back: per-step text deltas, and finished generations."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.engine.request import FinishReason


@dataclass
class RequestOutput:
    """An incremental update for one request: the text and tokens made since the last one."""

    request_id: str
    text: str
    """New text since the previous output (stop strings already cut off)."""
    token_ids: list[int]
    """New token ids since the previous output."""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """A finished generation, as :meth:`kiln.LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    def extend(self, delta: RequestOutput) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.top_logprobs.extend(delta.top_logprobs)
        self.finish_reason = delta.finish_reason
