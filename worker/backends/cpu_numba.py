"""Numba kernel of the CPU backend: fp32 paged attention that reads cache blocks in place."""
from __future__ import annotations

import numba
import numpy as np

from worker.backends.cpu_simd import JIT_OPTIONS, exp_nonpositive, prefetch_token

_NEG_BIG = np.float32(-3.0e38)  # a finite "minus infinity": max - max is never NaN
TOKENS_PER_STEP = 4  # keys handled together, so each accumulator load/store serves four
# Decode with fewer query heads per KV head than this takes the block loop with prefetch; from
# 4 up, the general loop's 4-head x 4-key tiles compute faster (d 128, 32/8 heads, 32 x 1024
# cached: 14.1 vs 16.9 ms), while at 8/4 heads the block loop won (12.4 vs 17.9 ms, cold cache).
DECODE_LOOP_MAX_GROUP = 4


@numba.njit(parallel=True, **JIT_OPTIONS)
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
    thread_part_start: np.ndarray,  # int64 [threads + 1]: thread i runs partitions
    thread_parts: np.ndarray,  # int64 [P]: thread_parts[thread_part_start[i]:[i + 1]]
    qk_scale: float,
    out: np.ndarray,  # float32 [T, head_num, d], written for the served sequences' tokens
) -> None:
    """Attend the served sequences' query tokens to their cached K/V.

    A partition is a run of one sequence's KV positions, scored against all of that sequence's
    query rows (query token x head) in one sweep over the cache in block order, so each cached
    vector is read once per step; decode partitions (one query token) with few query heads per
    KV head take a leaner loop.
    Partitions give every thread work when sequences are few or uneven; the plan deals them to
    threads by cost (numba's prange would split them by count).
    A second parallel loop merges each sequence's partitions by their softmax max and sum.
    """
    head_num = query.shape[1]
    num_parts = part_seq.shape[0]
    part_row_start = np.empty(num_parts + 1, dtype=np.int64)
    part_row_start[0] = 0
    for p in range(num_parts):
        seq = part_seq[p]
        q_len = query_start_loc[seq + 1] - query_start_loc[seq]
        part_row_start[p + 1] = part_row_start[p] + q_len * head_num
    total_rows = part_row_start[num_parts]
    acc = np.empty((total_rows, query.shape[2]), dtype=np.float32)
    row_max = np.empty(total_rows, dtype=np.float32)
    row_sum = np.empty(total_rows, dtype=np.float32)

    for thread in numba.prange(thread_part_start.shape[0] - 1):
        for p in thread_parts[thread_part_start[thread]:thread_part_start[thread + 1]]:
            seq = part_seq[p]
            q0, q1 = query_start_loc[seq], query_start_loc[seq + 1]
            r0, r1 = part_row_start[p], part_row_start[p + 1]
            if q1 - q0 == 1 and head_num // key_cache.shape[2] < DECODE_LOOP_MAX_GROUP:
                _decode_partition(
                    query[q0], key_cache, value_cache, block_tables[seq],
                    part_kv_start[p], part_kv_end[p], qk_scale,
                    acc[r0:r1], row_max[r0:r1], row_sum[r0:r1],
                )
            else:
                _attend_partition(
                    query, key_cache, value_cache, block_tables[seq], q0, q1, seq_lens[seq],
                    part_kv_start[p], part_kv_end[p], qk_scale,
                    acc[r0:r1], row_max[r0:r1], row_sum[r0:r1],
                )

    for s in numba.prange(seq_part_start.shape[0] - 1):
        p0, p1 = seq_part_start[s], seq_part_start[s + 1]
        _merge_partitions(
            acc, row_max, row_sum, part_row_start[p0:p1 + 1],
            query_start_loc[part_seq[p0]], head_num, out,
        )


