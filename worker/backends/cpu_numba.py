"""Numba kernel of the CPU backend: fp32 paged attention that reads cache blocks in place."""
from __future__ import annotations

import numba
import numpy as np

# Reassociation lets LLVM vectorise the head_dim dot products; no "nnan"/"ninf" because the
# kernel never produces infinities but must not be allowed to assume it away either.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_NEG_BIG = np.float32(-3.0e38)  # "minus infinity" that stays finite, so max - max is never NaN


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def paged_attention_fp32(
    query: np.ndarray,  # float32 [T, head_num, d]
    key_cache: np.ndarray,  # float32 [num_blocks, block_size, kv_head_num, d]
    value_cache: np.ndarray,  # same as key_cache
    block_tables: np.ndarray,  # int32 [B, max_blocks]
    query_start_loc: np.ndarray,  # int64 [B + 1]
    seq_lens: np.ndarray,  # int64 [B]
    part_seq: np.ndarray,  # int64 [P]: the sequence each KV partition belongs to
    part_kv_start: np.ndarray,  # int64 [P]: first KV position of the partition
    part_kv_end: np.ndarray,  # int64 [P]: one past its last KV position
    seq_part_start: np.ndarray,  # int64 [S + 1]: partitions of served sequence s are contiguous
    qk_scale: float,
    out: np.ndarray,  # float32 [T, head_num, d], written for the served sequences' tokens
) -> None:
    """Attend the served sequences' query tokens to their cached K/V.

    Each partition is a run of one sequence's KV positions, scored against all that sequence's
    query rows (every query token x every head) in one sweep, so the cache is read block by
    block in memory order. Partitions give both cores work when there are few sequences; a
    second pass merges each sequence's partitions with their softmax max and sum.
    """
    head_num = query.shape[1]
    head_dim = query.shape[2]
    num_parts = part_seq.shape[0]
    part_row_start = np.empty(num_parts + 1, dtype=np.int64)
    part_row_start[0] = 0
    for p in range(num_parts):
        seq = part_seq[p]
        q_len = query_start_loc[seq + 1] - query_start_loc[seq]
        part_row_start[p + 1] = part_row_start[p] + q_len * head_num
    total_rows = part_row_start[num_parts]
    acc = np.empty((total_rows, head_dim), dtype=np.float32)
    row_max = np.empty(total_rows, dtype=np.float32)
    row_sum = np.empty(total_rows, dtype=np.float32)

    for p in numba.prange(num_parts):
        seq = part_seq[p]
        r0, r1 = part_row_start[p], part_row_start[p + 1]
        _attend_partition(
            query, key_cache, value_cache, block_tables[seq],
            query_start_loc[seq], query_start_loc[seq + 1], seq_lens[seq],
            part_kv_start[p], part_kv_end[p], qk_scale,
            acc[r0:r1], row_max[r0:r1], row_sum[r0:r1],
        )

    for s in numba.prange(seq_part_start.shape[0] - 1):
        p0, p1 = seq_part_start[s], seq_part_start[s + 1]
        seq = part_seq[p0]
        _merge_partitions(
            acc, row_max, row_sum, part_row_start[p0:p1 + 1], query_start_loc[seq], head_num, out,
        )


@numba.njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _attend_partition(query, key_cache, value_cache, block_table, q0, q1, kv_len, kv_start,
                      kv_end, qk_scale, acc, row_max, row_sum):
    """Unnormalised attention of all query rows of one sequence over KV positions
    [kv_start, kv_end): fills acc (sum of p * v), row_max and row_sum (sum of p)."""
    block_size = key_cache.shape[1]
    head_num = query.shape[1]
    head_dim = query.shape[2]
    group = head_num // key_cache.shape[2]
    q_len = q1 - q0
    rows = q_len * head_num
    first_pos = kv_len - q_len  # KV position of this step's first query token
    q = np.empty((rows, head_dim), dtype=np.float32)
    for r in range(rows):
        for c in range(head_dim):
            q[r, c] = query[q0 + r // head_num, r % head_num, c] * qk_scale

    # Pass 1: scores, token-major so each cached token's K is loaded once for all rows.
    span = kv_end - kv_start
    scores = np.empty((span, rows), dtype=np.float32)
    row_max[:] = _NEG_BIG
    for t in range(kv_start, kv_end):
        k = key_cache[block_table[t // block_size], t % block_size]
        visible_from = max(0, t - first_pos) * head_num  # rows of earlier tokens can't see t
        for r in range(visible_from, rows):
            kh = (r % head_num) // group
            s = np.float32(0.0)
            for c in range(head_dim):
                s += q[r, c] * k[kh, c]
            scores[t - kv_start, r] = s
            if s > row_max[r]:
                row_max[r] = s

    # Pass 2: probabilities and the weighted sum of values.
    acc[:] = 0.0
    row_sum[:] = 0.0
    for t in range(kv_start, kv_end):
        v = value_cache[block_table[t // block_size], t % block_size]
        visible_from = max(0, t - first_pos) * head_num
        for r in range(visible_from, rows):
            kh = (r % head_num) // group
            p = np.exp(scores[t - kv_start, r] - row_max[r])
            row_sum[r] += p
            for c in range(head_dim):
                acc[r, c] += p * v[kh, c]


@numba.njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _merge_partitions(acc, row_max, row_sum, part_rows, q0, head_num, out):
    """Combine one sequence's partition results (rows part_rows[i]:part_rows[i+1]) into out."""
    rows = part_rows[1] - part_rows[0]
    head_dim = acc.shape[1]
    for r in range(rows):
        best = _NEG_BIG
        for i in range(part_rows.shape[0] - 1):
            best = max(best, row_max[part_rows[i] + r])
        total = np.float32(0.0)
        merged = np.zeros(head_dim, dtype=np.float32)
        for i in range(part_rows.shape[0] - 1):
            pr = part_rows[i] + r
            weight = np.exp(row_max[pr] - best)
            total += weight * row_sum[pr]
            for c in range(head_dim):
                merged[c] += weight * acc[pr, c]
        inv = np.float32(1.0) / total
        for c in range(head_dim):
            out[q0 + r // head_num, r % head_num, c] = merged[c] * inv
