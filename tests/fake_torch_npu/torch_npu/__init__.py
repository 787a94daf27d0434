"""A strict CPU fake of the few torch_npu ops pagedserve calls. Tests only.

It implements, on the CPU and in float32, the documented semantics of
``npu_scatter_pa_kv_cache``, ``_npu_reshape_and_cache`` and ``npu_fused_infer_attention_score``
(paged KV, TND layout), and rejects every call that breaks the documented contract: dtypes,
contiguity, shapes and layouts (the scatter's NZ default cache_mode), block-size rules, head
sizes, cumulative vs per-request lengths, the compressed causal mask and sparse_mode, head
counts, batch size. Where the documentation leaves a case open
the fake is stricter than the op (e.g. int32-only slot mappings, in-range block ids).

This proves our calls, not the hardware: numerics, performance and undocumented behaviour of
real NPUs are untested by it. Its "npu" device is the CPU (``simulated_device``), so it cannot
catch a tensor left on the host.

Use: put tests/fake_torch_npu first on sys.path (or PYTHONPATH, which Ray workers inherit).
``FAKE_NPU_DEVICE_COUNT`` and ``FAKE_NPU_TOTAL_BYTES`` size the simulated devices.
"""
from __future__ import annotations

import collections
import functools

import torch

from . import npu  # noqa: F401  (torch_npu.npu, as in the real package)

__version__ = torch.__version__.split("+")[0] + ".fake"
simulated_device = "cpu"

HALF_DTYPES = (torch.float16, torch.bfloat16)
MASK_SIZE = 2048
MAX_BATCH = 4096  # TND: at most this many entries in actual_seq_lengths(_kv)
TND_HEAD_DIMS = (64, 128, 192)
CANN_VERSION = "8.3.RC1"  # what the real package puts in torch.version.cann on import
if getattr(torch.version, "cann", None) is None:
    torch.version.cann = CANN_VERSION
MAX_TOKENS = 1 << 20

# The last calls, newest last: (op name, {argument: value}). Tests read it; nothing else does.
CALL_LOG: collections.deque = collections.deque(maxlen=256)

_FIA_DEFAULTS = {
    "pse_shift": None, "dequant_scale1": None, "quant_scale1": None, "dequant_scale2": None,
    "quant_scale2": None, "quant_offset2": None, "antiquant_scale": None, "antiquant_offset": None,
    "query_padding_size": None, "kv_padding_size": None, "key_antiquant_scale": None,
    "key_antiquant_offset": None, "value_antiquant_scale": None, "value_antiquant_offset": None,
    "key_shared_prefix": None, "value_shared_prefix": None, "actual_shared_prefix_len": None,
    "query_rope": None, "key_rope": None, "key_rope_antiquant_scale": None,
    "pre_tokens": 2147483647, "next_tokens": 2147483647, "inner_precise": 0,
    "antiquant_mode": 0, "key_antiquant_mode": 0, "value_antiquant_mode": 0,
}


