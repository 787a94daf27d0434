"""CPU attention backend (placeholder: a gather-then-SDPA version to be replaced by the real one)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.attention import AttentionBackend, AttentionMetadata, SelfAttentionParams


class CpuBackend(AttentionBackend):
    name = "cpu"

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping):
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slots, key[keep])
        value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slots, value[keep])

    def attend(self, query, key_cache, value_cache, meta: AttentionMetadata, params: SelfAttentionParams):
        out = torch.empty_like(query)
        block_size = key_cache.shape[1]
        group = params.head_num // params.kv_head_num
        for i, kv_len in enumerate(meta.seq_lens):
            q0, q1 = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            nblocks = -(-kv_len // block_size)
            ids = meta.block_tables[i, :nblocks].long()
            k = key_cache[ids].reshape(-1, params.kv_head_num, params.head_dim)[:kv_len]
            v = value_cache[ids].reshape(-1, params.kv_head_num, params.head_dim)[:kv_len]
            k = k.repeat_interleave(group, dim=1).transpose(0, 1)
            v = v.repeat_interleave(group, dim=1).transpose(0, 1)
            q = query[q0:q1].transpose(0, 1)
            qpos = torch.arange(kv_len - (q1 - q0), kv_len).unsqueeze(1)
            mask = torch.arange(kv_len).unsqueeze(0) <= qpos
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=params.qk_scale)
            out[q0:q1] = o.transpose(0, 1)
        return out
