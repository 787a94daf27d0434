"""CPU attention backend: numba kernel for decode, flash SDPA for prefills, a tiled reference."""
from __future__ import annotations

import numpy as np
import torch

from worker.attention import (
    AttentionBackend,
    AttentionMetadata,
    SelfAttentionParams,
    copy_into_slots,
    written_rows,
)
from worker.backends.cpu_plan import CpuStepPlan, plan_step
from worker.backends.cpu_prefill import attend_sequence_sdpa
from worker.backends.cpu_reference import attend_sequence_tiled
from worker.backends.cpu_simd import match_numba_threads_to_torch, numba_thread_limit

KERNELS = ("fast", "reference")
# Sequences with more query tokens than this (prefills) use torch's flash SDPA on a gathered
# copy, which beats the numba kernel once each key serves many query tokens.
MAX_KERNEL_QUERY_LEN = 16


class CpuBackend(AttentionBackend):
    """Paged self-attention on CPU.

    ``kernel="fast"``: sequences with few query tokens (decode, short chunks) run in a numba kernel
    that reads fp32 cache blocks in place (other dtypes or non-contiguous caches: the reference
    path); long prefills gather their blocks once and run torch's flash SDPA.
    ``kernel="reference"``: every sequence takes the readable tiled torch path (online softmax
    over key tiles). Memory stays linear in sequence length on every path.
    """

    name = "cpu"

    def __init__(self, device: torch.device | str = "cpu", kernel: str = "fast") -> None:
        super().__init__(device)
        if kernel not in KERNELS:
            raise ValueError(f"unknown cpu attention kernel {kernel!r}; choose one of {KERNELS}")
        self.kernel = kernel
        self._max_kernel_query_len = MAX_KERNEL_QUERY_LEN if kernel == "fast" else 0

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        meta.backend_state = plan_step(meta, self._max_kernel_query_len, numba_thread_limit())
        return meta

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping):
        _check_slots(key, slot_mapping)
        rows, slots = written_rows(slot_mapping)
        copy_into_slots(key, value, key_cache, value_cache, rows, slots.long())

    def forward(self, query, key, value, key_cache, value_cache, meta, params):
        plan = self._plan_for(meta)  # the written rows and slots are worked out once per step
        _check_slots(key, meta.slot_mapping)
        copy_into_slots(key, value, key_cache, value_cache, plan.write_rows, plan.write_slots)
        step_kv = (key, value) if key.dtype == key_cache.dtype else None
        return self._attend(query, key_cache, value_cache, meta, params, step_kv)

    def attend(self, query, key_cache, value_cache, meta: AttentionMetadata,
               params: SelfAttentionParams):
        return self._attend(query, key_cache, value_cache, meta, params, None)

    def _attend(self, query, key_cache, value_cache, meta, params, step_kv):
        """``step_kv``: this step's keys and values, already in the cache's dtype, which fresh
        prefills attend to directly (None: every sequence reads the cache)."""
        _check_shapes(query, key_cache, value_cache, meta, params)
        plan = self._plan_for(meta)
        _check_block_tables(plan, key_cache)
        out = torch.empty(query.shape, dtype=query.dtype)
        short_on_kernel = _kernel_accepts(query, key_cache, value_cache)
        if short_on_kernel and plan.has_kernel_work:
            _run_kernel(query, key_cache, value_cache, plan, params, out)
        long_path = attend_sequence_sdpa if self.kernel == "fast" else attend_sequence_tiled
        jobs = [(s, long_path) for s in plan.long_seqs]
        if not short_on_kernel:
            jobs += [(s, attend_sequence_tiled) for s in plan.short_seqs]
        for s, path in jobs:
            q0, q1 = int(plan.query_start_loc[s]), int(plan.query_start_loc[s + 1])
            args = (query[q0:q1], key_cache, value_cache, meta.block_tables[s],
                    int(plan.seq_lens[s]), params, out[q0:q1])
            if path is attend_sequence_sdpa and step_kv is not None:
                path(*args, step_kv=(step_kv[0][q0:q1], step_kv[1][q0:q1]))
            else:
                path(*args)
        return out

    def warm_up(self) -> None:
        """Make the fast kernel's first call now (compiling it, or loading it from numba's
        on-disk cache, and starting numba's thread pool) on a two-token scratch case. No-op for
        reference. The engine warms up whole forwards instead (Engine._warm_up); the tests use
        this to see that first call happen in isolation."""
        if self.kernel != "fast":
            return
        params = SelfAttentionParams(head_num=2, kv_head_num=1, head_dim=8, qk_scale=1.0)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(2, dtype=torch.int32),
            block_tables=torch.zeros(1, 1, dtype=torch.int32),
            query_start_loc=[0, 2],
            seq_lens=[2],
        )
        cache = torch.zeros(1, 4, 1, 8)
        self.attend(torch.zeros(2, 2, 8), cache, cache, meta, params)

    def _plan_for(self, meta: AttentionMetadata) -> CpuStepPlan:
        if not isinstance(meta.backend_state, CpuStepPlan):  # the caller skipped prepare()
            self.prepare(meta)
        return meta.backend_state


