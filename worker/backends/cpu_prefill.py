"""Long-query path of the CPU backend: one sequence's K/V gathered once, then torch's flash SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.attention import SelfAttentionParams

# Query tokens per SDPA call when a cached prefix forces an explicit mask: bounds the mask at
# QUERY_TILE x kv_len booleans instead of q_len x kv_len.
QUERY_TILE = 512


def attend_sequence_sdpa(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_len: int,
    params: SelfAttentionParams,
    out: torch.Tensor,
    step_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Causal attention of one sequence's ``[q_len, head_num, d]`` queries (its last q_len
    positions) over its paged K/V, written into ``out``.

    For a long prefill the O(kv_len) copy of its blocks is small next to the O(q_len x kv_len)
    work, and torch's CPU flash attention beats a hand-written tiling; it keeps memory linear.
    ``step_kv``: the ``[q_len, kv_head_num, d]`` keys and values this step wrote for the
    sequence, in the cache's dtype; when they are all its keys (no cached prefix) they are
    used as they are instead of being gathered back from the blocks.
    """
    q_len = query.shape[0]
    if step_kv is not None and q_len == kv_len:
        keys, values = (rows.transpose(0, 1).unsqueeze(0).to(query.dtype) for rows in step_kv)
    else:
        keys = _gather(key_cache, block_table, kv_len).to(query.dtype)
        values = _gather(value_cache, block_table, kv_len).to(query.dtype)
    # SDPA's fast CPU kernel wants 4-d [batch, heads, tokens, d]; 3-d inputs take a slow path.
    q = query.transpose(0, 1).unsqueeze(0)
    if q_len == kv_len:  # no cached prefix: SDPA's own (top-left aligned) causal mask is right
        attended = F.scaled_dot_product_attention(
            q, keys, values, is_causal=True, scale=params.qk_scale, enable_gqa=True
        )
        out.copy_(attended[0].transpose(0, 1))
        return
    first_pos = kv_len - q_len
    for start in range(0, q_len, QUERY_TILE):
        end = min(q_len, start + QUERY_TILE)
        visible = first_pos + end  # keys this tile's last query sees
        query_pos = torch.arange(first_pos + start, first_pos + end)
        mask = torch.arange(visible)[None, :] <= query_pos[:, None]
        attended = F.scaled_dot_product_attention(
            q[:, :, start:end], keys[:, :, :visible], values[:, :, :visible],
            attn_mask=mask, scale=params.qk_scale, enable_gqa=True,
        )
        out[start:end] = attended[0].transpose(0, 1)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The sequence's first kv_len positions as ``[1, kv_heads, kv_len, d]``, contiguous."""
    num_blocks = -(-kv_len // cache.shape[1])
    ids = block_table[:num_blocks].long()
    tokens = cache.index_select(0, ids).flatten(0, 1)[:kv_len]  # [kv_len, kv_heads, d]
    return tokens.transpose(0, 1).contiguous().unsqueeze(0)
