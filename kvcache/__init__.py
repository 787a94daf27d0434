"""Block-paged KV cache memory: block pool, prefix cache, block tables, layout and sizing."""
from kvcache.block_key import BlockKey
from kvcache.block_pool import Block, BlockPool
from kvcache.errors import OutOfBlocksError, RequestTooLargeError
from kvcache.layout import (bytes_per_block, describe_cache, dtype_size, kv_cache_shape,
                            num_blocks_for_budget)
from kvcache.manager import KVCacheManager
from kvcache.stats import KVCacheStats

__all__ = [
    "Block", "BlockKey", "BlockPool", "KVCacheManager", "KVCacheStats", "OutOfBlocksError",
    "RequestTooLargeError", "bytes_per_block", "describe_cache", "dtype_size", "kv_cache_shape",
    "num_blocks_for_budget",
]