def _check_slots(key, slot_mapping) -> None:
    if key.shape[0] != slot_mapping.shape[0]:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} slots for {key.shape[0]} key tokens"
        )


def _kernel_accepts(query, key_cache, value_cache) -> bool:
    """The numba kernel is fp32 only and indexes the caches as C-contiguous arrays."""
    if any(t.dtype != torch.float32 for t in (query, key_cache, value_cache)):
        return False
    return key_cache.is_contiguous() and value_cache.is_contiguous()


def _run_kernel(query, key_cache, value_cache, plan: CpuStepPlan, params, out) -> None:
    """Runs on numba's default threading layer (omp where libgomp exists), not "workqueue":
    on 2 cores, engine decode steps took 39-54 ms with omp vs 48-69 quiet, and 72-365 vs
    210-444 ms beside two busy processes; the bare decode kernel 15.4 vs 20.9 ms."""
    from worker.backends.cpu_numba import paged_attention_fp32

    match_numba_threads_to_torch()
    paged_attention_fp32(
        query.detach().contiguous().numpy(),
        key_cache.detach().numpy(),
        value_cache.detach().numpy(),
        plan.block_tables, plan.query_start_loc, plan.seq_lens,
        plan.part_seq, plan.part_kv_start, plan.part_kv_end, plan.seq_part_start,
        plan.thread_part_start, plan.thread_parts,
        float(params.qk_scale), out.numpy(),
    )


def _check_shapes(query, key_cache, value_cache, meta: AttentionMetadata, params) -> None:
    expected_query = (meta.num_tokens, params.head_num, params.head_dim)
    if tuple(query.shape) != expected_query:
        raise ValueError(
            f"query must be [num_tokens, head_num, head_dim] = {list(expected_query)}, "
            f"got {list(query.shape)}"
        )
    if key_cache.dim() != 4 or key_cache.shape[2:] != (params.kv_head_num, params.head_dim):
        raise ValueError(
            f"caches must be [num_blocks, block_size, kv_head_num={params.kv_head_num}, "
            f"head_dim={params.head_dim}], got {list(key_cache.shape)}"
        )
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache {list(value_cache.shape)} must match key_cache {list(key_cache.shape)}"
        )


def _check_block_tables(plan: CpuStepPlan, key_cache) -> None:
    """The kernel reads blocks unchecked, so a bad table must fail here, not read stray memory.
    Checked once per step and cache shape: every layer has the same."""
    num_blocks, block_size = key_cache.shape[:2]
    if plan.checked_cache_shape == (num_blocks, block_size):
        return
    tables = plan.block_tables[: len(plan.seq_lens)]
    blocks_needed = -(-plan.seq_lens // block_size)
    if blocks_needed.size and blocks_needed.max() > tables.shape[1]:
        raise ValueError(
            f"block_tables has {tables.shape[1]} columns but a sequence of {plan.seq_lens.max()} "
            f"tokens needs {blocks_needed.max()} blocks of {block_size}"
        )
    used = tables[np.arange(tables.shape[1])[None, :] < blocks_needed[:, None]]
    if used.size and not 0 <= used.min() <= used.max() < num_blocks:
        raise ValueError(
            f"block_tables holds block ids outside [0, {num_blocks}): [{used.min()}, {used.max()}]"
        )
    plan.checked_cache_shape = (num_blocks, block_size)
