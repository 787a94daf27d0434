"""Readable pure-torch paged attention: query tiles x key tiles with an online softmax."""
from __future__ import annotations

import torch

from worker.attention import SelfAttentionParams

QUERY_TILE = 128  # query tokens per tile
KEY_TILE = 512  # KV positions per tile (rounded up to whole cache blocks)


def attend_sequence_tiled(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_len: int,
    params: SelfAttentionParams,
    out: torch.Tensor,
) -> None:
    """Causal attention of one sequence's query tokens ``[q_len, head_num, d]`` (the last q_len of
    its kv_len positions) over its paged K/V, written into ``out`` (shaped like query). Scores
    exist one tile at a time: memory grows linearly with the sequence, never as q_len x kv_len."""
    q_len = query.shape[0]
    kv_heads, group = params.kv_head_num, params.head_num // params.kv_head_num
    for q_start in range(0, q_len, QUERY_TILE):
        q_end = min(q_len, q_start + QUERY_TILE)
        n = q_end - q_start
        # A KV head's rows are its (query token, head in group) pairs: [kv_heads, n * group, d].
        rows = query[q_start:q_end].float().view(n, kv_heads, group, -1).transpose(0, 1)
        rows = rows.reshape(kv_heads, n * group, -1) * params.qk_scale
        first_pos = kv_len - q_len + q_start
        result = _attend_query_tile(rows, key_cache, value_cache, block_table, first_pos, group)
        out[q_start:q_end] = result.view(kv_heads, n, group, -1).transpose(0, 1).flatten(1, 2)


def _attend_query_tile(rows, key_cache, value_cache, block_table, first_pos, group):
    """Rows ``[kv_heads, n * group, d]`` of n query tokens at positions first_pos.. over keys
    0..first_pos + n - 1, one key tile at a time with a running max and sum per row."""
    kv_heads, num_rows, head_dim = rows.shape
    last_visible = first_pos + num_rows // group - 1
    query_pos = first_pos + torch.arange(num_rows) // group
    running_max = torch.full((kv_heads, num_rows, 1), float("-inf"))
    running_sum = torch.zeros((kv_heads, num_rows, 1))
    acc = torch.zeros((kv_heads, num_rows, head_dim))
    # Tiles go in position order and position 0 is visible to every query, so after the first
    # tile every running max is finite and exp(old_max - new_max) never meets inf - inf.
    tiles = _key_tiles(key_cache, value_cache, block_table, last_visible + 1)
    for key_start, keys, values in tiles:
        scores = rows @ keys.transpose(1, 2)  # [kv_heads, rows, keys]
        key_pos = key_start + torch.arange(keys.shape[1])
        if key_pos[-1] > first_pos:  # the tile reaches past some query: mask the future
            scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        rescale = torch.exp(running_max - new_max)
        probs = scores.sub_(new_max).exp_()
        running_sum = running_sum * rescale + probs.sum(dim=-1, keepdim=True)
        acc = acc * rescale + probs @ values
        running_max = new_max
    return acc / running_sum


def _key_tiles(key_cache, value_cache, block_table, kv_end):
    """Yield (first position, keys, values) for positions [0, kv_end) in tiles of whole blocks;
    keys and values come as fp32 ``[kv_heads, tile_len, d]``."""
    block_size = key_cache.shape[1]
    blocks_per_tile = max(1, KEY_TILE // block_size)
    num_blocks = -(-kv_end // block_size)
    for first_block in range(0, num_blocks, blocks_per_tile):
        ids = block_table[first_block:min(num_blocks, first_block + blocks_per_tile)].long()
        key_start = first_block * block_size
        tile_len = min(kv_end - key_start, ids.shape[0] * block_size)
        keys = _tile_from_blocks(key_cache, ids, tile_len)
        values = _tile_from_blocks(value_cache, ids, tile_len)
        yield key_start, keys, values


def _tile_from_blocks(cache, block_ids, tile_len):
    # index_select, not cache[block_ids]: same result, many times faster on CPU.
    tile = cache.index_select(0, block_ids).flatten(0, 1)[:tile_len]  # [tile_len, kv_heads, d]
    return tile.float().transpose(0, 1)
