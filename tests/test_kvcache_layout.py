"""KV cache layout and sizing, checked against real torch tensors of the stated shape."""
from __future__ import annotations

import pytest
import torch

from kvcache import (bytes_per_block, describe_cache, dtype_size, kv_cache_shape,
                     num_blocks_for_budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_bytes_per_block_equals_the_tensors_it_describes(dtype):
    layers, block_size, kv_heads, head_dim, blocks = 3, 16, 2, 8, 5
    shape = kv_cache_shape(blocks, block_size, kv_heads, head_dim)
    caches = [torch.empty(shape, dtype=dtype) for _ in range(layers) for _kv in ("k", "v")]
    total = sum(t.numel() * t.element_size() for t in caches)
    assert total == blocks * bytes_per_block(layers, block_size, kv_heads, head_dim, dtype)


@pytest.mark.parametrize("name,dtype", [("float16", torch.float16),
                                        ("torch.bfloat16", torch.bfloat16),
                                        ("fp32", torch.float32), ("int8", torch.int8)])
def test_dtype_names_size_like_torch_dtypes(name, dtype):
    assert dtype_size(name) == dtype_size(dtype) == torch.empty(0, dtype=dtype).element_size()


def test_unknown_dtype_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="bfloat16"):
        dtype_size("float12")


def test_num_blocks_for_budget_floors_to_whole_blocks():
    per_block = bytes_per_block(32, 16, 8, 128, torch.float16)
    assert num_blocks_for_budget(10 * per_block + per_block - 1, per_block) == 10
    assert num_blocks_for_budget(per_block, per_block) == 1


def test_a_budget_below_one_block_is_an_actionable_error():
    with pytest.raises(ValueError, match=r"holds no block of 4096 bytes.*at least 4096"):
        num_blocks_for_budget(4095, 4096)


def test_sizes_must_be_positive():
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv_cache_shape(4, 16, 0, 64)
    with pytest.raises(ValueError, match="num_layers"):
        bytes_per_block(0, 16, 2, 64, "float16")


def test_describe_cache_reports_token_capacity():
    line = describe_cache(num_blocks=100, block_size=16, bytes_per_block=1 << 20)
    assert "100 blocks" in line and "1600 tokens" in line and "0.10 GiB" in line