class ContractError(RuntimeError):
    """A call that the documented op contract does not allow."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractError(message)


def _require_half(name: str, tensor: torch.Tensor) -> None:
    _require(tensor.dtype in HALF_DTYPES, f"{name} must be float16 or bfloat16, got {tensor.dtype}")


def _require_contiguous(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        _require(tensor.is_contiguous(), f"{name} must be contiguous")


# ---- K/V cache writes ------------------------------------------------------------------------


def _check_kv_write(key, value, key_cache, value_cache, slots, slots_name: str) -> None:
    _require_contiguous(key=key, value=value, key_cache=key_cache, value_cache=value_cache,
                        **{slots_name: slots})
    _require(key.dim() == 3 and value.dim() == 3, "key/value must be [tokens, kv_heads, head_dim]")
    _require(key.shape[:2] == value.shape[:2], "key and value must agree on [tokens, kv_heads]")
    _require(key_cache.dim() == 4 and value_cache.dim() == 4,
             "caches must be 4-D [num_blocks, block_size, kv_heads, head_dim] (Norm layout)")
    _require(key_cache.shape[2:] == key.shape[1:] and value_cache.shape[2:] == value.shape[1:],
             "cache [kv_heads, head_dim] must match key/value")
    _require(key_cache.shape[:2] == value_cache.shape[:2], "key and value caches must share blocks")
    _require_half("key", key)
    _require(value.dtype == key_cache.dtype == value_cache.dtype == key.dtype,
             "key, value and both caches must have one dtype")
    _require(slots.dtype == torch.int32, f"{slots_name} must be int32, got {slots.dtype}")
    _require(slots.dim() == 1 and slots.numel() == key.shape[0],
             f"{slots_name} must be [tokens] ({key.shape[0]}), got {tuple(slots.shape)}")
    capacity = key_cache.shape[0] * key_cache.shape[1]
    if slots.numel():
        _require(int(slots.min()) >= 0 and int(slots.max()) < capacity,
                 f"{slots_name} values must be in [0, {capacity}); -1 is not accepted")
        _require(slots.unique().numel() == slots.numel(), f"{slots_name} values must be unique")


def _scatter(key, value, key_cache, value_cache, slots) -> None:
    index = slots.long()
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, index, key)
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, index, value)


def npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *,
                            compress_lens=None, compress_seq_offsets=None, seq_lens=None,
                            cache_mode="PA_NZ"):
    """Write key/value rows into the caches at slot_mapping, in place; returns None. The
    documented default cache_mode is the NZ layout: a plain 4-D cache needs "Norm" passed."""
    CALL_LOG.append(("npu_scatter_pa_kv_cache", {"slot_mapping": slot_mapping, "cache_mode": cache_mode}))
    _require(cache_mode == "Norm", f"the fake models cache_mode='Norm' only, got {cache_mode!r}")
    _require(compress_lens is None and compress_seq_offsets is None and seq_lens is None,
             "compression arguments are not modelled by the fake")
    _check_kv_write(key, value, key_cache, value_cache, slot_mapping, "slot_mapping")
    _scatter(key, value, key_cache, value_cache, slot_mapping)


def _npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices):
    """The older ATB ReshapeAndCache op: same write, in place; returns None."""
    CALL_LOG.append(("_npu_reshape_and_cache", {"slot_indices": slot_indices}))
    _check_kv_write(key, value, key_cache, value_cache, slot_indices, "slot_indices")
    _scatter(key, value, key_cache, value_cache, slot_indices)


# ---- fused infer attention -------------------------------------------------------------------

_validated_mask: tuple | None = None  # (data_ptr, version) of the last mask found correct


@functools.cache
def _expected_mask() -> torch.Tensor:
    return torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool), diagonal=1)


def _check_causal_mask(mask) -> None:
    global _validated_mask
    _require(mask is not None, "sparse_mode=3 needs the compressed causal atten_mask")
    _require(mask.dtype in (torch.bool, torch.int8, torch.uint8),
             f"atten_mask must be bool, int8 or uint8, got {mask.dtype}")
    _require(tuple(mask.shape[-2:]) == (MASK_SIZE, MASK_SIZE) and mask.numel() == MASK_SIZE**2,
             f"sparse_mode=3 needs a ({MASK_SIZE}, {MASK_SIZE}) mask, got {tuple(mask.shape)}")
    _require_contiguous(atten_mask=mask)
    stamp = (mask.data_ptr(), mask._version)
    if stamp != _validated_mask:
        _require(torch.equal(mask.reshape(MASK_SIZE, MASK_SIZE).bool(), _expected_mask()),
                 "atten_mask must be triu(ones(2048, 2048), diagonal=1) (1 = masked)")
        _validated_mask = stamp


def _check_lengths(name: str, values, batch: int | None = None) -> list[int]:
    _require(isinstance(values, (list, tuple)), f"{name} must be a list of ints, got {type(values).__name__}")
    _require(all(isinstance(v, int) and not isinstance(v, bool) for v in values),
             f"{name} must hold Python ints")
    _require(all(v >= 0 for v in values), f"{name} must not be negative")
    if batch is not None:
        _require(len(values) == batch, f"{name} must have one entry per request ({batch}), got {len(values)}")
    return list(values)


def _check_fia(query, key, value, *, atten_mask, block_table, input_layout, block_size,
               actual_seq_lengths, actual_seq_lengths_kv, num_heads, num_key_value_heads,
               sparse_mode) -> tuple[list[int], list[int], int]:
    _require(input_layout == "TND", f"the fake models input_layout='TND' only, got {input_layout!r}")
    _require_contiguous(query=query, key=key, value=value)
    _require(query.dim() == 3, "TND query must be [tokens, heads, head_dim]")
    tokens, heads, head_dim = query.shape
    _require(1 <= tokens <= MAX_TOKENS, f"TND needs 1..{MAX_TOKENS} query tokens, got {tokens}")
    _require_half("query", query)
    _require(key.dtype == value.dtype == query.dtype, "query, key and value must have one dtype")
    kv_heads = num_key_value_heads or num_heads
    _require(heads == num_heads, f"num_heads={num_heads} but the query has {heads} heads")
    _require(num_heads <= 256, f"num_heads must be at most 256, got {num_heads}")
    _require(num_heads % kv_heads == 0 and num_heads // kv_heads <= 64,
             f"num_heads ({num_heads}) must be a multiple of num_key_value_heads ({kv_heads}), ratio <= 64")
    _require(head_dim in TND_HEAD_DIMS, f"TND takes head_dim {TND_HEAD_DIMS}, got {head_dim}")

    _require(block_table is not None, "the fake models the paged (block_table) form only")
    _require(key.dim() == 3 and key.shape == value.shape,
             "paged key/value must be one shape [num_blocks, block_size, kv_heads*head_dim]")
    _require(key.shape[2] == kv_heads * head_dim,
             f"cache hidden size {key.shape[2]} != num_key_value_heads*head_dim ({kv_heads * head_dim})")
    _require(key.shape[2] <= 65535, "kv_heads*head_dim must be at most 65535 in this cache layout")
    _require(block_size == key.shape[1], f"block_size={block_size} but the caches hold {key.shape[1]}")
    _require(block_table.dtype == torch.int32, f"block_table must be int32, got {block_table.dtype}")
    _require(block_table.dim() == 2, "block_table must be [batch, max_blocks_per_seq]")
    _require_contiguous(block_table=block_table)

    ends = _check_lengths("actual_seq_lengths", actual_seq_lengths)
    batch = len(ends)
    _require(1 <= batch <= MAX_BATCH, f"batch must be 1..{MAX_BATCH}, got {batch}")
    _require(all(a <= b for a, b in zip(ends, ends[1:])),
             "actual_seq_lengths must be nondecreasing cumulative query ends")
    _require(ends[-1] == tokens, f"actual_seq_lengths[-1]={ends[-1]} must equal the query's {tokens} tokens")
    kv_lens = _check_lengths("actual_seq_lengths_kv", actual_seq_lengths_kv, batch)
    q_lens = [b - a for a, b in zip([0] + ends[:-1], ends)]
    _require(all(q <= kv for q, kv in zip(q_lens, kv_lens)),
             "each request's query length must not exceed its actual_seq_lengths_kv")

    _require(block_table.shape[0] == batch, f"block_table has {block_table.shape[0]} rows for {batch} requests")
    blocks_needed = [-(-kv // block_size) for kv in kv_lens]
    _require(block_table.shape[1] >= max(blocks_needed),
             f"block_table is {block_table.shape[1]} wide; a request needs {max(blocks_needed)} blocks")
    _require(sum(blocks_needed) <= key.shape[0], "the caches hold fewer blocks than the requests need")
    for row, needed in enumerate(blocks_needed):
        ids = block_table[row, :needed]
        _require(needed == 0 or (int(ids.min()) >= 0 and int(ids.max()) < key.shape[0]),
                 f"block_table row {row} points outside the {key.shape[0]} cache blocks")

    multi_token = any(q > 1 for q in q_lens)
    if multi_token:
        _require(block_size % 128 == 0 and 128 <= block_size <= 512,
                 f"block_size={block_size}: paged attention with >1 query token needs a multiple of 128 in 128..512")
        _require(head_dim % 16 == 0, f"head_dim={head_dim} must be 16-aligned for float16/bfloat16")
    else:
        _require(block_size % 16 == 0, f"block_size={block_size} must be 16-aligned")

    _require(sparse_mode in (0, 3), f"TND supports sparse_mode 0 (no mask) or 3 only, got {sparse_mode}")
    if sparse_mode == 0:
        _require(atten_mask is None, "TND with sparse_mode=0 takes no atten_mask")
    else:
        _check_causal_mask(atten_mask)
    return ends, kv_lens, kv_heads


def npu_fused_infer_attention_score(query, key, value, *, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, block_table=None, num_heads=1,
                                    scale=1.0, input_layout="BSH", num_key_value_heads=0,
                                    sparse_mode=0, block_size=0, softmax_lse_flag=False, **rest):
    """softmax(scale * q k^T + mask) v over paged KV; returns (attention_out, softmax_lse)."""
    CALL_LOG.append(("npu_fused_infer_attention_score", {
        "atten_mask": atten_mask, "sparse_mode": sparse_mode, "actual_seq_lengths": actual_seq_lengths,
        "actual_seq_lengths_kv": actual_seq_lengths_kv, "block_size": block_size,
    }))
    for name, given in rest.items():
        if name not in _FIA_DEFAULTS:
            raise TypeError(f"npu_fused_infer_attention_score() got an unexpected keyword argument {name!r}")
        _require(not torch.is_tensor(given) and given == _FIA_DEFAULTS[name],
                 f"{name} is not modelled by the fake")
    _require(isinstance(scale, float), f"scale must be a float, got {type(scale).__name__}")
    ends, kv_lens, kv_heads = _check_fia(
        query, key, value, atten_mask=atten_mask, block_table=block_table, input_layout=input_layout,
        block_size=block_size, actual_seq_lengths=actual_seq_lengths,
        actual_seq_lengths_kv=actual_seq_lengths_kv, num_heads=num_heads,
        num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode)
    out, lse = _paged_attention(query, key, value, block_table, ends, kv_lens, kv_heads, scale,
                                causal=sparse_mode == 3, with_lse=softmax_lse_flag)
    return out.to(query.dtype), lse


def _paged_attention(query, key, value, block_table, ends, kv_lens, kv_heads, scale, causal, with_lse):
    """Float32 out [T, N, D] and softmax_lse: [T, N, 1] when asked for, else a [1] zero."""
    tokens, heads, head_dim = query.shape
    group = heads // kv_heads
    out = torch.zeros(tokens, heads, head_dim, dtype=torch.float32)
    lse = torch.full((tokens, heads, 1), float("-inf")) if with_lse else torch.zeros(1)
    start = 0
    for row, (end, kv_len) in enumerate(zip(ends, kv_lens)):
        q_len = end - start
        if q_len and kv_len:
            ids = block_table[row, : -(-kv_len // key.shape[1])].long()
            k = key[ids].reshape(-1, kv_heads, head_dim)[:kv_len].float().repeat_interleave(group, 1)
            v = value[ids].reshape(-1, kv_heads, head_dim)[:kv_len].float().repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", query[start:end].float(), k) * scale
            if causal:  # right-down aligned: query i sees keys up to kv_len - q_len + i
                limit = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
                scores = scores.masked_fill(torch.arange(kv_len).unsqueeze(0) > limit, float("-inf"))
            if with_lse:
                lse[start:end] = torch.logsumexp(scores, dim=-1).transpose(0, 1).unsqueeze(-1)
            out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
        start = end
    return out, lse
