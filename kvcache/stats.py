"""KVCacheStats: a snapshot of block usage and prefix-cache counters."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class KVCacheStats:
    """Block counts now, and prefix-cache counters since start.

    ``cached`` counts blocks whose content is indexed (in use or free, not yet evicted).
    A query covers the blocks a prompt could hit (its full blocks before the last token) and
    all of its tokens; a hit counts the blocks found and the tokens they hold.
    """

    num_blocks: int
    used: int
    free: int
    cached: int
    prefix_query_blocks: int
    prefix_hit_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    evictions: int

    @property
    def prefix_hit_rate(self) -> float:
        """Fraction of queried prompt tokens served from the cache (0 before any query)."""
        if not self.prefix_query_tokens:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_query_tokens
