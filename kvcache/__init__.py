"""Block-paged KV cache memory: block pool, prefix cache, block tables, layout and sizing."""
