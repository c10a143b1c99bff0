"""ModelRunner: turns a SchedulerOutput into one forward pass and samples the next tokens.

The runner keeps its own input state per request (tokens, block table, random generator,
penalty statistics), built from a :class:`NewRequestData` once and then updated from each
step's diffs and from the tokens it samples itself. It reads nothing of the scheduler's
objects, so it can live in another process (one runner per tensor-parallel rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.engine.io import ModelOutput, NewRequestData, SchedulerOutput
from kiln.engine.request import slice_tokens
from kiln.models.base import CausalLM
from kiln.models.layers.attention import AttentionMetadata
from kiln.sampling import PenaltyState, Sampler, SamplingParams, SamplingRow, make_generator


@dataclass(eq=False)
class RequestState:
    """What the runner knows of one request (its own copy, never the scheduler's)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Generated so far: as sent when (re)scheduled, then each token this runner sampled."""
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    penalty_slot: int
    """Its row in the runner's :class:`PenaltyState` (the neutral row if it uses none)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        return slice_tokens(self.prompt_token_ids, self.output_token_ids, start, stop)


@dataclass
class _Batch:
    """One step's flattened inputs, in batch order."""

    input_ids: list[int]  # [num_tokens]
    positions: list[int]  # [num_tokens]
    logits_rows: list[int]  # [num_sampled]: the row of each sampling request's last token
    sampled: list[RequestState]  # [num_sampled]
    metadata: AttentionMetadata


class ModelRunner:
    """Owns the model and its KV cache tensors; knows nothing about scheduling."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(sorted(eos_token_ids))  # min_new_tokens blocks these
        self.requests: dict[str, RequestState] = {}
        # NOTE: a preempted request is recomputed from its tokens, but its seeded generator
        # has advanced once per token it sampled and cannot be rebuilt from the seed: it is
        # kept here until the request comes back, so preemption changes no sampled token.
        self._preempted_generators: dict[str, torch.Generator] = {}
        self.penalties = PenaltyState(model.config.vocab_size, device)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        """Apply the step's changes to the per-request state, compute every scheduled request
        in one flattened batch, and sample for those that reach their last token."""
        self._update_states(scheduler_output)
        if not scheduler_output.num_batched_tokens:
            return ModelOutput(request_ids=[], token_ids=[])
        batch = self._prepare(scheduler_output)
        hidden = self.model(
            torch.tensor(batch.input_ids, device=self.device),
            torch.tensor(batch.positions, device=self.device),
            self.kv_caches,
            batch.metadata,
        )  # [num_tokens, hidden]
        if not batch.sampled:
            return ModelOutput(request_ids=[], token_ids=[])
        if len(batch.logits_rows) < hidden.shape[0]:
            hidden = hidden[batch.logits_rows]
        logits = self.model.compute_logits(hidden).float()  # [num_sampled, vocab]
        return self._sample(logits, batch.sampled)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        """Finished first, then preempted, so an id reused since is a different request."""
        for request_id in scheduler_output.finished_request_ids:
            self._drop(request_id)
            self._preempted_generators.pop(request_id, None)
        for request_id in scheduler_output.preempted_request_ids:
            generator = self._drop(request_id)
            if generator is not None:
                self._preempted_generators[request_id] = generator
        for data in scheduler_output.cached_requests:
            state = self.requests[data.request_id]
            state.block_ids.extend(data.new_block_ids)
            state.num_computed_tokens = data.num_computed_tokens
        for data in scheduler_output.new_requests:
            self._add(data)

    def _add(self, data: NewRequestData) -> None:
        if data.request_id in self.requests:
            raise RuntimeError(f"request {data.request_id!r} was sent as new but is running")
        generator = self._preempted_generators.pop(data.request_id, None)
        if generator is None:
            generator = make_generator(data.params.seed, self.device)
        output_token_ids = list(data.output_token_ids)
        self.requests[data.request_id] = RequestState(
            request_id=data.request_id,
            prompt_token_ids=list(data.prompt_token_ids),
            output_token_ids=output_token_ids,
            params=data.params,
            block_ids=list(data.block_ids),
            num_computed_tokens=data.num_computed_tokens,
            generator=generator,
            penalty_slot=self.penalties.add(data.params, data.prompt_token_ids, output_token_ids),
        )

    def _drop(self, request_id: str) -> torch.Generator | None:
        """Forget a request; returns its generator (None if unseeded or unknown)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self.penalties.release(state.penalty_slot)
        return state.generator

    def _prepare(self, scheduler_output: SchedulerOutput) -> _Batch:
        input_ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        sampled: list[RequestState] = []
        states: list[RequestState] = []
        num_new_tokens: list[int] = []
        for data in scheduler_output.scheduled:
            state = self.requests[data.request_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + data.num_new_tokens
            input_ids.extend(state.token_ids(start, end))
            positions.extend(range(start, end))
            if end == state.num_tokens:  # the last token: its logits give the next one
                logits_rows.append(len(input_ids) - 1)
                sampled.append(state)
            states.append(state)
            num_new_tokens.append(data.num_new_tokens)
        metadata = AttentionMetadata.build(
            [s.num_computed_tokens for s in states],
            num_new_tokens,
            [s.block_ids for s in states],
            self.block_size,
            self.model.config.sliding_window,
            self.device,
        )
        return _Batch(input_ids, positions, logits_rows, sampled, metadata)

    def _sample(self, logits: torch.Tensor, sampled: list[RequestState]) -> ModelOutput:
        """One token per request (``logits`` is ``[len(sampled), vocab]``); each is appended to
        the runner's own copy of the request, and its penalty statistics."""
        rows = [
            SamplingRow(
                params=s.params,
                prompt_token_ids=s.prompt_token_ids,
                output_token_ids=s.output_token_ids,
                generator=s.generator,
                penalty_slot=s.penalty_slot,
            )
            for s in sampled
        ]
        out = self.sampler(logits, rows, self.penalties)
        for state, token_id in zip(sampled, out.token_ids, strict=True):
            state.output_token_ids.append(token_id)
        self.penalties.append([s.penalty_slot for s in sampled], out.token_ids)
        return ModelOutput(
            request_ids=[s.request_id for s in sampled],
            token_ids=out.token_ids,
            logprobs=out.logprobs,
            top_logprobs=out.top_logprobs,
        )
