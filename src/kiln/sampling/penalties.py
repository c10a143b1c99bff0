"""PenaltyState: each request's token statistics for the penalties, kept up to date token by
token, so that penalising a step costs O(new tokens) rather than O(context)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kiln.sampling.params import SamplingParams

NEUTRAL_SLOT = 0
"""A slot that stays all zeros: the rows of requests (or penalties) that count nothing."""


def uses_penalties(params: SamplingParams) -> bool:
    """True when the request's logits depend on the tokens it has seen."""
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


class PenaltyState:
    """Rows ("slots") of two persistent ``[num_slots, V]`` tensors, one row per request that
    uses a penalty:

    - ``seen`` (bool): the token occurs in the prompt or the output (repetition penalty);
    - ``counts`` (float32): how often it occurs in the output (frequency/presence penalties).

    A request's row is filled once from its tokens (:meth:`add`), then each sampled token
    updates it (:meth:`append`, one batched op for the whole step). The values are exactly
    those :func:`processors.token_mask` / :func:`processors.token_counts` build from the
    whole token lists (counts are small integers, exact in float32), so the penalised logits
    are bit-identical. Slots grow by doubling and are reused once released.
    """

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(1, vocab_size, dtype=torch.float32, device=self.device)
        self._free: list[int] = []  # released slots, reused before growing

    @property
    def num_slots(self) -> int:
        return self.seen.shape[0]

    @property
    def num_used_slots(self) -> int:
        """Slots held by requests (the neutral slot excluded)."""
        return self.num_slots - 1 - len(self._free)

    def add(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
    ) -> int:
        """A slot holding the request's statistics so far, or :data:`NEUTRAL_SLOT` when its
        params use no penalty (then nothing is stored)."""
        if not uses_penalties(params):
            return NEUTRAL_SLOT
        slot = self._take_slot()
        try:
            self._fill(slot, [*prompt_token_ids, *output_token_ids], list(output_token_ids))
        except BaseException:  # a token id outside the vocabulary: the slot stays free
            self.release(slot)
            raise
        return slot

    def release(self, slot: int) -> None:
        """Give back a slot from :meth:`add` (zeroed now, so it can be handed out again)."""
        if slot == NEUTRAL_SLOT:
            return
        self.seen[slot].zero_()
        self.counts[slot].zero_()
        self._free.append(slot)

    def append(self, slots: Sequence[int], token_ids: Sequence[int]) -> None:
        """Record one new output token per slot; neutral slots are skipped."""
        pairs = [(s, t) for s, t in zip(slots, token_ids, strict=True) if s != NEUTRAL_SLOT]
        if not pairs:
            return
        index = torch.tensor(pairs, dtype=torch.long, device=self.device)  # [N, 2]
        rows, cols = index[:, 0], index[:, 1]
        self.seen[rows, cols] = True
        self.counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.float32), True)

    def seen_rows(self, slots: Sequence[int]) -> torch.Tensor:
        """``[len(slots), V]`` bool: the ``seen`` rows of ``slots``, in that order."""
        return self.seen.index_select(0, self._index(slots))

    def count_rows(self, slots: Sequence[int]) -> torch.Tensor:
        """``[len(slots), V]`` float32: the ``counts`` rows of ``slots``, in that order."""
        return self.counts.index_select(0, self._index(slots))

    def _fill(self, slot: int, seen_ids: list[int], output_ids: list[int]) -> None:
        seen = torch.tensor(seen_ids, dtype=torch.long, device=self.device)
        self.seen[slot].index_fill_(0, seen, True)
        output = torch.tensor(output_ids, dtype=torch.long, device=self.device)
        ones = torch.ones_like(output, dtype=torch.float32)
        self.counts[slot].index_put_((output,), ones, accumulate=True)

    def _index(self, slots: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(slots), dtype=torch.long, device=self.device)

    def _take_slot(self) -> int:
        if not self._free:
            self._grow()
        return self._free.pop()

    def _grow(self) -> None:
        """Double the slots; the new ones (all zeros) join the free list, lowest on top."""
        old = self.num_slots
        self.seen = torch.cat([self.seen, torch.zeros_like(self.seen)])
        self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        self._free.extend(range(2 * old - 1, old - 1, -1))
