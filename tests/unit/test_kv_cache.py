"""KV cache manager: block accounting, prefix caching (chained hashes), LRU eviction.

Pure Python: requests are built directly and "computed" by setting ``num_computed_tokens``
the way ``Scheduler.update`` does.
"""

from __future__ import annotations

import random

import pytest

from kiln.engine.kv_cache import KVBlock, KVCacheManager, hash_block
from kiln.engine.request import Request
from kiln.sampling import SamplingParams
from kv_invariants import check_invariants

EOS = 0


def make_request(request_id: str, prompt: list[int], max_new_tokens: int = 16) -> Request:
    return Request(
        request_id,
        list(prompt),
        SamplingParams(max_new_tokens=max_new_tokens),
        eos_token_ids=frozenset({EOS}),
        max_model_len=4096,
    )


def admit(kv: KVCacheManager, request: Request) -> int:
    """Admit ``request`` the way the scheduler does, compute its whole prompt, register its
    full blocks; returns how many prompt tokens came from the cache."""
    cached = kv.find_cached_prefix(request)
    num_cached = len(cached) * kv.block_size
    assert kv.allocate(request, request.num_tokens - num_cached, cached)
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)
    return num_cached


def snapshot(kv: KVCacheManager, *requests: Request) -> tuple:
    """Everything ``allocate`` could touch."""
    return (
        list(kv._free),
        [(b.ref_count, b.block_hash) for b in kv.blocks],
        dict(kv._cached),
        dict(kv._num_registered),
        kv.prefix_queries,
        kv.prefix_hits,
        [(list(r.block_ids), r.num_computed_tokens) for r in requests],
    )


# --- allocation accounting -------------------------------------------------------------------


def test_allocate_and_free_accounting() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert (kv.num_free_blocks, kv.num_used_blocks, kv.num_cached_blocks) == (10, 0, 0)
    r = make_request("a", list(range(1, 11)))  # 10 tokens -> 3 blocks
    assert kv.allocate(r, 10)
    assert len(r.block_ids) == 3
    assert (kv.num_free_blocks, kv.num_used_blocks) == (7, 3)
    assert all(kv.blocks[b].ref_count == 1 for b in r.block_ids)
    check_invariants(kv, [r])

    # Growing within the last block takes nothing; crossing a boundary takes one block.
    r.num_computed_tokens = 10
    assert kv.allocate(r, 2)
    assert len(r.block_ids) == 3
    r.num_computed_tokens = 12
    assert kv.allocate(r, 1)
    assert len(r.block_ids) == 4
    check_invariants(kv, [r])

    kv.free(r)
    assert r.block_ids == []
    assert (kv.num_free_blocks, kv.num_used_blocks) == (10, 0)
    check_invariants(kv, [])


def test_blocks_for_rounds_up() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert [kv.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_chunked_allocation_matches_blocks_for() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=4)
    r = make_request("a", list(range(1, 38)))
    for chunk in (5, 3, 8, 1, 20):
        assert kv.allocate(r, chunk)
        r.num_computed_tokens += chunk
        assert len(r.block_ids) == kv.blocks_for(r.num_computed_tokens)
        kv.cache_full_blocks(r)
        check_invariants(kv, [r])
    assert r.num_computed_tokens == 37
    assert kv.num_cached_blocks == 9  # 37 // 4 full, computed blocks


def test_allocate_fails_without_change_when_short() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(1, 10)))
    assert kv.allocate(a, 9)  # 3 blocks
    b = make_request("b", list(range(20, 30)))
    before = snapshot(kv, a, b)
    assert not kv.allocate(b, 5)  # needs 2, one is free
    assert snapshot(kv, a, b) == before
    assert kv.allocate(b, 4)  # one block fits
    assert kv.num_free_blocks == 0
    b.num_computed_tokens = 4
    before = snapshot(kv, a, b)
    assert not kv.allocate(b, 1)  # growing a running request fails the same way
    assert snapshot(kv, a, b) == before
    check_invariants(kv, [a, b])


