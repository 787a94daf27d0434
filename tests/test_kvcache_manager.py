"""KVCacheManager behaviour: admission limits, the last-token rule, sharing, forks, slots, stats."""
from __future__ import annotations

import pytest

from kvcache import KVCacheManager, OutOfBlocksError, RequestTooLargeError

BS = 4


def prompt(length: int, start: int = 0) -> list[int]:
    return list(range(start, start + length))


def admit(manager: KVCacheManager, seq_id, tokens, extra=None, compute=True):
    """Match, allocate and (optionally) compute a whole prompt, as the scheduler would."""
    prefix = manager.match_prefix(tokens, extra)
    manager.allocate(seq_id, len(tokens), prefix)
    manager.record_prefix_query(len(tokens), prefix)
    if compute:
        manager.cache_blocks(seq_id, tokens, len(tokens), extra)
    return prefix


def test_request_too_large_names_needed_and_existing_blocks():
    manager = KVCacheManager(num_blocks=10, block_size=BS, watermark=0.0)
    manager.check_fits(10 * BS)  # exactly the whole pool fits
    with pytest.raises(RequestTooLargeError) as raised:
        manager.check_fits(10 * BS + 1)
    assert isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert "needs 11 KV blocks" in message and "has only 10 KV blocks" in message
    assert raised.value.blocks_needed == 11 and raised.value.num_blocks == 10


def test_request_too_large_says_one_block_in_the_singular():
    manager = KVCacheManager(num_blocks=1, block_size=BS, watermark=0.0)
    with pytest.raises(RequestTooLargeError) as raised:
        manager.check_fits(BS + 1)
    assert "needs 2 KV blocks of" in str(raised.value)
    assert "has only 1 KV block (1 usable" in str(raised.value)


def test_request_too_large_counts_the_watermark_as_unusable():
    manager = KVCacheManager(num_blocks=10, block_size=BS, watermark=0.2)
    assert manager.watermark_blocks == 2
    manager.check_fits(8 * BS)
    with pytest.raises(RequestTooLargeError, match="8 usable"):
        manager.check_fits(8 * BS + 1)


def test_can_allocate_keeps_the_watermark_free():
    manager = KVCacheManager(num_blocks=10, block_size=BS, watermark=0.2)
    assert manager.can_allocate(8 * BS, [])
    assert not manager.can_allocate(8 * BS + 1, [])
    manager.allocate("a", 6 * BS, [])
    assert manager.can_allocate(2 * BS, [])
    assert not manager.can_allocate(2 * BS + 1, [])


def test_allocate_beyond_the_free_blocks_raises_and_changes_nothing():
    manager = KVCacheManager(num_blocks=4, block_size=BS, watermark=0.0)
    manager.allocate("a", 3 * BS, [])
    with pytest.raises(OutOfBlocksError):
        manager.allocate("b", 2 * BS, [])
    assert manager.num_free_blocks == 1 and not manager.has_sequence("b")


def test_prefix_match_never_covers_the_last_prompt_token():
    manager = KVCacheManager(num_blocks=16, block_size=BS)
    tokens = prompt(3 * BS)
    admit(manager, "a", tokens)
    # The same 3-block prompt may hit only 2 blocks: its last token must be computed.
    assert len(manager.match_prefix(tokens)) == 2
    assert len(manager.match_prefix(tokens + [99])) == 3
    assert manager.match_prefix(tokens[:1]) == []


def test_prefix_hit_requires_identical_tokens_and_extra_key():
    manager = KVCacheManager(num_blocks=16, block_size=BS)
    tokens = prompt(3 * BS)
    admit(manager, "a", tokens, extra="tenant-1")
    assert manager.match_prefix(tokens + [0], extra_key="tenant-2") == []
    assert manager.match_prefix(tokens + [0]) == []
    changed = tokens.copy()
    changed[BS + 1] += 1000  # second block differs: only the first can hit
    hits = manager.match_prefix(changed + [0], extra_key="tenant-1")
    assert [b.block_id for b in hits] == manager.block_table("a")[:1]


