"""One CPU attention step's plan: metadata as numpy, each sequence's path, KV partitions."""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from worker.attention import AttentionMetadata, written_rows

PARTITION_ALIGN = 128  # partition edges fall on block edges for every block size dividing this
PARTITIONS_PER_THREAD = 4  # enough work items that uneven sequences still balance
SCORE_BUDGET = 8192  # max query tokens x KV positions per partition: bounds its score buffer


@dataclass(slots=True)
class CpuStepPlan:
    """What ``CpuBackend.prepare`` computes once per step for all layers.

    Sequences with 1 to ``max_kernel_query_len`` query tokens (``short_seqs``) go to the in-place
    kernel, cut into KV partitions (partition p covers positions ``part_kv_start[p]:part_kv_end[p]``
    of sequence ``part_seq[p]``; a sequence's partitions are ``seq_part_start[s]:[s+1]``); those
    with more (``long_seqs``: prefills) go to a torch path.
    """

    block_tables: np.ndarray  # int32 [B, max_blocks]
    query_start_loc: np.ndarray  # int64 [B + 1]
    seq_lens: np.ndarray  # int64 [B]
    part_seq: np.ndarray  # int64 [P]
    part_kv_start: np.ndarray  # int64 [P]
    part_kv_end: np.ndarray  # int64 [P]
    seq_part_start: np.ndarray  # int64 [S + 1]
    thread_part_start: np.ndarray  # int64 [threads + 1]: thread i runs partitions
    thread_parts: np.ndarray  # int64 [P]: thread_parts[thread_part_start[i]:[i + 1]]
    short_seqs: list[int]
    long_seqs: list[int]
    write_rows: torch.Tensor | None  # int64: tokens whose K/V are written (None: all of them)
    write_slots: torch.Tensor  # int64: their flat cache slots
    # (num_blocks, block_size) the block tables were last checked against; layers share it.
    checked_cache_shape: tuple[int, int] | None = None

    @property
    def has_kernel_work(self) -> bool:
        return self.part_seq.shape[0] > 0


def plan_step(meta: AttentionMetadata, max_kernel_query_len: int, num_threads: int) -> CpuStepPlan:
    """Validate the step's metadata and decide which kernel serves each sequence."""
    query_start_loc = np.asarray(meta.query_start_loc, dtype=np.int64)
    seq_lens = np.asarray(meta.seq_lens, dtype=np.int64)
    _validate(meta, query_start_loc, seq_lens)
    query_lens = np.diff(query_start_loc)
    short_seqs = [s for s in range(len(seq_lens)) if 0 < query_lens[s] <= max_kernel_query_len]
    long_seqs = [s for s in range(len(seq_lens)) if query_lens[s] > max_kernel_query_len]
    num_threads = max(1, num_threads)
    parts = _partition(short_seqs, query_lens, seq_lens, num_threads)
    thread_part_start, thread_parts = _assign_threads(*parts[:3], query_lens, num_threads)
    write_rows, write_slots = written_rows(meta.slot_mapping)
    return CpuStepPlan(
        block_tables=np.ascontiguousarray(meta.block_tables.numpy(), dtype=np.int32),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        part_seq=parts[0],
        part_kv_start=parts[1],
        part_kv_end=parts[2],
        seq_part_start=parts[3],
        thread_part_start=thread_part_start,
        thread_parts=thread_parts,
        short_seqs=short_seqs,
        long_seqs=long_seqs,
        write_rows=write_rows,
        write_slots=write_slots.long(),
    )


def _validate(meta: AttentionMetadata, query_start_loc: np.ndarray, seq_lens: np.ndarray) -> None:
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1 or query_start_loc[0] != 0:
        raise ValueError(
            f"query_start_loc must be [0, ...] with one more entry than seq_lens; got "
            f"{len(query_start_loc)} entries starting at {query_start_loc[:1].tolist()} for "
            f"{len(seq_lens)} sequences"
        )
    query_lens = np.diff(query_start_loc)
    if (query_lens < 0).any():
        raise ValueError(f"query_start_loc must be non-decreasing, got {meta.query_start_loc}")
    short = np.nonzero(seq_lens < query_lens)[0]
    if short.size:
        s = int(short[0])
        raise ValueError(
            f"sequence {s}: seq_lens ({seq_lens[s]}) must count its cached prefix plus its "
            f"{query_lens[s]} query tokens"
        )
    if meta.block_tables.dim() != 2 or meta.block_tables.shape[0] < len(seq_lens):
        raise ValueError(
            f"block_tables must be [num_seqs, max_blocks]; got shape "
            f"{tuple(meta.block_tables.shape)} for {len(seq_lens)} sequences"
        )


def _partition(short_seqs, query_lens, seq_lens, num_threads):
    """Cut each kernel sequence's KV range into partitions of similar size, small enough that
    there are a few per thread and each partition's score buffer stays cache sized."""
    total_kv = int(sum(seq_lens[s] for s in short_seqs))
    balanced = -(-total_kv // (PARTITIONS_PER_THREAD * num_threads))
    balanced = max(PARTITION_ALIGN, _round_up(balanced, PARTITION_ALIGN))
    part_seq, starts, ends, seq_part_start = [], [], [], [0]
    for s in short_seqs:
        fits_budget = SCORE_BUDGET // int(query_lens[s]) // PARTITION_ALIGN * PARTITION_ALIGN
        span = min(balanced, max(PARTITION_ALIGN, fits_budget))
        kv_len = int(seq_lens[s])
        for start in range(0, kv_len, span):
            part_seq.append(s)
            starts.append(start)
            ends.append(min(kv_len, start + span))
        seq_part_start.append(len(part_seq))
    return tuple(np.asarray(v, dtype=np.int64) for v in (part_seq, starts, ends, seq_part_start))


def _assign_threads(part_seq, part_kv_start, part_kv_end, query_lens, num_threads):
    """Deal partitions to threads, largest first, each to the least loaded thread (cost: KV
    positions x query tokens). Returns (thread_part_start [threads + 1], thread_parts [P])."""
    costs = (part_kv_end - part_kv_start) * query_lens[part_seq]
    loads = [(0, thread) for thread in range(num_threads)]
    assigned = [[] for _ in range(num_threads)]
    for p in np.argsort(-costs, kind="stable"):
        load, thread = heapq.heappop(loads)
        assigned[thread].append(int(p))
        heapq.heappush(loads, (load + int(costs[p]), thread))
    thread_part_start = np.cumsum([0] + [len(parts) for parts in assigned], dtype=np.int64)
    thread_parts = np.asarray([p for parts in assigned for p in parts], dtype=np.int64)
    return thread_part_start, thread_parts


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
