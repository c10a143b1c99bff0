"""Per-request generation state, owned by the scheduler (the runner keeps its own copy of
what it needs, see :mod:`kiln.engine.runner`)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kiln.sampling import SamplingParams


class FinishReason(str, enum.Enum):
    """Why a request stopped, named as TGI names them."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORT = "abort"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation: its tokens, where its KV cache lives, and how far it got.

    ``num_computed_tokens`` counts tokens whose keys/values are in the cache; each step
    computes some of the rest (a prefill chunk or the one newest token). There is no separate
    prefill phase: a request needs compute while ``num_computed_tokens < num_tokens``.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache when the request was (last) admitted."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens ``[start, stop)`` of prompt + output, without copying the whole list."""
        return slice_tokens(self.prompt_token_ids, self.output_token_ids, start, stop)

    def append_token(self, token_id: int) -> FinishReason | None:
        """Record a sampled token; return why generation ends on it, if it does (stop strings
        are checked later, on text)."""
        self.output_token_ids.append(token_id)
        params = self.params
        num_output = len(self.output_token_ids)
        if num_output >= params.min_new_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.EOS_TOKEN
            if token_id in params.stop_token_ids:
                return FinishReason.STOP_SEQUENCE
        if num_output >= params.max_new_tokens or self.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None


def slice_tokens(prompt: list[int], output: list[int], start: int, stop: int) -> list[int]:
    """Tokens ``[start, stop)`` of ``prompt + output``, without building the concatenation."""
    num_prompt = len(prompt)
    if stop <= num_prompt:
        return prompt[start:stop]
    if start >= num_prompt:
        return output[start - num_prompt : stop - num_prompt]
    return prompt[start:] + output[: stop - num_prompt]