def test_allocate_fails_without_change_when_revived_cached_blocks_do_not_fit() -> None:
    """Reusing a cached block nobody holds takes it out of the free queue, so it counts
    against free capacity; a failed allocate must not revive (or evict) anything."""
    kv = KVCacheManager(num_blocks=4, block_size=4)
    prompt = list(range(1, 10))  # 2 full blocks + 1 token
    first = make_request("first", prompt)
    admit(kv, first)
    first_blocks = list(first.block_ids)
    kv.free(first)
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 4

    other = make_request("other", list(range(50, 58)))  # takes the 2 uncached blocks
    assert kv.allocate(other, 8)
    assert kv.num_free_blocks == 2 and kv.num_cached_blocks == 2  # the cached ones are left

    again = make_request("again", prompt)
    cached = kv.find_cached_prefix(again)
    assert [b.block_id for b in cached] == first_blocks[:2]
    assert all(b.ref_count == 0 for b in cached)
    before = snapshot(kv, other, again)
    # 2 revived + 1 new > 2 free.
    assert not kv.allocate(again, again.num_tokens - 8, cached)
    assert snapshot(kv, other, again) == before
    assert all(b.ref_count == 0 and b.block_hash is not None for b in cached)
    check_invariants(kv, [other])

    kv.free(other)
    assert kv.allocate(again, again.num_tokens - 8, cached)
    assert again.block_ids[:2] == [b.block_id for b in cached]
    check_invariants(kv, [again])


# --- prefix caching --------------------------------------------------------------------------


def test_shared_prefix_shares_exactly_those_blocks() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prefix = list(range(1, 13))  # 3 full blocks
    a = make_request("a", [*prefix, 100, 101])
    b = make_request("b", [*prefix, 200, 201, 202, 203, 204])
    assert admit(kv, a) == 0
    assert kv.num_cached_blocks == 3
    assert admit(kv, b) == 12
    assert b.block_ids[:3] == a.block_ids[:3]
    assert all(kv.blocks[i].ref_count == 2 for i in a.block_ids[:3])
    assert not set(a.block_ids[3:]) & set(b.block_ids[3:])
    assert all(kv.blocks[i].ref_count == 1 for i in a.block_ids[3:] + b.block_ids[3:])
    check_invariants(kv, [a, b])

    kv.free(a)
    assert all(kv.blocks[i].ref_count == 1 for i in b.block_ids[:3])
    check_invariants(kv, [b])
    kv.free(b)
    assert kv.num_free_blocks == 16
    check_invariants(kv, [])


def test_last_token_is_never_a_cache_hit() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 13))  # exactly 3 full blocks
    admit(kv, make_request("a", [*prompt, 7]))
    assert kv.num_cached_blocks == 3

    # The same 3 blocks as the whole prompt: the last block is computed again, so the last
    # token's logits exist.
    same = make_request("same", prompt)
    assert len(kv.find_cached_prefix(same)) == 2
    # One token past the cached blocks: all 3 blocks hit, 1 token left to compute.
    longer = make_request("longer", [*prompt, 99])
    assert len(kv.find_cached_prefix(longer)) == 3


def test_one_token_prompt_never_hits() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=1)
    admit(kv, make_request("a", [5, 6]))
    assert kv.find_cached_prefix(make_request("b", [5])) == []
    assert len(kv.find_cached_prefix(make_request("c", [5, 6]))) == 1


def test_hash_chain_matters() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=4)
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    x = [13, 14, 15, 16]
    admit(kv, make_request("abc", [*a, *b, *c, 1]))
    assert hash_block(None, b) != hash_block(hash_block(None, a), b)

    # Same blocks b and c after a different first block: no hit at all.
    assert kv.find_cached_prefix(make_request("xbc", [*x, *b, *c, 1])) == []
    # Same first block, then a different one: only the first hits, c after x does not.
    assert len(kv.find_cached_prefix(make_request("axc", [*a, *x, *c, 1]))) == 1
    assert len(kv.find_cached_prefix(make_request("abx", [*a, *b, *x, 1]))) == 2
    assert len(kv.find_cached_prefix(make_request("abc2", [*a, *b, *c, 2]))) == 3


def test_output_tokens_are_cached_too() -> None:
    """A preempted request recomputes prompt + output: full blocks holding output tokens are
    cached like prompt blocks."""
    kv = KVCacheManager(num_blocks=8, block_size=2)
    r = make_request("r", [1, 2, 3])
    admit(kv, r)
    for token in (4, 5):  # decode steps: each computes the token sampled before it
        r.output_token_ids.append(token)
        assert kv.allocate(r, 1)
        r.num_computed_tokens += 1
        kv.cache_full_blocks(r)
        assert kv.num_cached_blocks == r.num_computed_tokens // 2
    r.output_token_ids.append(6)  # sampled, not computed: block [5, 6] is not cached
    assert (r.num_computed_tokens, kv.num_cached_blocks) == (5, 2)
    other = make_request("o", [1, 2, 3, 4, 5, 6, 7])
    assert [blk.block_id for blk in kv.find_cached_prefix(other)] == r.block_ids[:2]


