"""AttentionMetadata for a decode step: the slots each sequence reads and writes."""

from __future__ import annotations

import pytest
import torch

from kiln.models.layers.attention import AttentionMetadata


def _slot(table: list[int], block_size: int, pos: int) -> int:
    return table[pos // block_size] * block_size + pos % block_size


def _slots(kv_slots: torch.Tensor | slice) -> list[int]:
    if isinstance(kv_slots, slice):
        return list(range(kv_slots.start, kv_slots.stop))
    return kv_slots.tolist()


@pytest.mark.parametrize("window", [None, 20])
def test_a_decode_step_reads_every_context_slot_and_writes_the_new_one(window):
    block_size = 8
    # in-order blocks, scattered blocks, a context ending on a block boundary, a spare block
    tables = [[3, 4, 5], [9, 1, 6, 2], [7, 0], [10, 11, 12]]
    computed = [20, 25, 15, 8]
    metadata = AttentionMetadata.build(computed, [1] * 4, tables, block_size, window)

    starts = metadata.decode_starts.tolist()
    assert starts == [0, 21, 47, 63, 72]
    for i, (table, done) in enumerate(zip(tables, computed, strict=True)):
        context = [_slot(table, block_size, pos) for pos in range(done + 1)]
        sequence = metadata.sequences[i]
        assert (sequence.query_start, sequence.num_query_tokens) == (i, 1)
        assert sequence.context_len == done + 1 and not sequence.is_causal
        assert _slots(sequence.kv_slots) == context
        assert metadata.decode_slots[starts[i] : starts[i + 1]].tolist() == context
        assert metadata.slot_mapping[i].item() == context[-1]
        if window is not None and done + 1 > window:
            expected = torch.arange(done + 1) > done - window  # the last `window` tokens
            assert torch.equal(sequence.mask, expected[None, :])
        else:
            assert sequence.mask is None
    for tensor in (metadata.slot_mapping, metadata.decode_slots, metadata.decode_starts):
        assert tensor.dtype == torch.int64


def test_a_decode_step_whose_table_is_too_short_is_refused():
    with pytest.raises(ValueError, match="block table has 1 blocks, context needs 2"):
        AttentionMetadata.build([8], [1], [[0]], 8)


def test_a_step_without_sequences_has_an_empty_layout():
    metadata = AttentionMetadata.build([], [], [], 8)
    assert metadata.sequences == [] and metadata.slot_mapping.numel() == 0
    assert metadata.decode_slots is None
