"""KVCacheManager: per-sequence block tables, prefix matching and sharing over a BlockPool."""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from kvcache.block_key import BlockKey
from kvcache.block_pool import Block, BlockPool
from kvcache.errors import OutOfBlocksError, RequestTooLargeError
from kvcache.stats import KVCacheStats
from kvcache.table_rows import BlockTableRows


@dataclass(slots=True)
class _SequenceBlocks:
    blocks: list[Block]
    block_ids: list[int]  # the block table handed to the model runner
    keys: list[BlockKey]  # cache keys of the leading full, computed blocks, in order
    num_slots: int  # token positions the table was sized for
    row: int  # its row in the manager's BlockTableRows


class KVCacheManager:
    """Allocates KV blocks to sequences; knows nothing of models or devices.

    A ``prefix`` returned by ``match_prefix`` is valid until the next call that takes blocks
    (allocate, append_slots, fork), so match and allocate one request back to back.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 watermark: float = 0.01) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark is a fraction of the blocks in [0, 1), got {watermark}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * num_blocks)
        self._pool = BlockPool(num_blocks)
        self._seqs: dict[Hashable, _SequenceBlocks] = {}
        self._rows = BlockTableRows()
        self._query_blocks = self._hit_blocks = 0
        self._query_tokens = self._hit_tokens = 0

    # ---- sizing and admission ----

    def blocks_needed(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def check_fits(self, num_tokens: int) -> None:
        """Raise RequestTooLargeError if ``num_tokens`` could never be admitted."""
        needed = self.blocks_needed(num_tokens)
        usable = self.num_blocks - self.watermark_blocks
        if needed > usable:
            raise RequestTooLargeError(num_tokens, needed, self.num_blocks, usable, self.block_size)

    def can_allocate(self, num_tokens: int, prefix: list[Block]) -> bool:
        taken = self._blocks_to_take(num_tokens, prefix)
        return self._pool.num_free - taken >= self.watermark_blocks

    # ---- prefix cache ----

    def match_prefix(self, token_ids: Sequence[int], extra_key: Hashable = None) -> list[Block]:
        """Cached blocks holding the longest full-block prefix, never covering the last token."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = max(len(token_ids) - 1, 0) // bs
        hits: list[Block] = []
        parent: BlockKey | None = None
        for index in range(max_blocks):
            block = self._pool.lookup(BlockKey.for_block(parent, token_ids, index, bs, extra_key))
            if block is None:
                break
            hits.append(block)
            parent = block.cache_key  # the indexed key object, so the next compare is by identity
        return hits

    def record_prefix_query(self, num_tokens: int, prefix: list[Block]) -> None:
        """Count a lookup (its ``match_prefix`` result) for the hit rate, once its sequence is
        allocated: a request that waits is looked up at every step, but queries once."""
        if not self.enable_prefix_caching:
            return
        self._query_blocks += max(num_tokens - 1, 0) // self.block_size
        self._query_tokens += num_tokens
        self._hit_blocks += len(prefix)
        self._hit_tokens += len(prefix) * self.block_size

    def cache_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int,
                     extra_key: Hashable = None) -> None:
        """Index the sequence's blocks that are full and computed; idempotent."""
        if not self.enable_prefix_caching:
            return
        seq = self._seq(seq_id)
        num_full = min(num_computed, len(token_ids)) // self.block_size
        if num_full > len(seq.blocks):
            raise ValueError(
                f"sequence {seq_id!r} has {len(seq.blocks)} blocks but {num_full} full computed "
                f"blocks were reported; allocate or append_slots before caching"
            )
        for index in range(len(seq.keys), num_full):
            parent = seq.keys[-1] if seq.keys else None
            key = BlockKey.for_block(parent, token_ids, index, self.block_size, extra_key)
            seq.keys.append(self._pool.register(seq.blocks[index], key))

    # ---- sequence lifetime ----

    def allocate(self, seq_id: Hashable, num_tokens: int, prefix: list[Block]) -> None:
        """New block table: the prefix blocks (referenced), then fresh blocks up to num_tokens."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks; free it first")
        taken = self._blocks_to_take(num_tokens, prefix)
        if taken > self._pool.num_free:
            raise OutOfBlocksError(
                f"sequence {seq_id!r} needs {taken} free blocks, {self._pool.num_free} are free; "
                f"check can_allocate first"
            )
        for block in prefix:
            self._pool.acquire(block)
        blocks = prefix + self._pool.take(self.blocks_needed(num_tokens) - len(prefix))
        keys = [block.cache_key for block in prefix]
        self._add(seq_id, blocks, keys, num_tokens)

    def append_slots(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow the table to hold ``num_tokens`` slots; False (and no change) if blocks run out."""
        seq = self._seq(seq_id)
        if num_tokens > seq.num_slots:
            missing = -(-num_tokens // self.block_size) - len(seq.blocks)
            if missing > self._pool.num_free:
                return False
            if missing > 0:
                fresh = self._pool.take(missing)
                seq.blocks.extend(fresh)
                seq.block_ids.extend(block.block_id for block in fresh)
                self._rows.extend(seq.row, seq.block_ids)
            seq.num_slots = num_tokens
        return True

    def blocks_to_fork(self, seq_id: Hashable) -> int:
        """Free blocks a fork of this sequence takes: 1 if its last block is partial, else 0."""
        return 1 if self._seq(seq_id).num_slots % self.block_size else 0

    def fork(self, parent_id: Hashable, child_id: Hashable) -> list[tuple[int, int]]:
        """Child shares the parent's full blocks; a partial last block is copied to a fresh one.

        Returns ``(src_block_id, dst_block_id)`` pairs whose KV the caller must copy.
        Raises OutOfBlocksError (and changes nothing) if the copy has no free block.
        """
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already has blocks; fork into a new id")
        if self.blocks_to_fork(parent_id) > self._pool.num_free:
            raise OutOfBlocksError(
                f"no free block to fork sequence {parent_id!r} into {child_id!r}")
        num_full = parent.num_slots // self.block_size
        blocks = parent.blocks[:num_full]
        for block in blocks:
            self._pool.acquire(block)
        copies: list[tuple[int, int]] = []
        if num_full < len(parent.blocks):
            fresh = self._pool.take(1)[0]
            copies.append((parent.blocks[num_full].block_id, fresh.block_id))
            blocks.append(fresh)
        self._add(child_id, blocks, parent.keys[:num_full], parent.num_slots)
        return copies

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence's blocks tail first, so its prefix stays cached longest."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"sequence {seq_id!r} has no blocks (never allocated or already freed)")
        self._rows.remove(seq.row)
        self._pool.release(reversed(seq.blocks))

    # ---- what the model runner reads ----

    def has_sequence(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's block ids (the live list: read it, do not modify it)."""
        return self._seq(seq_id).block_ids

    def padded_block_tables(self, seq_ids: Sequence[Hashable]) -> np.ndarray:
        """The sequences' block tables as int32 ``[len(seq_ids), width]``, zero-padded to the
        longest (a copy)."""
        return self._rows.gather([self._seq(seq_id).row for seq_id in seq_ids])

    def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Cache slots (``block_id * block_size + offset``) of positions ``[start, end)``."""
        table = self._seq(seq_id).block_ids
        bs = self.block_size
        if not 0 <= start <= end <= len(table) * bs:
            raise ValueError(
                f"positions [{start}, {end}) are outside sequence {seq_id!r}'s "
                f"{len(table) * bs} slots; append_slots first"
            )
        if end - start == 1:  # decode: one token
            return [table[start // bs] * bs + start % bs]
        if start == end:
            return []
        # One C-level range per block rather than one Python step per token.
        block_ids = table[start // bs:(end - 1) // bs + 1]
        firsts = [block_id * bs for block_id in block_ids]
        lasts = [first + bs for first in firsts]
        firsts[0] += start % bs
        lasts[-1] -= bs - 1 - (end - 1) % bs
        return list(chain.from_iterable(map(range, firsts, lasts)))

    # ---- metrics ----

    @property
    def pool(self) -> BlockPool:
        """The underlying pool, for inspection (metrics, tests); change it only through here."""
        return self._pool

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self._pool.num_free / self.num_blocks

    def stats(self) -> KVCacheStats:
        free = self._pool.num_free
        return KVCacheStats(
            num_blocks=self.num_blocks, used=self.num_blocks - free, free=free,
            cached=len(self._pool.cached),
            prefix_query_blocks=self._query_blocks, prefix_hit_blocks=self._hit_blocks,
            prefix_query_tokens=self._query_tokens, prefix_hit_tokens=self._hit_tokens,
            evictions=self._pool.num_evictions,
        )

    # ---- helpers ----

    def _add(self, seq_id: Hashable, blocks: list[Block], keys: list[BlockKey],
             num_slots: int) -> None:
        block_ids = [b.block_id for b in blocks]
        self._seqs[seq_id] = _SequenceBlocks(blocks, block_ids, keys, num_slots,
                                             self._rows.add(block_ids))

    def _seq(self, seq_id: Hashable) -> _SequenceBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id!r} has no blocks; allocate it first") from None

    def _blocks_to_take(self, num_tokens: int, prefix: list[Block]) -> int:
        """Free blocks an allocation takes: fresh ones plus prefix blocks now on the free list."""
        fresh = self.blocks_needed(num_tokens) - len(prefix)
        if fresh < 0:
            raise ValueError(
                f"a prefix of {len(prefix)} blocks holds more than the {num_tokens} tokens "
                f"asked for"
            )
        for block in prefix:
            if block.cache_key is None:
                raise ValueError(
                    f"prefix block {block.block_id} was evicted since match_prefix; "
                    f"call match_prefix right before can_allocate/allocate"
                )
        return fresh + sum(1 for block in prefix if block.ref_count == 0)
