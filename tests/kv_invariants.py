"""The KV cache's accounting invariants, checked by the cache and scheduler tests."""

from __future__ import annotations

from collections import Counter

from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import Request


def check_invariants(kv: KVCacheManager, live: list[Request]) -> None:
    """Accounting is exact: ref counts are the number of holders, free == ref_count 0, only
    cached (hashed) blocks are shared, and the hash index agrees with the blocks."""
    holders: Counter[int] = Counter()
    for request in live:
        assert len(set(request.block_ids)) == len(request.block_ids)
        holders.update(request.block_ids)
    assert kv.num_free_blocks + kv.num_used_blocks == kv.num_blocks
    assert kv.num_used_blocks == len(holders)
    for block in kv.blocks:
        assert block.ref_count == holders[block.block_id]
        assert (block.ref_count == 0) == (block.block_id in kv._free)
        if block.ref_count > 1:
            assert block.block_hash is not None, "only cached prefix blocks may be shared"
        if block.block_hash is not None:
            assert kv._cached[block.block_hash] is block
    for block_hash, block in kv._cached.items():
        assert block.block_hash == block_hash
