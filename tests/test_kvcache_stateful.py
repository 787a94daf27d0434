"""Random allocate/append/fork/free/cache/match sequences against an independent reference model."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import hypothesis.strategies as st
import numpy as np
from hypothesis import event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvcache import KVCacheManager, OutOfBlocksError, RequestTooLargeError

# -1 and -2 have the same Python hash, so blocks differing only there collide in any hash.
SYMBOLS = st.sampled_from([0, 1, -1, -2])
# Prompts mostly start with one of a few shared openings so that prefixes repeat; the two
# openings differ only by -1 versus -2, so their blocks collide in hash.
OPENINGS = [[0, 1, -1, 0, 1, 1, 0, -1, 1], [0, 1, -2, 0, 1, 1, 0, -1, 1]]
TOKENS = st.one_of(
    st.lists(SYMBOLS, min_size=1, max_size=10),
    st.builds(lambda opening, cut, tail: opening[:cut] + tail, st.sampled_from(OPENINGS),
              st.integers(1, 9), st.lists(SYMBOLS, max_size=5)),
)
EXTRA_KEYS = st.sampled_from([None, "tenant-a"])


class ReferenceCache:
    """What the cache must do, written the slow obvious way.

    Free blocks are a list (front is reused first); cached content is keyed by the whole token
    prefix it ends, so no hash chaining is involved.
    """

    def __init__(self, num_blocks: int, block_size: int, watermark_blocks: int) -> None:
        self.block_size = block_size
        self.watermark_blocks = watermark_blocks
        self.free = list(range(num_blocks))
        self.cached: dict[tuple, int] = {}  # (extra, token prefix) -> block id
        self.key_of: dict[int, tuple] = {}
        self.tables: dict[int, list[int]] = {}
        self.num_hashed: dict[int, int] = {}
        self.evictions = 0

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def expected_match(self, tokens: list[int], extra) -> list[int]:
        hits = []
        for count in range(1, (len(tokens) - 1) // self.block_size + 1):
            block = self.cached.get((extra, tuple(tokens[:count * self.block_size])))
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, num_tokens: int, prefix: list[int]) -> bool:
        revived = sum(1 for b in prefix if b in self.free)
        taken = self.blocks_for(num_tokens) - len(prefix) + revived
        return len(self.free) - taken >= self.watermark_blocks

    def take(self, count: int) -> list[int]:
        taken, self.free = self.free[:count], self.free[count:]
        for block in taken:
            if block in self.key_of:
                del self.cached[self.key_of.pop(block)]
                self.evictions += 1
        return taken

    def allocate(self, seq: int, num_tokens: int, prefix: list[int]) -> None:
        self.free = [b for b in self.free if b not in prefix]
        self.tables[seq] = prefix + self.take(self.blocks_for(num_tokens) - len(prefix))
        self.num_hashed[seq] = len(prefix)

    def append(self, seq: int, num_tokens: int) -> bool:
        missing = self.blocks_for(num_tokens) - len(self.tables[seq])
        if missing > len(self.free):
            return False
        self.tables[seq] += self.take(max(missing, 0))
        return True

    def fork(self, parent: int, child: int, num_tokens: int) -> list[tuple[int, int]] | None:
        full = num_tokens // self.block_size
        partial = num_tokens % self.block_size != 0
        if partial and not self.free:
            return None
        table = self.tables[parent][:full]
        copies = []
        if partial:
            fresh = self.take(1)
            copies.append((self.tables[parent][full], fresh[0]))
            table += fresh
        self.tables[child] = table
        self.num_hashed[child] = min(self.num_hashed[parent], full)
        return copies

    def cache(self, seq: int, tokens: list[int], num_computed: int, extra) -> None:
        bs = self.block_size
        for index in range(self.num_hashed[seq], num_computed // bs):
            key = (extra, tuple(tokens[:(index + 1) * bs]))
            block = self.tables[seq][index]
            if block in self.key_of:
                assert self.key_of[block] == key, "a cached block's content changed"
            elif key not in self.cached:
                self.cached[key] = block
                self.key_of[block] = key
        self.num_hashed[seq] = max(self.num_hashed[seq], num_computed // bs)

    def release(self, seq: int) -> None:
        table = self.tables.pop(seq)
        del self.num_hashed[seq]
        still_held = self.ref_counts()
        for block in reversed(table):
            if still_held[block]:
                continue
            if block in self.key_of:
                self.free.append(block)
            else:
                self.free.insert(0, block)

    def ref_counts(self) -> Counter:
        return Counter(b for table in self.tables.values() for b in table)


@dataclass
class LiveSequence:
    tokens: list[int]
    extra: object
    num_computed: int


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(4, 24), block_size=st.integers(1, 3),
                watermark=st.sampled_from([0.0, 0.1, 0.25]),
                prefix_caching=st.sampled_from([True, True, True, False]))
    def start(self, num_blocks, block_size, watermark, prefix_caching):
        self.manager = KVCacheManager(num_blocks, block_size, watermark=watermark,
                                      enable_prefix_caching=prefix_caching)
        self.model = ReferenceCache(num_blocks, block_size, self.manager.watermark_blocks)
        self.seqs: dict[int, LiveSequence] = {}
        self.next_id = 0

    def _pick(self, data) -> int | None:
        """A live sequence id, or None; rules check for None instead of using preconditions,
        which would make hypothesis abort runs when no sequence is live."""
        return data.draw(st.sampled_from(sorted(self.seqs))) if self.seqs else None

    @rule(tokens=TOKENS, extra=EXTRA_KEYS)
    def query_prefix(self, tokens, extra):
        hits = self.manager.match_prefix(tokens, extra)
        assert [b.block_id for b in hits] == self.model.expected_match(tokens, extra)

    @rule(tokens=TOKENS, extra=EXTRA_KEYS, prefill=st.booleans())
    def admit(self, tokens, extra, prefill):
        """Admit a prompt, reusing its cached prefix; with ``prefill`` compute it all at once."""
        try:
            self.manager.check_fits(len(tokens))
        except RequestTooLargeError:
            assert self.model.blocks_for(len(tokens)) > (self.manager.num_blocks
                                                         - self.model.watermark_blocks)
            return
        hits = self.manager.match_prefix(tokens, extra)
        prefix_ids = [b.block_id for b in hits]
        assert prefix_ids == self.model.expected_match(tokens, extra)
        fits = self.manager.can_allocate(len(tokens), hits)
        assert fits == self.model.can_allocate(len(tokens), prefix_ids)
        if not fits:
            return
        seq = self.next_id
        self.next_id += 1
        evictions = self.model.evictions
        self.manager.allocate(seq, len(tokens), hits)
        self.model.allocate(seq, len(tokens), prefix_ids)
        event("admitted with a prefix hit" if hits else "admitted without a hit")
        if self.model.evictions > evictions:
            event("admission evicted cached blocks")
        self.seqs[seq] = LiveSequence(list(tokens), extra, len(hits) * self.manager.block_size)
        if prefill:
            self._compute(seq, len(tokens))

    @rule(data=st.data())
    def compute(self, data):
        seq = self._pick(data)
        if seq is None:
            return
        live = self.seqs[seq]
        self._compute(seq, data.draw(st.integers(live.num_computed, len(live.tokens))))

    def _compute(self, seq: int, num_computed: int) -> None:
        live = self.seqs[seq]
        live.num_computed = num_computed
        self.manager.cache_blocks(seq, live.tokens, live.num_computed, live.extra)
        if self.manager.enable_prefix_caching:
            self.model.cache(seq, live.tokens, live.num_computed, live.extra)

    @rule(data=st.data(), new_tokens=TOKENS)
    def append(self, data, new_tokens):
        seq = self._pick(data)
        if seq is None:
            return
        live = self.seqs[seq]
        grown = len(live.tokens) + len(new_tokens)
        ok = self.manager.append_slots(seq, grown)
        assert ok == self.model.append(seq, grown)
        if ok:
            live.tokens += new_tokens
        event("append fitted" if ok else "append ran out of blocks")

    @rule(data=st.data())
    def fork(self, data):
        parent = self._pick(data)
        if parent is None:
            return
        child = self.next_id
        self.next_id += 1
        live = self.seqs[parent]
        expected = self.model.fork(parent, child, len(live.tokens))
        try:
            copies = self.manager.fork(parent, child)
        except OutOfBlocksError:
            assert expected is None
            return
        assert copies == expected
        self.seqs[child] = LiveSequence(list(live.tokens), live.extra, live.num_computed)

    @rule(data=st.data())
    def free(self, data):
        seq = self._pick(data)
        if seq is None:
            return
        self.manager.free(seq)
        self.model.release(seq)
        del self.seqs[seq]

    @invariant()
    def tables_match_model(self):
        for seq, table in self.model.tables.items():
            assert self.manager.block_table(seq) == table
            assert len(set(table)) == len(table), "a block appears twice in one table"

    @invariant()
    def padded_tables_match_model(self):
        """What the model runner reads: each table, zero-padded to the longest asked for."""
        seqs = list(reversed(self.model.tables))  # any order, as a batch's
        padded = self.manager.padded_block_tables(seqs)
        width = max([1, *map(len, self.model.tables.values())])
        assert padded.shape == (len(seqs), width) and padded.dtype == np.int32
        assert padded.tolist() == [self.model.tables[s] + [0] * (width - len(self.model.tables[s]))
                                   for s in seqs]

    @invariant()
    def ref_counts_equal_owning_tables(self):
        owners = self.model.ref_counts()
        for block in self.manager.pool.blocks:
            assert block.ref_count == owners[block.block_id]

    @invariant()
    def free_list_order_matches_model(self):
        free = [b.block_id for b in self.manager.pool.free_queue]
        assert free == self.model.free
        assert all(self.manager.pool.blocks[b].ref_count == 0 for b in free)
        stats = self.manager.stats()
        assert stats.free + stats.used == stats.num_blocks
        assert stats.free == len(free) == self.manager.num_free_blocks

    @invariant()
    def cached_content_matches_model(self):
        keyed = {b.block_id for b in self.manager.pool.blocks if b.cache_key is not None}
        assert keyed == set(self.model.key_of)
        assert self.manager.stats().cached == len(self.model.cached)
        assert self.manager.stats().evictions == self.model.evictions


KVCacheMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40,
                                            deadline=None)
TestKVCacheMachine = KVCacheMachine.TestCase