def test_concurrent_identical_prompts_register_one_copy() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    a, b = make_request("a", prompt), make_request("b", prompt)
    # Both admitted before either computed: no hit, separate blocks.
    assert kv.allocate(a, 5, kv.find_cached_prefix(a))
    assert kv.allocate(b, 5, kv.find_cached_prefix(b))
    assert not set(a.block_ids) & set(b.block_ids)
    for r in (a, b):
        r.num_computed_tokens = 5
        kv.cache_full_blocks(r)
    assert kv.num_cached_blocks == 2
    assert all(kv.blocks[i].block_hash is not None for i in a.block_ids[:2])
    assert all(kv.blocks[i].block_hash is None for i in b.block_ids)
    check_invariants(kv, [a, b])
    # The unregistered duplicates hold nothing findable: they are handed out first.
    a_blocks, b_blocks = list(a.block_ids), list(b.block_ids)
    kv.free(b)
    kv.free(a)
    assert list(kv._free)[:4] == [a_blocks[2], *b_blocks]
    assert list(kv._free)[-2:] == [a_blocks[1], a_blocks[0]]
    c = make_request("c", [9, 9, 9, 9, 9, 9])
    assert kv.allocate(c, 6)  # 3 blocks, none of them cached
    assert kv.num_cached_blocks == 2
    check_invariants(kv, [c])


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert admit(kv, a) == 0
    assert kv.num_cached_blocks == 0
    assert admit(kv, make_request("b", [1, 2, 3, 4, 5])) == 0
    assert (kv.prefix_queries, kv.prefix_hits, kv.prefix_hit_rate) == (0, 0, 0.0)


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    admit(kv, a)
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0
    assert all(b.block_hash is None for b in kv.blocks)
    assert kv.find_cached_prefix(make_request("b", [1, 2, 3, 4, 5])) == []
    kv.free(a)
    check_invariants(kv, [])


# --- LRU eviction ----------------------------------------------------------------------------


def test_free_releases_tail_first_and_partial_blocks_to_the_front() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    r = make_request("r", [1, 2, 3, 4, 5, 6, 7])  # 3 full blocks + 1 partial
    admit(kv, r)
    head, mid, tail, partial = r.block_ids
    untouched = [b for b in range(8) if b not in r.block_ids]
    kv.free(r)
    # The partial block holds nothing findable: it is reused first; the cached blocks are
    # queued tail first, so the tail is evicted before the shared head.
    assert list(kv._free) == [partial, *untouched, tail, mid, head]


def test_lru_evicts_oldest_freed_and_tail_before_head() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=2)
    p1, p2 = [1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15, 16]
    r1, r2 = make_request("r1", [*p1, 7]), make_request("r2", [*p2, 17])
    # Compute only the 3 full blocks of each prompt, so the 6 blocks are all cached.
    for r in (r1, r2):
        assert kv.allocate(r, 6)
        r.num_computed_tokens = 6
        kv.cache_full_blocks(r)
    assert kv.num_cached_blocks == 6 and kv.num_free_blocks == 0
    blocks1, blocks2 = list(r1.block_ids), list(r2.block_ids)
    kv.free(r1)  # freed first: least recently used
    kv.free(r2)
    assert list(kv._free) == [*reversed(blocks1), *reversed(blocks2)]

    probes = iter(range(100))

    def hits(prompt: list[int]) -> int:  # a fresh id each time: hashes are memoized per id
        return len(kv.find_cached_prefix(make_request(f"probe{next(probes)}", [*prompt, 0])))

    assert (hits(p1), hits(p2)) == (3, 3)
    new = make_request("new", [21, 22])
    assert kv.allocate(new, 2)  # evicts r1's tail
    assert new.block_ids == [blocks1[2]]
    assert (hits(p1), hits(p2)) == (2, 3)
    new.num_computed_tokens = 2
    assert kv.allocate(new, 4)  # r1's middle and head
    assert new.block_ids == [blocks1[2], blocks1[1], blocks1[0]]
    assert (hits(p1), hits(p2)) == (0, 3)
    assert kv.num_cached_blocks == 3
    check_invariants(kv, [new])


