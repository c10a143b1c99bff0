"""ModelRunner: turns a batch of (sequence, tokens to compute) into one forward pass and samples."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from kiln.engine.sequence import Sequence
from kiln.models.base import CausalLM
from kiln.models.layers.attention import AttentionMetadata
from kiln.sampling import Sampler, SamplerOutput, SamplingRow


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
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(sorted(eos_token_ids))  # min_new_tokens blocks these

    @torch.inference_mode()
    def execute(
        self, batch: Seq[tuple[Sequence, int]]
    ) -> tuple[list[Sequence], SamplerOutput | None]:
        """Compute ``num_new`` tokens of each sequence (a prefill chunk or one decode token).

        Returns the sequences that reached their last token (and so get a sampled token) and
        the sampler output for them, in the same order.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq, num_new in batch:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids(start, start + num_new))
            positions.extend(range(start, start + num_new))
            if start + num_new == seq.num_tokens:
                logits_rows.append(len(input_ids) - 1)
                sampled.append(seq)
        metadata = AttentionMetadata.build(
            [seq.num_computed_tokens for seq, _ in batch],
            [num_new for _, num_new in batch],
            [seq.block_table for seq, _ in batch],
            self.block_size,
            self.model.config.sliding_window,
            self.device,
        )
        hidden = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            metadata,
        )  # [T, hidden]
        for seq, num_new in batch:
            seq.num_computed_tokens += num_new
        if not sampled:
            return [], None
        rows = hidden[logits_rows] if len(logits_rows) < hidden.shape[0] else hidden
        logits = self.model.compute_logits(rows).float()  # [num_sampled, vocab]
        sampling_rows = [
            SamplingRow(
                params=seq.params,
                prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=seq.output_token_ids,
                generator=seq.generator,
            )
            for seq in sampled
        ]
        return sampled, self.sampler(logits, sampling_rows)
