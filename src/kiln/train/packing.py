"""Tokenized examples -> fixed-length training sequences, without cross-sample attention.

Packing lays samples back to back (each already ends with EOS) in sequences of
``sequence_length`` tokens; each sample keeps its own positions (restarting at 0) and its own
attention block (``seq_lens`` feeds :meth:`AttentionMetadata.packed`'s block-diagonal causal
mask), so a packed sample's logits equal those it gets alone. Without packing, each sample
gets a sequence of its own. The tail of a sequence is padding: a segment of its own whose
labels are ignored.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kiln.train.data import Example

IGNORE_INDEX = -100
"""Label of a position that contributes no loss (cross_entropy's ``ignore_index``)."""


@dataclass(frozen=True)
class PackedSequence:
    token_ids: list[int]
    labels: list[int]
    """``labels[i]`` is the token position ``i`` must predict (the next one of its sample) or
    :data:`IGNORE_INDEX`: prompt tokens, a sample's last token and padding predict nothing."""
    positions: list[int]
    seq_lens: list[int]
    """Lengths of the segments (samples, then padding), summing to the sequence length."""
    num_pad: int = 0


@dataclass(frozen=True)
class Batch:
    """Several packed sequences flattened into one token stream, as kiln's models take them."""

    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    seq_lens: list[int]
    num_pad: int = 0
    pad_segments: tuple[int, ...] = ()
    """Indices into ``seq_lens`` of the padding segments."""

    def without_padding(self) -> Batch:
        """The same batch with its padding segments left out: each is a block of its own whose
        labels are ignored, so no other token sees it and the loss does not change, but the
        model would spend a whole forward and backward on it."""
        if not self.pad_segments:
            return self
        keep = torch.ones(len(self.input_ids), dtype=torch.bool, device=self.input_ids.device)
        starts = [0, *itertools.accumulate(self.seq_lens)]
        for index in self.pad_segments:
            keep[starts[index] : starts[index + 1]] = False
        dropped = set(self.pad_segments)
        return Batch(
            input_ids=self.input_ids[keep],
            labels=self.labels[keep],
            positions=self.positions[keep],
            seq_lens=[n for i, n in enumerate(self.seq_lens) if i not in dropped],
        )

    @property
    def num_real_tokens(self) -> int:
        """Tokens that are not padding (what tokens/s counts)."""
        return len(self.input_ids) - self.num_pad

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def sample_labels(example: Example, length: int) -> list[int]:
    """Next-token labels of the first ``length`` tokens of one sample: token ``i`` predicts
    ``i + 1`` where that one is in the loss mask; the last predicts nothing (the next token
    belongs to another sample, or to padding)."""
    ids, mask = example.token_ids, example.loss_mask
    labels = [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(length - 1)]
    return [*labels, IGNORE_INDEX]


def pack(
    examples: Sequence[Example], sequence_length: int, pad_id: int, packing: bool = True
) -> list[PackedSequence]:
    """Greedy packing in the given order: a sample that does not fit in the current sequence
    starts the next one (samples are never split, so each keeps its context); a sample longer
    than ``sequence_length`` is truncated to it."""
    if sequence_length < 2:
        raise ValueError(f"sequence_length must be >= 2, got {sequence_length}")
    sequences: list[PackedSequence] = []
    current: list[Example] = []
    used = 0
    for example in examples:
        length = min(len(example), sequence_length)
        if current and (not packing or used + length > sequence_length):
            sequences.append(_build(current, sequence_length, pad_id))
            current, used = [], 0
        current.append(example)
        used += length
    if current:
        sequences.append(_build(current, sequence_length, pad_id))
    return sequences


def _build(samples: list[Example], sequence_length: int, pad_id: int) -> PackedSequence:
    token_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    seq_lens: list[int] = []
    for example in samples:
        length = min(len(example), sequence_length)
        token_ids += example.token_ids[:length]
        labels += sample_labels(example, length)
        positions += range(length)
        seq_lens.append(length)
    padding = sequence_length - len(token_ids)
    if padding:
        token_ids += [pad_id] * padding
        labels += [IGNORE_INDEX] * padding
        positions += range(padding)
        seq_lens.append(padding)
    return PackedSequence(token_ids, labels, positions, seq_lens, padding)


def collate(sequences: Sequence[PackedSequence]) -> Batch:
    """One flat batch of ``len(sequences) * sequence_length`` tokens."""
    pad_segments = []
    seen = 0
    for s in sequences:
        seen += len(s.seq_lens)
        if s.num_pad:
            pad_segments.append(seen - 1)  # a sequence's padding is its last segment
    return Batch(
        input_ids=torch.tensor([t for s in sequences for t in s.token_ids], dtype=torch.long),
        labels=torch.tensor([t for s in sequences for t in s.labels], dtype=torch.long),
        positions=torch.tensor([p for s in sequences for p in s.positions], dtype=torch.long),
        seq_lens=[n for s in sequences for n in s.seq_lens],
        num_pad=sum(s.num_pad for s in sequences),
        pad_segments=tuple(pad_segments),
    )