def test_colliding_block_hashes_never_share_blocks():
    # hash(-1) == hash(-2) in CPython, so these two blocks hash alike at every level.
    manager = KVCacheManager(num_blocks=16, block_size=BS)
    first = [-1] * BS + [5] * BS
    second = [-2] * BS + [5] * BS
    assert hash(tuple(first[:BS])) == hash(tuple(second[:BS]))
    admit(manager, "a", first + [0])
    assert manager.match_prefix(second + [0]) == []
    admit(manager, "b", second + [0])
    assert len(manager.match_prefix(second + [0])) == 2
    assert set(manager.block_table("a")).isdisjoint(manager.block_table("b"))


def test_shared_prefix_is_referenced_and_leaves_the_free_list():
    manager = KVCacheManager(num_blocks=8, block_size=BS, watermark=0.0)
    tokens = prompt(2 * BS + 1)
    admit(manager, "a", tokens)
    manager.free("a")
    assert manager.num_free_blocks == 8
    hits = manager.match_prefix(tokens)
    assert len(hits) == 2 and all(b.ref_count == 0 for b in hits)
    # Free cached blocks the new sequence revives count as consumed.
    assert manager.can_allocate(len(tokens), hits)
    assert not manager.can_allocate(len(tokens) + 6 * BS, hits)
    manager.allocate("b", len(tokens), hits)
    assert manager.num_free_blocks == 5
    admit(manager, "c", tokens)
    assert manager.block_table("c")[:2] == manager.block_table("b")[:2]
    assert [b.ref_count for b in hits] == [2, 2]


def test_freed_blocks_are_reused_tail_first_and_least_recent_first():
    manager = KVCacheManager(num_blocks=5, block_size=BS, watermark=0.0)
    admit(manager, "old", prompt(2 * BS, start=100))
    admit(manager, "new", prompt(2 * BS + 1, start=200))  # last block partial: never cached
    old, new = manager.block_table("old"), manager.block_table("new")
    manager.free("old")
    manager.free("new")
    # Uncached first, then cached by age, each sequence's tail before its head.
    manager.allocate("x", 5 * BS, [])
    assert manager.block_table("x") == [new[2], old[1], old[0], new[1], new[0]]
    assert manager.stats().evictions == 4


def test_eviction_is_lazy_until_a_block_is_reused():
    manager = KVCacheManager(num_blocks=4, block_size=BS, watermark=0.0)
    tokens = prompt(2 * BS)
    admit(manager, "a", tokens)
    manager.free("a")
    assert manager.stats().cached == 2
    manager.allocate("b", 2 * BS, [])  # takes the two never-used blocks first
    assert len(manager.match_prefix(tokens + [0])) == 2
    manager.allocate("c", 1, [])  # now the LRU cached block (the prompt's tail) goes
    assert len(manager.match_prefix(tokens + [0])) == 1
    assert manager.stats().evictions == 1


def test_an_evicted_prefix_is_refused_at_allocation():
    manager = KVCacheManager(num_blocks=2, block_size=BS, watermark=0.0)
    tokens = prompt(BS + 1)
    admit(manager, "a", tokens)
    manager.free("a")
    stale = manager.match_prefix(tokens)
    manager.allocate("b", 2 * BS, [])
    manager.free("b")
    with pytest.raises(ValueError, match="match_prefix"):
        manager.allocate("c", len(tokens), stale)


def test_cache_blocks_is_idempotent_and_keeps_the_first_identical_block():
    manager = KVCacheManager(num_blocks=8, block_size=BS, watermark=0.0)
    tokens = prompt(2 * BS)
    manager.allocate("a", len(tokens), [])
    manager.allocate("b", len(tokens), [])  # computed the same prompt without a hit
    manager.cache_blocks("a", tokens, len(tokens))
    manager.cache_blocks("a", tokens, len(tokens))
    manager.cache_blocks("b", tokens, len(tokens))
    assert manager.stats().cached == 2
    hits = manager.match_prefix(tokens + [0])
    assert [b.block_id for b in hits] == manager.block_table("a")


def test_only_computed_full_blocks_are_cached():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    tokens = prompt(3 * BS)
    manager.allocate("a", len(tokens), [])
    manager.cache_blocks("a", tokens, BS + 2)
    assert manager.stats().cached == 1
    manager.cache_blocks("a", tokens, 3 * BS)
    assert manager.stats().cached == 3


def test_disabled_prefix_caching_never_hits():
    manager = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    tokens = prompt(2 * BS + 1)
    admit(manager, "a", tokens)
    assert manager.match_prefix(tokens) == [] and manager.stats().cached == 0


