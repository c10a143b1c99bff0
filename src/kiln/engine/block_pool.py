"""A free list of KV cache blocks."""

from __future__ import annotations

from collections import deque

from kiln.errors import KilnError


class OutOfBlocksError(KilnError):
    """The KV cache has no free block left."""


class BlockPool:
    """Hands out block ids ``0..num_blocks-1``; freed blocks go to the back of the queue."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"need {count} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)
