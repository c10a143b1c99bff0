"""ModelRunner: turns a SchedulerOutput into one forward pass and samples the next tokens."""

from __future__ import annotations

import torch

from kiln.engine.io import ModelOutput, SchedulerOutput
from kiln.models.base import CausalLM
from kiln.models.layers.attention import AttentionMetadata
from kiln.sampling import Sampler, SamplingRow


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

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        """Compute every scheduled chunk in one flattened batch; sample for the chunks that
        reach their request's last token. Does not change the requests."""
        chunks = scheduler_output.chunks
        input_ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        for chunk in chunks:
            end = chunk.start + chunk.num_new_tokens
            input_ids.extend(chunk.request.token_ids(chunk.start, end))
            positions.extend(range(chunk.start, end))
            if chunk.samples:
                logits_rows.append(len(input_ids) - 1)
        metadata = AttentionMetadata.build(
            [c.start for c in chunks],
            [c.num_new_tokens for c in chunks],
            [c.request.block_ids for c in chunks],
            self.block_size,
            self.model.config.sliding_window,
            self.device,
        )
        hidden = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            metadata,
        )  # [num_tokens, hidden]
        sampled = [c.request for c in chunks if c.samples]
        if not sampled:
            return ModelOutput(request_ids=[], token_ids=[])
        if len(logits_rows) < hidden.shape[0]:
            hidden = hidden[logits_rows]
        logits = self.model.compute_logits(hidden).float()  # [num_sampled, vocab]
        rows = [
            SamplingRow(
                params=r.params,
                prompt_token_ids=r.prompt_token_ids,
                output_token_ids=r.output_token_ids,
                generator=r.generator,
            )
            for r in sampled
        ]
        out = self.sampler(logits, rows)
        return ModelOutput(
            request_ids=[r.request_id for r in sampled],
            token_ids=out.token_ids,
            logprobs=out.logprobs,
            top_logprobs=out.top_logprobs,
        )
