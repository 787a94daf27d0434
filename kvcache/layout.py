"""KV cache tensor layout and sizing: shapes, bytes per block, blocks that fit a memory budget."""
from __future__ import annotations

_GIB = 1024 ** 3

# Element sizes by dtype name, for callers that give a string instead of a torch.dtype.
_DTYPE_BYTES = {
    "float64": 8, "double": 8,
    "float32": 4, "float": 4, "fp32": 4,
    "float16": 2, "half": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "int8": 1, "uint8": 1,
}


def dtype_size(dtype: object) -> int:
    """Bytes per element of a torch.dtype (anything with ``itemsize``) or a dtype name."""
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    if isinstance(dtype, str):
        size = _DTYPE_BYTES.get(dtype.removeprefix("torch.").lower())
        if size is not None:
            return size
    raise ValueError(
        f"unknown KV cache dtype {dtype!r}; pass a torch.dtype or one of {sorted(_DTYPE_BYTES)}"
    )


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int) -> tuple[int, int, int, int]:
    """Shape of one layer's K cache (and, separately, its V cache)."""
    _require_positive(num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
                      head_dim=head_dim)
    return (num_blocks, block_size, num_kv_heads, head_dim)


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: object) -> int:
    """Bytes one block id takes across the model: K and V, every layer."""
    _require_positive(num_layers=num_layers, block_size=block_size, num_kv_heads=num_kv_heads,
                      head_dim=head_dim)
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_size(dtype)


def num_blocks_for_budget(budget_bytes: int, bytes_per_block: int) -> int:
    """How many whole blocks fit in ``budget_bytes``; at least one or a ValueError."""
    if bytes_per_block < 1:
        raise ValueError(f"bytes_per_block must be >= 1, got {bytes_per_block}")
    num_blocks = int(budget_bytes // bytes_per_block)
    if num_blocks < 1:
        raise ValueError(
            f"a KV cache budget of {budget_bytes} bytes ({budget_bytes / _GIB:.3f} GiB) holds no "
            f"block of {bytes_per_block} bytes; raise the memory budget to at least "
            f"{bytes_per_block} bytes, or use a smaller block_size or KV dtype"
        )
    return num_blocks


def describe_cache(num_blocks: int, block_size: int, bytes_per_block: int) -> str:
    """One start-up line: blocks, token capacity and memory of the cache."""
    total = num_blocks * bytes_per_block
    return (f"KV cache: {num_blocks} blocks x {block_size} tokens = {num_blocks * block_size} "
            f"tokens, {total / _GIB:.2f} GiB ({bytes_per_block} bytes per block)")


def _require_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
