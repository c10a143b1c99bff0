"""Attention over a paged KV cache.

The cache of one layer is a tensor ``[2, num_slots, num_kv_heads, head_dim]`` (keys, values),
its slots grouped into blocks of ``block_size``. A sequence owns a list of blocks (its block
table); token ``i`` of the sequence lives in slot
``block_table[i // block_size] * block_size + i % block_size``.
Everything that depends only on the batch layout (slots, masks) is computed once per step in
:class:`AttentionMetadata` and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels.native import CPUKernels


@dataclass
class SequenceAttention:
    """Layout of one sequence in a step."""

    query_start: int
    num_query_tokens: int
    context_len: int
    """Tokens in the context after this step (already cached + this step's)."""
    kv_slots: torch.Tensor | slice
    """Cache slots of the whole context in order: a slice when the blocks are contiguous (a
    view, no copy), else an index tensor ``[context_len]``."""
    mask: torch.Tensor | None
    """``[num_query_tokens, context_len]`` bool (True = attend), None when no mask is needed."""
    is_causal: bool
    """Plain causal attention (fresh prefill without window): SDPA builds the mask itself."""


@dataclass
class AttentionMetadata:
    """How a step's flattened tokens split into sequences and where their keys/values live."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot for each new token
    sequences: list[SequenceAttention]
    sliding_window: int | None = None
    decode_slots: torch.Tensor | None = None
    """When every sequence brings one token (a pure decode step): all their context slots,
    concatenated in batch order, for one batched attention call (int64)."""
    decode_starts: torch.Tensor | None = None
    """``[num_sequences + 1]`` int64: sequence ``i`` owns ``decode_slots[starts[i]:starts[i+1]]``
    (cumulative context lengths)."""

    @classmethod
    def build(
        cls,
        num_computed_tokens: Sequence[int],
        num_new_tokens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        sliding_window: int | None = None,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Layout for sequences that already have ``num_computed_tokens`` cached and bring
        ``num_new_tokens`` in this step (a prefill chunk, or 1 for a decode)."""
        decode = bool(num_new_tokens) and all(n == 1 for n in num_new_tokens)
        if decode and torch.device(device).type == "cpu":
            return cls._decode_on_cpu(num_computed_tokens, block_tables, block_size, sliding_window)
        slot_chunks: list[torch.Tensor] = []
        sequences: list[SequenceAttention] = []
        query_start = 0
        for computed, new, table in zip(
            num_computed_tokens, num_new_tokens, block_tables, strict=True
        ):
            context_len = computed + new
            num_blocks = -(-context_len // block_size)
            if num_blocks > len(table):
                raise ValueError(f"block table has {len(table)} blocks, context needs {num_blocks}")
            kv_slots = _context_slots(table[:num_blocks], block_size, context_len, device)
            new_slots = (
                kv_slots[computed:context_len] if isinstance(kv_slots, torch.Tensor) else None
            )
            if new_slots is None:
                start = kv_slots.start + computed
                new_slots = torch.arange(start, start + new, device=device)
            slot_chunks.append(new_slots)
            mask, is_causal = _mask(computed, new, sliding_window, device)
            sequences.append(
                SequenceAttention(query_start, new, context_len, kv_slots, mask, is_causal)
            )
            query_start += new
        slot_mapping = torch.cat(slot_chunks) if slot_chunks else torch.empty(0, dtype=torch.long)
        metadata = cls(
            slot_mapping=slot_mapping, sequences=sequences, sliding_window=sliding_window
        )
        if sequences and all(seq.num_query_tokens == 1 for seq in sequences):
            metadata.decode_slots = torch.cat(
                [
                    torch.arange(s.kv_slots.start, s.kv_slots.stop, device=device)
                    if isinstance(s.kv_slots, slice)
                    else s.kv_slots
                    for s in sequences
                ]
            )
            lengths = torch.tensor([0] + [s.context_len for s in sequences], device=device)
            metadata.decode_starts = lengths.cumsum(0)
        return metadata

    @classmethod
    def _decode_on_cpu(
        cls,
        num_computed_tokens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        sliding_window: int | None,
    ) -> AttentionMetadata:
        """:meth:`build` for a decode step (one new token per sequence) on the CPU, where it
        runs once per generated token: the slots are computed with numpy and become three
        tensors, as a handful of small torch ops per sequence cost more than the arithmetic."""
        pieces: list[np.ndarray] = []
        contiguous: list[bool] = []
        for computed, table in zip(num_computed_tokens, block_tables, strict=True):
            context_len = computed + 1
            num_blocks = -(-context_len // block_size)
            if num_blocks > len(table):
                raise ValueError(f"block table has {len(table)} blocks, context needs {num_blocks}")
            first = table[0]
            in_order = all(b == first + i for i, b in enumerate(table[:num_blocks]))
            if in_order:
                pieces.append(np.arange(first * block_size, first * block_size + context_len))
            else:
                blocks = np.asarray(table[:num_blocks], dtype=np.int64)[:, None] * block_size
                pieces.append((blocks + np.arange(block_size)).reshape(-1)[:context_len])
            contiguous.append(in_order)
        starts = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(piece) for piece in pieces], out=starts[1:])
        slots = np.concatenate(pieces).astype(np.int64, copy=False)
        decode_slots = torch.from_numpy(slots)
        sequences = []
        for i, (computed, in_order) in enumerate(zip(num_computed_tokens, contiguous, strict=True)):
            lo, hi = int(starts[i]), int(starts[i + 1])
            kv_slots = (
                slice(int(slots[lo]), int(slots[lo]) + hi - lo) if in_order else decode_slots[lo:hi]
            )
            mask, _ = _mask(computed, 1, sliding_window, "cpu")
            sequences.append(SequenceAttention(i, 1, hi - lo, kv_slots, mask, False))
        return cls(
            slot_mapping=torch.from_numpy(slots[starts[1:] - 1]),  # each sequence's new token
            sequences=sequences,
            sliding_window=sliding_window,
            decode_slots=decode_slots,
            decode_starts=torch.from_numpy(starts),
        )

    @classmethod
    def packed(
        cls,
        seq_lens: Sequence[int],
        sliding_window: int | None = None,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Layout of a step without a KV cache: the flattened tokens are whole sequences laid
        back to back (``seq_lens``), each attending causally within itself only, i.e. a
        block-diagonal causal mask (packed training, whole-sequence scoring).

        Token ``i``'s slot is ``i`` itself: with ``kv_cache=None`` attention reads the step's
        own keys and values through the same per-sequence code as a cached prefill.
        """
        sequences: list[SequenceAttention] = []
        start = 0
        for length in seq_lens:
            mask, is_causal = _mask(0, length, sliding_window, device)
            sequences.append(
                SequenceAttention(
                    start, length, length, slice(start, start + length), mask, is_causal
                )
            )
            start += length
        slot_mapping = torch.arange(start, device=device)
        return cls(slot_mapping=slot_mapping, sequences=sequences, sliding_window=sliding_window)


def _context_slots(
    blocks: Sequence[int], block_size: int, context_len: int, device: torch.device | str
) -> torch.Tensor | slice:
    first = blocks[0]
    if all(b == first + i for i, b in enumerate(blocks)):
        return slice(first * block_size, first * block_size + context_len)
    table = torch.tensor(list(blocks), dtype=torch.long, device=device)
    offsets = torch.arange(block_size, device=device)
    return (table[:, None] * block_size + offsets).flatten()[:context_len]


def _mask(
    num_computed: int, num_new: int, sliding_window: int | None, device: torch.device | str
) -> tuple[torch.Tensor | None, bool]:
    context_len = num_computed + num_new
    window_bites = sliding_window is not None and context_len > sliding_window
    if not window_bites:
        if num_new == 1:
            return None, False  # one query token attends to the whole context
        if num_computed == 0:
            return None, True
    query_pos = torch.arange(num_computed, context_len, device=device)[:, None]
    key_pos = torch.arange(context_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if window_bites:
        mask &= query_pos - key_pos < sliding_window
    return mask, False


class PagedAttention(nn.Module):
    """Writes this step's keys/values into the paged cache, then attends per sequence."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.kernels: CPUKernels | None = None
        """kiln's CPU kernels, set by :meth:`CausalLM.prepare_for_cpu` for float32 models:
        a decode step then attends for every sequence in one call."""

    @property
    def native_decode(self) -> bool:
        """Whether a decode step attends through kiln's kernel: a float32 CPU model (kernels
        set) whose head size is whole vectors of 8 floats, as every Llama family's is."""
        return self.kernels is not None and self.head_dim % 8 == 0

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        kv: torch.Tensor,  # [2, T, num_kv_heads, head_dim]: this step's keys and values
        kv_cache: torch.Tensor | None,  # [2, num_slots, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        if kv_cache is None:
            # No cache (training; metadata from AttentionMetadata.packed): the step's own keys
            # are the whole context, and nothing is written in place, so autograd can follow.
            return self.attend_packed(q, kv, metadata)
        # NOTE: one index_copy_/index_select over both halves of the cache instead of
        # per-half advanced indexing: ~2 us vs ~4 us to write, ~4 us vs ~26 us to gather a
        # 100-token context (SmolLM2 shapes, 2 cores); they run once per layer per sequence.
        kv_cache.index_copy_(1, metadata.slot_mapping, kv)
        return self.attend(q, kv_cache, metadata)

    def attend_packed(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        kv: torch.Tensor,  # [2, T, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        """Attention of whole sequences laid back to back (:meth:`AttentionMetadata.packed`),
        each over its own tokens only.

        NOTE: the sequences are cut with ``split``, whose backward concatenates their gradients,
        not sliced one by one as :meth:`attend` does: each slice's backward writes a zeroed
        gradient of the whole step's size, so a packed batch of ``n`` samples paid ``n`` such
        passes over q, k and v per layer.
        """
        lengths = [seq.num_query_tokens for seq in metadata.sequences]
        contiguous = all(
            isinstance(seq.kv_slots, slice)
            and seq.kv_slots.start == seq.query_start
            and seq.kv_slots.stop == seq.query_start + seq.num_query_tokens
            for seq in metadata.sequences
        )
        if len(lengths) == 1 or not contiguous:
            return self.attend(q, kv, metadata)
        gqa = self.num_heads != self.num_kv_heads
        queries = q.transpose(0, 1).unsqueeze(0).split(lengths, dim=2)  # [1, H, L, D] each
        contexts = kv.transpose(1, 2).unsqueeze(1).split(lengths, dim=3)  # [2, 1, KV, L, D]
        outputs = [
            F.scaled_dot_product_attention(
                q_seq,
                context[0],
                context[1],
                attn_mask=seq.mask,
                is_causal=seq.is_causal,
                scale=self.scale,
                enable_gqa=gqa,
            )
            for q_seq, context, seq in zip(queries, contexts, metadata.sequences, strict=True)
        ]
        out = torch.cat(outputs, dim=2)  # [1, H, T, D]
        return out[0].transpose(0, 1).reshape(-1, self.num_heads * self.head_dim)

    def attend(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_slots, num_kv_heads, head_dim], this step's included
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        """Attention of this step's queries over caches that already hold this step's keys."""
        if self.native_decode and metadata.decode_slots is not None:
            out = self.kernels.decode_attention(
                q.contiguous(),
                kv_cache,
                metadata.decode_slots,
                metadata.decode_starts,
                self.scale,
                metadata.sliding_window or 0,
            )
            return out.view(-1, self.num_heads * self.head_dim)
        gqa = self.num_heads != self.num_kv_heads
        # NOTE: 4-D inputs: with 3-D ones CPU SDPA takes its slow math path (~4x slower).
        q = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        single = len(metadata.sequences) == 1
        outputs = []
        for seq in metadata.sequences:
            q_seq = (
                q if single else q[:, :, seq.query_start : seq.query_start + seq.num_query_tokens]
            )
            context = (
                kv_cache[:, seq.kv_slots]
                if isinstance(seq.kv_slots, slice)
                else kv_cache.index_select(1, seq.kv_slots)
            ).transpose(1, 2)  # [2, KV, L, D]
            out = F.scaled_dot_product_attention(
                q_seq,
                context[0].unsqueeze(0),  # [1, KV, L, D]
                context[1].unsqueeze(0),
                attn_mask=seq.mask,
                is_causal=seq.is_causal,
                scale=self.scale,
                enable_gqa=gqa,
            )  # [1, H, q, D]
            outputs.append(out)
        out = outputs[0] if single else torch.cat(outputs, dim=2)
        return out[0].transpose(0, 1).reshape(-1, self.num_heads * self.head_dim)
