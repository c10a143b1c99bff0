"""The paged KV cache: block accounting, prefix caching, and sizing of the tensors.

Blocks are fixed-size groups of cache slots. A request holds a list of block ids (its block
table). A block that is full is identified by a hash of its tokens and of every token before it
(the hash of its parent block), so two requests whose token streams share a prefix can share the
blocks holding it. Freed blocks keep their contents and stay findable by hash until they are
reused: the free queue doubles as an LRU of cached blocks.
"""

from __future__ import annotations

import math
import mmap
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kiln.config import CacheConfig, ConfigError, ModelConfig
from kiln.config.engine import DEFAULT_CPU_KV_CACHE_MEMORY
from kiln.engine.request import Request


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    """Set while the block is full and registered in the prefix cache."""


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Identity of a full block: its tokens and, through the parent's hash, all before them."""
    return hash((parent_hash, tuple(token_ids)))


class KVCacheManager:
    """Hands out KV blocks to requests, shares cached prefixes, evicts least recently used."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, oldest first: allocation takes from the front.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}
        self._hashes: dict[str, list[int]] = {}  # request_id -> hashes of its full blocks
        self._num_registered: dict[str, int] = {}  # request_id -> blocks registered so far
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # ... and found there

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """The longest run of cached blocks matching the start of the request's tokens.

        The last token is always left to compute: its logits give the next token.

        NOTE: the hit-rate counters are updated by :meth:`allocate` when the admission
        succeeds, not here: a request that does not fit is looked up again every step, and
        counting each retry would skew the rate towards that request's.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        found: list[KVBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            found.append(block)
        return found

    def allocate(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[KVBlock] = ()
    ) -> bool:
        """Give ``request`` blocks for ``num_new_tokens`` more tokens (after ``cached_blocks``,
        a prefix found by :meth:`find_cached_prefix` for a request being admitted).

        Returns False, changing nothing, when there are not enough free blocks. A successful
        allocation for a request holding no blocks is its admission: it counts the prompt's
        prefix-cache lookup in ``prefix_queries`` / ``prefix_hits``.
        """
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        num_required = self.blocks_for(num_computed + num_new_tokens)
        num_new_blocks = num_required - len(request.block_ids) - len(cached_blocks)
        # Cached blocks nobody holds sit in the free queue: taking them uses free capacity.
        num_revived = sum(1 for b in cached_blocks if b.ref_count == 0)
        if max(num_new_blocks, 0) + num_revived > len(self._free):
            return False
        if not request.block_ids and self.enable_prefix_caching:  # admitted: count the lookup
            self.prefix_queries += request.num_prompt_tokens
            self.prefix_hits += min(len(cached_blocks) * self.block_size, request.num_prompt_tokens)
        for block in cached_blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1
            request.block_ids.append(block.block_id)
        for _ in range(max(num_new_blocks, 0)):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:  # evict: its contents are about to be overwritten
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            request.block_ids.append(block.block_id)
        if cached_blocks:
            self._num_registered[request.request_id] = len(cached_blocks)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that became full and computed, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        for i in range(start, num_full):
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks. Full cached blocks stay findable until reused; the
        tail of the sequence is released first so it is evicted before the shared head."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = block
                if block.block_hash is None:  # holds nothing reusable: hand it out first
                    self._free.move_to_end(block_id, last=False)
        request.block_ids = []
        self._num_registered.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Drop per-request bookkeeping once the request is finished for good."""
        self._hashes.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()

    def _block_hashes(self, request: Request) -> list[int]:
        """Hashes of the request's full blocks (prompt and output), extended as it grows."""
        hashes = self._hashes.setdefault(request.request_id, [])
        num_full = request.num_tokens // self.block_size
        bs = self.block_size
        for i in range(len(hashes), num_full):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, request.token_ids(i * bs, (i + 1) * bs)))
        return hashes


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    element = torch.empty(0, dtype=dtype).element_size()
    per_token = 2 * config.num_key_value_heads * config.head_dim * element
    return per_token * block_size * config.num_hidden_layers


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """``num_hidden_layers`` tensors ``[2, num_blocks * block_size, num_kv_heads, head_dim]``.

    Slots are stored flat: blocks are a bookkeeping unit, and a flat layout lets attention
    read a sequence's context with one index (or a slice when its blocks are contiguous).

    On a CPU the tensors are views of one anonymous memory map. NOTE: ``torch.zeros`` writes
    every page up front: for the exported SmolLM2 shapes (94 MiB) that was the largest part of
    a warm start to the first token. An anonymous map is zero by the kernel's guarantee and a
    page is only materialized when a slot in it is first written, so the cache still starts
    all-zero (attention never multiplies garbage) but costs nothing until used."""
    shape = (2, num_blocks * block_size, config.num_key_value_heads, config.head_dim)
    if device.type != "cpu":
        return [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
    per_layer = math.prod(shape)
    element = torch.empty(0, dtype=dtype).element_size()
    region = mmap.mmap(-1, per_layer * element * config.num_hidden_layers)
    # frombuffer keeps a reference to the map: it is unmapped when the last view is freed.
    flat = torch.frombuffer(region, dtype=dtype)
    return [
        flat[i * per_layer : (i + 1) * per_layer].view(shape)
        for i in range(config.num_hidden_layers)
    ]


def num_kv_blocks(
    config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype, device: torch.device
) -> int:
    """How many blocks the KV cache budget buys: ``kv_cache_memory`` bytes when given, else a
    fraction of the GPU's free memory (measured after the weights are loaded), else the CPU
    default."""
    per_block = kv_bytes_per_block(config, cache_config.block_size, dtype)
    budget = cache_config.kv_cache_memory
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * cache_config.gpu_memory_utilization)
        else:
            budget = DEFAULT_CPU_KV_CACHE_MEMORY
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ConfigError(
            f"a KV cache of {budget} bytes holds no block ({per_block} bytes per block of "
            f"{cache_config.block_size} tokens); raise kv_cache_memory"
        )
    return num_blocks
