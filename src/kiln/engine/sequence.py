"""Per-request generation state, shared by the runner and the loop that drives it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from kiln.sampling import SamplingParams


class FinishReason(str, enum.Enum):
    """Why a sequence stopped, named as TGI names them."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORT = "abort"


@dataclass
class Sequence:
    """One request being generated: its tokens, where its KV cache lives, how far it got."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_total_tokens: int
    """Context limit: generation stops at this many prompt + output tokens."""
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose keys/values are already in the cache."""
    finish_reason: FinishReason | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens ``[start, stop)`` of prompt + output, without copying the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : stop - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - num_prompt]

    def append_token(self, token_id: int) -> None:
        """Record a sampled token and decide whether generation ends on it (stop strings are
        checked later, on text)."""
        self.output_token_ids.append(token_id)
        params = self.params
        num_output = len(self.output_token_ids)
        if num_output < params.min_new_tokens:
            return
        if not params.ignore_eos and token_id in self.eos_token_ids:
            self.finish_reason = FinishReason.EOS_TOKEN
        elif token_id in params.stop_token_ids:
            self.finish_reason = FinishReason.STOP_SEQUENCE
        elif num_output >= params.max_new_tokens or self.num_tokens >= self.max_total_tokens:
            self.finish_reason = FinishReason.LENGTH