@numba.njit(**JIT_OPTIONS)
def _attend_partition(query, key_cache, value_cache, block_table, q0, q1, kv_len, kv_start,
                      kv_end, qk_scale, acc, row_max, row_sum):
    """Unnormalised attention of one sequence's query rows over KV positions [kv_start, kv_end).

    Rows are ``j * head_num + head`` for query token j. Fills acc (sum of p * v), row_max and
    row_sum (sum of p), where p = exp(score - row_max). Keys go in steps of four; a key a row
    may not see (causality, or padding past kv_end) gets score -inf-like and p exactly 0.
    """
    head_num = query.shape[1]
    rows = (q1 - q0) * head_num
    q = np.empty((rows, query.shape[2]), dtype=np.float32)
    for r in range(rows):
        for c in range(query.shape[2]):
            q[r, c] = query[q0 + r // head_num, r % head_num, c] * qk_scale
    first_pos = kv_len - (q1 - q0)  # KV position of this step's first query token
    num_steps = (kv_end - kv_start + TOKENS_PER_STEP - 1) // TOKENS_PER_STEP
    scores = np.empty((num_steps * TOKENS_PER_STEP, rows), dtype=np.float32)

    row_max[:] = _NEG_BIG
    for step in range(num_steps):
        t0 = kv_start + step * TOKENS_PER_STEP
        k0, k1, k2, k3 = _token_rows(key_cache, block_table, t0, kv_end)
        s = scores[step * TOKENS_PER_STEP:(step + 1) * TOKENS_PER_STEP]
        for j in range(max(0, t0 - first_pos), q1 - q0):
            _score_query(q, j * head_num, head_num, key_cache.shape[2], k0, k1, k2, k3, s)
        _mask_step(s, t0, kv_end, first_pos, head_num)
        for i in range(TOKENS_PER_STEP):
            for r in range(rows):
                row_max[r] = max(row_max[r], s[i, r])

    for i in range(scores.shape[0]):
        for r in range(rows):
            scores[i, r] = exp_nonpositive(scores[i, r] - row_max[r])

    acc[:] = 0.0
    row_sum[:] = 0.0
    for step in range(num_steps):
        t0 = kv_start + step * TOKENS_PER_STEP
        v0, v1, v2, v3 = _token_rows(value_cache, block_table, t0, kv_end)
        p = scores[step * TOKENS_PER_STEP:(step + 1) * TOKENS_PER_STEP]
        for i in range(TOKENS_PER_STEP):
            for r in range(rows):
                row_sum[r] += p[i, r]
        for j in range(max(0, t0 - first_pos), q1 - q0):
            _accumulate_query(p, j * head_num, head_num, key_cache.shape[2], v0, v1, v2, v3, acc)


@numba.njit(**JIT_OPTIONS)
def _decode_partition(query_row, key_cache, value_cache, block_table, kv_start, kv_end, qk_scale,
                      acc, row_max, row_sum):
    """_attend_partition for a single query token (rows are its heads), which may see every KV
    position: no mask, whole blocks at a time, and the next block prefetched while this one is
    read. Same outputs: acc (sum of p * v), row_max, row_sum (sum of p)."""
    head_num, head_dim = query_row.shape
    q = np.empty((head_num, head_dim), dtype=np.float32)
    for h in range(head_num):
        for c in range(head_dim):
            q[h, c] = query_row[h, c] * qk_scale
    scores = np.empty((head_num, kv_end - kv_start), dtype=np.float32)
    _score_keys(q, key_cache, block_table, kv_start, kv_end, scores)
    for h in range(head_num):
        best = _NEG_BIG
        for t in range(scores.shape[1]):
            best = max(best, scores[h, t])
        total = np.float32(0.0)
        for t in range(scores.shape[1]):
            p = exp_nonpositive(scores[h, t] - best)
            scores[h, t] = p
            total += p
        row_max[h] = best
        row_sum[h] = total
    acc[:] = 0.0
    _accumulate_values(scores, value_cache, block_table, kv_start, kv_end, acc)


@numba.njit(inline="always", **JIT_OPTIONS)
def _block_span(block_table, pos, kv_end, block_size):
    """(block id, first row, rows, next block id to prefetch) of the block holding KV position pos,
    clipped to kv_end; the next block is this one when there is none."""
    row = pos % block_size
    count = min(block_size - row, kv_end - pos)
    index = pos // block_size
    block = block_table[index]
    upcoming = block_table[index + 1] if pos + count < kv_end else block
    return block, row, count, upcoming


@numba.njit(inline="always", **JIT_OPTIONS)
def _score_keys(q, key_cache, block_table, kv_start, kv_end, scores):
    """scores[h, t - kv_start] = q[h] . key of position t, for the kv head serving head h."""
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = q.shape[0] // kv_heads
    pos = kv_start
    while pos < kv_end:
        block, row, count, upcoming = _block_span(block_table, pos, kv_end, block_size)
        for i in range(count):
            prefetch_token(key_cache, upcoming, i)
            key = key_cache[block, row + i]
            t = pos - kv_start + i
            for kh in range(kv_heads):
                for h in range(kh * group, (kh + 1) * group):
                    dot = np.float32(0.0)
                    for c in range(q.shape[1]):
                        dot += q[h, c] * key[kh, c]
                    scores[h, t] = dot
        pos += count


@numba.njit(inline="always", **JIT_OPTIONS)
def _accumulate_values(p, value_cache, block_table, kv_start, kv_end, acc):
    """acc[h] += p[h, t - kv_start] * value of position t. Values go four at a time, so each
    load and store of an accumulator serves four of them."""
    block_size, kv_heads = value_cache.shape[1], value_cache.shape[2]
    group = acc.shape[0] // kv_heads
    pos = kv_start
    while pos < kv_end:
        block, row, count, upcoming = _block_span(block_table, pos, kv_end, block_size)
        i = 0
        while i + TOKENS_PER_STEP <= count:
            for j in range(TOKENS_PER_STEP):
                prefetch_token(value_cache, upcoming, i + j)
            v0, v1 = value_cache[block, row + i], value_cache[block, row + i + 1]
            v2, v3 = value_cache[block, row + i + 2], value_cache[block, row + i + 3]
            t = pos - kv_start + i
            for kh in range(kv_heads):
                for h in range(kh * group, (kh + 1) * group):
                    p0, p1, p2, p3 = p[h, t], p[h, t + 1], p[h, t + 2], p[h, t + 3]
                    for c in range(acc.shape[1]):
                        acc[h, c] += (p0 * v0[kh, c] + p1 * v1[kh, c]
                                      + p2 * v2[kh, c] + p3 * v3[kh, c])
            i += TOKENS_PER_STEP
        for rest in range(i, count):
            prefetch_token(value_cache, upcoming, rest)
            value = value_cache[block, row + rest]
            t = pos - kv_start + rest
            for kh in range(kv_heads):
                for h in range(kh * group, (kh + 1) * group):
                    for c in range(acc.shape[1]):
                        acc[h, c] += p[h, t] * value[kh, c]
        pos += count


@numba.njit(inline="always", **JIT_OPTIONS)
def _token_rows(cache, block_table, t0, kv_end):
    """The [kv_heads, d] rows of tokens t0..t0+3; past kv_end the last token stands in (masked)."""
    block_size = cache.shape[1]
    t1 = min(t0 + 1, kv_end - 1)
    t2 = min(t0 + 2, kv_end - 1)
    t3 = min(t0 + 3, kv_end - 1)
    return (
        cache[block_table[t0 // block_size], t0 % block_size],
        cache[block_table[t1 // block_size], t1 % block_size],
        cache[block_table[t2 // block_size], t2 % block_size],
        cache[block_table[t3 // block_size], t3 % block_size],
    )


@numba.njit(inline="always", **JIT_OPTIONS)
def _mask_step(s, t0, kv_end, first_pos, head_num):
    """Score rows of query tokens that may not see key t0 + i (and padding keys) become -big."""
    for i in range(TOKENS_PER_STEP):
        t = t0 + i
        hidden_rows = s.shape[1] if t >= kv_end else max(0, t - first_pos) * head_num
        for r in range(hidden_rows):
            s[i, r] = _NEG_BIG


@numba.njit(inline="always", **JIT_OPTIONS)
def _score_query(q, r0, head_num, kv_heads, k0, k1, k2, k3, s):
    """s[i, r] = q[r] . k_i[kv head of r] for one query token's rows r0..r0 + head_num. Heads
    sharing a KV head go four at a time, so each loaded key element feeds sixteen products."""
    group = head_num // kv_heads
    for kh in range(kv_heads):
        r = r0 + kh * group
        g = 0
        while g + 4 <= group:
            _dot_4x4(q, r + g, kh, k0, k1, k2, k3, s)
            g += 4
        while g < group:
            _dot_1x4(q, r + g, kh, k0, k1, k2, k3, s)
            g += 1


@numba.njit(inline="always", **JIT_OPTIONS)
def _accumulate_query(p, r0, head_num, kv_heads, v0, v1, v2, v3, acc):
    """acc[r] += sum_i p[i, r] * v_i[kv head of r] for one query token's rows."""
    group = head_num // kv_heads
    for kh in range(kv_heads):
        r = r0 + kh * group
        g = 0
        while g + 4 <= group:
            _axpy_4x4(p, r + g, kh, v0, v1, v2, v3, acc)
            g += 4
        while g < group:
            _axpy_1x4(p, r + g, kh, v0, v1, v2, v3, acc)
            g += 1


@numba.njit(inline="always", **JIT_OPTIONS)
def _dot_4x4(q, r, kh, k0, k1, k2, k3, s):
    """Rows r..r+3 against four keys: sixteen independent sums that LLVM vectorises over c."""
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    a30 = a31 = a32 = a33 = np.float32(0.0)
    for c in range(q.shape[1]):
        x0, x1, x2, x3 = k0[kh, c], k1[kh, c], k2[kh, c], k3[kh, c]
        y0, y1, y2, y3 = q[r, c], q[r + 1, c], q[r + 2, c], q[r + 3, c]
        a00 += y0 * x0
        a01 += y0 * x1
        a02 += y0 * x2
        a03 += y0 * x3
        a10 += y1 * x0
        a11 += y1 * x1
        a12 += y1 * x2
        a13 += y1 * x3
        a20 += y2 * x0
        a21 += y2 * x1
        a22 += y2 * x2
        a23 += y2 * x3
        a30 += y3 * x0
        a31 += y3 * x1
        a32 += y3 * x2
        a33 += y3 * x3
    s[0, r], s[1, r], s[2, r], s[3, r] = a00, a01, a02, a03
    s[0, r + 1], s[1, r + 1], s[2, r + 1], s[3, r + 1] = a10, a11, a12, a13
    s[0, r + 2], s[1, r + 2], s[2, r + 2], s[3, r + 2] = a20, a21, a22, a23
    s[0, r + 3], s[1, r + 3], s[2, r + 3], s[3, r + 3] = a30, a31, a32, a33


@numba.njit(inline="always", **JIT_OPTIONS)
def _dot_1x4(q, r, kh, k0, k1, k2, k3, s):
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for c in range(q.shape[1]):
        y = q[r, c]
        a0 += y * k0[kh, c]
        a1 += y * k1[kh, c]
        a2 += y * k2[kh, c]
        a3 += y * k3[kh, c]
    s[0, r], s[1, r], s[2, r], s[3, r] = a0, a1, a2, a3


@numba.njit(inline="always", **JIT_OPTIONS)
def _axpy_4x4(p, r, kh, v0, v1, v2, v3, acc):
    """acc rows r..r+3 += their four probabilities times the four values: one load and store
    of each accumulator per four keys."""
    p00, p01, p02, p03 = p[0, r], p[1, r], p[2, r], p[3, r]
    p10, p11, p12, p13 = p[0, r + 1], p[1, r + 1], p[2, r + 1], p[3, r + 1]
    p20, p21, p22, p23 = p[0, r + 2], p[1, r + 2], p[2, r + 2], p[3, r + 2]
    p30, p31, p32, p33 = p[0, r + 3], p[1, r + 3], p[2, r + 3], p[3, r + 3]
    for c in range(acc.shape[1]):
        x0, x1, x2, x3 = v0[kh, c], v1[kh, c], v2[kh, c], v3[kh, c]
        acc[r, c] += p00 * x0 + p01 * x1 + p02 * x2 + p03 * x3
        acc[r + 1, c] += p10 * x0 + p11 * x1 + p12 * x2 + p13 * x3
        acc[r + 2, c] += p20 * x0 + p21 * x1 + p22 * x2 + p23 * x3
        acc[r + 3, c] += p30 * x0 + p31 * x1 + p32 * x2 + p33 * x3


@numba.njit(inline="always", **JIT_OPTIONS)
def _axpy_1x4(p, r, kh, v0, v1, v2, v3, acc):
    p0, p1, p2, p3 = p[0, r], p[1, r], p[2, r], p[3, r]
    for c in range(acc.shape[1]):
        acc[r, c] += p0 * v0[kh, c] + p1 * v1[kh, c] + p2 * v2[kh, c] + p3 * v3[kh, c]


@numba.njit(**JIT_OPTIONS)
def _merge_partitions(acc, row_max, row_sum, part_rows, q0, head_num, out):
    """Combine one sequence's partition results (rows part_rows[i]:part_rows[i+1]) into out."""
    rows = part_rows[1] - part_rows[0]
    head_dim = acc.shape[1]
    merged = np.empty(head_dim, dtype=np.float32)
    for r in range(rows):
        best = _NEG_BIG
        for i in range(part_rows.shape[0] - 1):
            best = max(best, row_max[part_rows[i] + r])
        total = np.float32(0.0)
        merged[:] = 0.0
        for i in range(part_rows.shape[0] - 1):
            pr = part_rows[i] + r
            weight = np.exp(row_max[pr] - best)
            total += weight * row_sum[pr]
            for c in range(head_dim):
                merged[c] += weight * acc[pr, c]
        inv = np.float32(1.0) / total
        for c in range(head_dim):
            out[q0 + r // head_num, r % head_num, c] = merged[c] * inv
