"""Block pool: every KV block object, the LRU free list, and the prefix-cache index."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from kvcache.block_key import BlockKey


@dataclass(slots=True, eq=False)
class Block:
    """One physical KV block. ``ref_count`` counts the block tables that hold it."""

    block_id: int
    ref_count: int = 0
    # Set while the block's content is indexed by the prefix cache; kept after the block is
    # freed (lazy eviction) and cleared only when the block is reused for something else.
    cache_key: BlockKey | None = None
    prev_free: Block | None = field(default=None, repr=False)
    next_free: Block | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks, O(1) at both ends and in the middle.

    The front is reused first; the back holds the most recently freed cached blocks.
    """

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.push_back(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Block]:
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free

    def push_back(self, block: Block) -> None:
        self._link(block, self._tail.prev_free, self._tail)

    def push_front(self, block: Block) -> None:
        self._link(block, self._head, self._head.next_free)

    def pop_front(self) -> Block:
        block = self._head.next_free
        assert block is not self._tail, "pop from an empty free list"
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not free"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def _link(self, block: Block, prev: Block, nxt: Block) -> None:
        assert block.prev_free is None and block.next_free is None, \
            f"block {block.block_id} is already free"
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self._len += 1


class BlockPool:
    """Owns all blocks; hands out free ones (evicting cached content lazily, LRU first)."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockKey, Block] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def take(self, count: int) -> list[Block]:
        """``count`` blocks from the front of the free list, each with one reference."""
        assert count <= self.num_free, f"asked for {count} blocks, {self.num_free} free"
        taken = []
        for _ in range(count):
            block = self.free_queue.pop_front()
            if block.cache_key is not None:
                self._evict(block)
            block.ref_count = 1
            taken.append(block)
        return taken

    def acquire(self, block: Block) -> None:
        """Add a reference to a cached block, taking it off the free list if it was free."""
        if block.ref_count == 0:
            self.free_queue.remove(block)
        block.ref_count += 1

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block, in the given order.

        A block that becomes free goes to the back of the free list if it holds cached content
        (least recently used is reused first), else to the front (it is worth nothing).
        """
        for block in blocks:
            assert block.ref_count > 0, f"block {block.block_id} released more than held"
            block.ref_count -= 1
            if block.ref_count:
                continue
            if block.cache_key is None:
                self.free_queue.push_front(block)
            else:
                self.free_queue.push_back(block)

    def lookup(self, key: BlockKey) -> Block | None:
        return self.cached.get(key)

    def register(self, block: Block, key: BlockKey) -> BlockKey:
        """Index ``block`` under ``key`` unless it, or an identical block, already is.

        Returns the key object now in the index, so children can chain to it.
        """
        if block.cache_key is not None:
            return block.cache_key
        existing = self.cached.get(key)
        if existing is not None:
            return existing.cache_key
        block.cache_key = key
        self.cached[key] = block
        return key

    def _evict(self, block: Block) -> None:
        removed = self.cached.pop(block.cache_key)
        assert removed is block, "prefix index pointed at another block"
        block.cache_key = None
        self.num_evictions += 1