def test_reused_cached_blocks_become_most_recently_used() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=2)
    p1, p2 = [1, 2, 3, 4], [11, 12, 13, 14]
    r1, r2 = make_request("r1", [*p1, 5]), make_request("r2", [*p2, 15])
    admit(kv, r1)
    admit(kv, r2)
    kv.free(r1)
    kv.free(r2)
    # r1's prefix is older, but reusing it makes it the most recently used.
    again = make_request("again", [*p1, 9])
    assert admit(kv, again) == 4
    kv.free(again)
    filler = make_request("filler", list(range(30, 38)))
    assert kv.allocate(filler, 8)  # 4 blocks: 2 partial ones first, then r2's cached 2
    probe1 = make_request("probe1", [*p1, 0])
    probe2 = make_request("probe2", [*p2, 0])
    assert len(kv.find_cached_prefix(probe1)) == 2
    assert kv.find_cached_prefix(probe2) == []
    check_invariants(kv, [filler])


def test_eviction_removes_the_hash() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=2)
    old = make_request("old", [1, 2, 3])
    admit(kv, old)
    old_blocks = list(old.block_ids)
    old_hash = kv.blocks[old_blocks[0]].block_hash
    assert old_hash is not None
    kv.free(old)
    other = make_request("other", [7, 8, 9])
    admit(kv, other)  # reuses both blocks, overwriting [1, 2]
    assert sorted(other.block_ids) == sorted(old_blocks)
    assert old_hash not in kv._cached
    # The block now holds [7, 8] and is cached under that hash, not the old one.
    assert kv.find_cached_prefix(make_request("stale", [1, 2, 3])) == []
    assert len(kv.find_cached_prefix(make_request("fresh", [7, 8, 9]))) == 1
    check_invariants(kv, [other])


# --- hit-rate counters -----------------------------------------------------------------------


def test_hit_rate_counters() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    assert kv.prefix_hit_rate == 0.0
    prefix = list(range(1, 9))
    admit(kv, make_request("a", [*prefix, 1, 2]))  # 10 tokens queried, 0 hits
    assert (kv.prefix_queries, kv.prefix_hits) == (10, 0)
    admit(kv, make_request("b", [*prefix, 3, 4, 5, 6, 7, 8]))  # 14 queried, 8 hit
    assert (kv.prefix_queries, kv.prefix_hits) == (24, 8)
    assert kv.prefix_hit_rate == pytest.approx(8 / 24)


def test_failed_admission_is_not_counted_as_a_lookup() -> None:
    """A request that does not fit is looked up again every step until it does: each retry
    must not count its prompt again (the rate would drift towards that request's)."""
    kv = KVCacheManager(num_blocks=3, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    admit(kv, make_request("a", prompt))  # holds all 3 blocks
    blocked = make_request("blocked", [9, 9, 9])
    for _ in range(5):
        assert not kv.allocate(blocked, 3, kv.find_cached_prefix(blocked))
    assert (kv.prefix_queries, kv.prefix_hits) == (5, 0)


# --- randomized -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_random_allocate_free_keeps_accounting_exact(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    kv = KVCacheManager(num_blocks=rng.randint(4, 24), block_size=block_size)
    prefixes = [[rng.randint(1, 3) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    live: list[Request] = []
    for i in range(400):
        op = rng.random()
        if op < 0.35 or not live:
            prompt = rng.choice(prefixes) + [rng.randint(1, 3) for _ in range(rng.randint(1, 8))]
            r = make_request(f"r{i}", prompt)
            cached = kv.find_cached_prefix(r)
            num_cached = len(cached) * block_size
            assert num_cached < r.num_tokens
            num_new = rng.randint(1, r.num_tokens - num_cached)
            before = snapshot(kv, r)
            if kv.allocate(r, num_new, cached):
                r.num_computed_tokens = num_cached + num_new
                assert len(r.block_ids) == kv.blocks_for(r.num_computed_tokens)
                kv.cache_full_blocks(r)
                live.append(r)
            else:
                assert snapshot(kv, r) == before  # lookups count only on success
                kv.forget(r)
        elif op < 0.75:
            r = rng.choice(live)
            if r.num_computed_tokens == r.num_tokens:
                r.output_token_ids.append(rng.randint(1, 3))
            num_new = rng.randint(1, r.num_tokens - r.num_computed_tokens)
            if kv.allocate(r, num_new):
                r.num_computed_tokens += num_new
                assert len(r.block_ids) == kv.blocks_for(r.num_computed_tokens)
                kv.cache_full_blocks(r)
        else:
            r = live.pop(rng.randrange(len(live)))
            kv.free(r)
            kv.forget(r)
        check_invariants(kv, live)
    for r in live:
        kv.free(r)
        kv.forget(r)
    check_invariants(kv, [])
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)
    assert not kv._hashes and not kv._num_registered


def test_kv_block_defaults() -> None:
    block = KVBlock(3)
    assert (block.block_id, block.ref_count, block.block_hash) == (3, 0, None)