def test_fork_shares_full_blocks_and_copies_a_partial_one():
    manager = KVCacheManager(num_blocks=8, block_size=BS, watermark=0.0)
    manager.allocate("p", 2 * BS + 1, [])
    parent = manager.block_table("p")
    assert manager.blocks_to_fork("p") == 1
    copies = manager.fork("p", "c")
    child = manager.block_table("c")
    assert child[:2] == parent[:2] and child[2] != parent[2]
    assert copies == [(parent[2], child[2])]
    assert [manager.pool.blocks[b].ref_count for b in parent] == [2, 2, 1]
    # Growing one does not touch the other's table.
    assert manager.append_slots("c", 3 * BS + 1)
    assert manager.block_table("p") == parent and len(manager.block_table("c")) == 4
    manager.free("p")
    assert [manager.pool.blocks[b].ref_count for b in child[:2]] == [1, 1]


def test_fork_of_whole_blocks_copies_nothing():
    manager = KVCacheManager(num_blocks=4, block_size=BS, watermark=0.0)
    manager.allocate("p", 2 * BS, [])
    assert manager.fork("p", "c") == []
    assert manager.block_table("c") == manager.block_table("p")
    assert manager.num_free_blocks == 2


def test_fork_without_a_free_block_raises_and_changes_nothing():
    manager = KVCacheManager(num_blocks=2, block_size=BS, watermark=0.0)
    manager.allocate("p", BS + 1, [])
    with pytest.raises(OutOfBlocksError):
        manager.fork("p", "c")
    assert not manager.has_sequence("c")
    assert [manager.pool.blocks[b].ref_count for b in manager.block_table("p")] == [1, 1]


def test_append_slots_fails_without_change_when_blocks_run_out():
    manager = KVCacheManager(num_blocks=3, block_size=BS, watermark=0.0)
    manager.allocate("a", BS, [])
    assert manager.append_slots("a", BS)  # already fits: no new block
    assert manager.num_free_blocks == 2
    assert not manager.append_slots("a", 3 * BS + 1)
    assert len(manager.block_table("a")) == 1 and manager.num_free_blocks == 2
    assert manager.append_slots("a", 3 * BS)
    assert manager.num_free_blocks == 0 and manager.usage == 1.0


def test_slot_mapping_follows_the_block_table():
    manager = KVCacheManager(num_blocks=8, block_size=BS, watermark=0.0)
    manager.allocate("filler", BS, [])
    manager.allocate("a", 3 * BS, [])
    manager.free("filler")  # so "a"'s blocks are not simply 0, 1, 2
    manager.append_slots("a", 4 * BS)
    table = manager.block_table("a")
    for start, end in [(0, 4 * BS), (3, 3), (BS - 1, BS + 1), (5, 4 * BS - 2)]:
        expected = [table[pos // BS] * BS + pos % BS for pos in range(start, end)]
        assert manager.slot_mapping("a", start, end) == expected
    with pytest.raises(ValueError, match="append_slots"):
        manager.slot_mapping("a", 0, 4 * BS + 1)


def test_stats_count_queries_hits_and_usage():
    manager = KVCacheManager(num_blocks=10, block_size=BS, watermark=0.0)
    tokens = prompt(3 * BS + 2)
    admit(manager, "a", tokens)
    admit(manager, "b", tokens)
    stats = manager.stats()
    assert stats.prefix_query_blocks == 6 and stats.prefix_hit_blocks == 3
    assert stats.prefix_query_tokens == 2 * len(tokens) and stats.prefix_hit_tokens == 3 * BS
    assert stats.prefix_hit_rate == pytest.approx(3 * BS / (2 * len(tokens)))
    assert stats.used == 5 and stats.free == 5 and stats.cached == 3
    assert manager.usage == pytest.approx(0.5)


def test_bad_calls_get_actionable_errors():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    manager.allocate("a", 1, [])
    with pytest.raises(ValueError, match="already has blocks"):
        manager.allocate("a", 1, [])
    with pytest.raises(KeyError, match="allocate it first"):
        manager.block_table("missing")
    manager.free("a")
    with pytest.raises(KeyError, match="already freed"):
        manager.free("a")
    with pytest.raises(ValueError, match="watermark"):
        KVCacheManager(num_blocks=4, block_size=BS, watermark=1.5)
    with pytest.raises(ValueError, match="num_tokens"):
        manager.blocks_needed(-1)
