"""CUDA attention backend: per-sequence torch SDPA over the sequence's gathered KV blocks.

Simple by design: gather a sequence's blocks, then one fused SDPA call with a bottom-right
aligned causal bias, so no [q, kv] mask is materialised. The math is device-agnostic, which is
how the tests check it on the CPU; ``pagedserve selftest --device cuda`` checks it on a GPU.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from worker.attention import (
    AttentionBackend,
    AttentionMetadata,
    SelfAttentionParams,
    copy_into_slots,
    written_rows,
)
from worker.device import DeviceUnavailableError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CudaBackend(AttentionBackend):
    name = "cuda"

    def __init__(self, device: torch.device | str = "cuda:0") -> None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "no CUDA device is visible: install a CUDA build of torch and check nvidia-smi"
            )
        super().__init__(device)

    def check_config(
        self, block_size: int, head_num: int, kv_head_num: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if kv_head_num < 1 or head_num % kv_head_num:
            raise ValueError(f"kv_head_num={kv_head_num} must divide head_num={head_num}")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={dtype} is not served on cuda: use float16, bfloat16 or float32")

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        return dataclasses.replace(
            meta,
            slot_mapping=meta.slot_mapping.to(self.device),
            block_tables=meta.block_tables.to(self.device),
        )

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        rows, slots = written_rows(slot_mapping)
        copy_into_slots(key, value, key_cache, value_cache, rows, slots.long())

    def attend(self, query, key_cache, value_cache, meta: AttentionMetadata, params: SelfAttentionParams):
        out = torch.zeros_like(query)
        block_size = key_cache.shape[1]
        group = params.head_num // params.kv_head_num
        for i, kv_len in enumerate(meta.seq_lens):
            q0, q1 = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if q1 == q0:
                continue
            ids = meta.block_tables[i, : -(-kv_len // block_size)].long()
            k = _gathered(key_cache, ids, kv_len, group)
            v = _gathered(value_cache, ids, kv_len, group)
            q = query[q0:q1].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, d]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=_causal_bias(q1 - q0, kv_len), scale=params.qk_scale
            )
            out[q0:q1] = o.squeeze(0).transpose(0, 1)
        return out


def _gathered(cache: torch.Tensor, block_ids: torch.Tensor, kv_len: int, group: int) -> torch.Tensor:
    """A sequence's first kv_len cached rows as [1, heads, kv_len, d], kv heads repeated for GQA."""
    rows = cache.index_select(0, block_ids).flatten(0, 1)[:kv_len]  # [kv_len, kv_heads, d]
    return rows.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)


def _causal_bias(q_len: int, kv_len: int):
    """Query i (of q_len, the last tokens of kv_len) sees keys <= kv_len - q_len + i."""
    if q_len == 1:
        return None  # the newest token sees everything
    return causal_lower_right(q_len, kv_len)
