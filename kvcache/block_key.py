"""BlockKey: the prefix-cache key of one full block, chained to its parent block's key."""
from __future__ import annotations

from collections.abc import Hashable, Sequence


class BlockKey:
    """(parent key, this block's token ids, extra key), hashed once.

    Equality compares the token ids and extra keys of the whole chain (stopping at the first
    shared ancestor object), so two different prefixes whose hashes collide are never equal and
    the cache dict can never hand out another prefix's blocks.
    """

    __slots__ = ("parent", "token_ids", "extra", "_hash")

    def __init__(self, parent: BlockKey | None, token_ids: tuple[int, ...], extra: Hashable = None):
        self.parent = parent
        self.token_ids = token_ids
        self.extra = extra
        parent_hash = None if parent is None else parent._hash
        self._hash = hash((parent_hash, token_ids, extra))

    @classmethod
    def for_block(cls, parent: BlockKey | None, token_ids: Sequence[int], index: int,
                  block_size: int, extra: Hashable = None) -> BlockKey:
        """The key of block ``index`` of ``token_ids`` (which must be full)."""
        start = index * block_size
        return cls(parent, tuple(token_ids[start:start + block_size]), extra)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockKey):
            return NotImplemented
        mine: BlockKey | None = self
        theirs: BlockKey | None = other
        # Iterative, not recursive: chains are as long as the prompt is in blocks.
        while mine is not theirs:
            if mine is None or theirs is None:
                return False
            if (mine._hash != theirs._hash or mine.token_ids != theirs.token_ids
                    or mine.extra != theirs.extra):
                return False
            mine, theirs = mine.parent, theirs.parent
        return True

    def __repr__(self) -> str:
        return f"BlockKey(hash={self._hash:#x}, tokens={len(self.token_ids)}, extra={self.extra!r})"
