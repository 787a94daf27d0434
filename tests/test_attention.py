"""Paged self-attention on the cpu backend (fast kernel and reference) against naive attention."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.attention import AttentionMetadata, SelfAttentionParams
from worker.backends.cpu import CpuBackend
from worker.backends.cpu_plan import plan_step
from worker.backends.cpu_simd import exp_nonpositive

KERNELS = ("fast", "reference")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(slots=True)
class SeqSpec:
    cached: int  # KV tokens written by an earlier step
    new: int  # query tokens of this step


@dataclass(slots=True)
class Case:
    """One step over paged caches, with each sequence's full K/V kept contiguous for the naive check."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    meta: AttentionMetadata
    params: SelfAttentionParams
    full_keys: list[torch.Tensor]
    full_values: list[torch.Tensor]


def naive_attention(query, keys, values, params):
    """Per-sequence causal softmax attention over contiguous K/V, in float64."""
    group = params.head_num // params.kv_head_num
    q_len, kv_len = query.shape[0], keys.shape[0]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.double(), k) * params.qk_scale
    query_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    scores = scores.masked_fill(torch.arange(kv_len)[None, :] > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def build_case(specs, block_size, head_num, kv_head_num, head_dim, dtype, seed, backend):
    """Random Q/K/V; each sequence's cached prefix is written by an earlier write_kv into
    randomly chosen, non-contiguous blocks of NaN-filled caches (a stray read shows as NaN)."""
    gen = torch.Generator().manual_seed(seed)
    params = SelfAttentionParams(head_num, kv_head_num, head_dim, qk_scale=head_dim**-0.5)
    blocks_per_seq = [-(-(s.cached + s.new) // block_size) for s in specs]
    num_blocks = sum(blocks_per_seq) + 3
    block_ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(specs), max(blocks_per_seq), dtype=torch.int32)
    cache_shape = (num_blocks, block_size, kv_head_num, head_dim)
    key_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    value_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    full_keys, full_values, step_slots, step_queries = [], [], [], []
    used = 0
    for i, spec in enumerate(specs):
        ids = block_ids[used:used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        tables[i, : len(ids)] = ids.int()
        total = spec.cached + spec.new
        slots = ids[torch.arange(total) // block_size] * block_size + torch.arange(total) % block_size
        keys = torch.randn(total, kv_head_num, head_dim, generator=gen).to(dtype)
        values = torch.randn(total, kv_head_num, head_dim, generator=gen).to(dtype)
        if spec.cached:
            backend.write_kv(keys[: spec.cached], values[: spec.cached], key_cache, value_cache,
                             slots[: spec.cached].int())
        full_keys.append(keys)
        full_values.append(values)
        step_slots.append(slots[spec.cached:])
        step_queries.append(torch.randn(spec.new, head_num, head_dim, generator=gen).to(dtype))
    starts = [0]
    for spec in specs:
        starts.append(starts[-1] + spec.new)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(step_slots).int(),
        block_tables=tables,
        query_start_loc=starts,
        seq_lens=[s.cached + s.new for s in specs],
    )
    return Case(
        query=torch.cat(step_queries),
        key=torch.cat([k[s.cached:] for k, s in zip(full_keys, specs)]),
        value=torch.cat([v[s.cached:] for v, s in zip(full_values, specs)]),
        key_cache=key_cache, value_cache=value_cache, meta=meta, params=params,
        full_keys=full_keys, full_values=full_values,
    )


def run_and_check(case, backend, tolerance):
    backend.prepare(case.meta)
    out = backend.forward(case.query, case.key, case.value, case.key_cache, case.value_cache,
                          case.meta, case.params)
    assert out.shape == case.query.shape and out.dtype == case.query.dtype
    starts = case.meta.query_start_loc
    for i in range(case.meta.num_seqs):
        expected = naive_attention(case.query[starts[i]:starts[i + 1]], case.full_keys[i],
                                   case.full_values[i], case.params)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), expected,
                                   atol=tolerance, rtol=tolerance, msg=f"sequence {i}")


def random_specs(gen, count, block_size):
    """Decodes, fresh prefills and chunked prefills over a cached prefix, many ending mid-block."""
    specs = []
    for _ in range(count):
        kind = torch.randint(0, 3, (1,), generator=gen).item()
        cached = torch.randint(1, 3 * block_size, (1,), generator=gen).item()
        if kind == 0:
            specs.append(SeqSpec(cached=cached, new=1))
        elif kind == 1:
            specs.append(SeqSpec(cached=0, new=torch.randint(1, 2 * block_size, (1,), generator=gen).item()))
        else:
            specs.append(SeqSpec(cached=cached, new=torch.randint(2, 40, (1,), generator=gen).item()))
    return specs


HEAD_LAYOUTS = [(8, 8), (8, 4), (6, 2), (8, 2), (16, 2), (8, 1), (12, 2)]  # GQA 1, 2, 3, 4, 8, MQA, 6


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("head_num,kv_head_num", HEAD_LAYOUTS)
def test_mixed_batches_match_naive_fp32(kernel, block_size, head_num, kv_head_num):
    seed = zlib.crc32(f"{kernel}{block_size}{head_num}{kv_head_num}".encode())
    gen = torch.Generator().manual_seed(seed)
    head_dim = (64, 80, 128)[seed % 3]
    specs = random_specs(gen, count=5, block_size=block_size)
    backend = CpuBackend(kernel=kernel)
    case = build_case(specs, block_size, head_num, kv_head_num, head_dim, torch.float32, seed, backend)
    run_and_check(case, backend, tolerance=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_every_head_dim_with_decode_and_chunks(kernel, head_dim):
    specs = [SeqSpec(0, 37), SeqSpec(50, 1), SeqSpec(129, 16), SeqSpec(17, 3), SeqSpec(700, 1)]
    backend = CpuBackend(kernel=kernel)
    case = build_case(specs, 16, 8, 2, head_dim, torch.float32, head_dim, backend)
    run_and_check(case, backend, tolerance=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_single_long_decode_spanning_many_partitions(kernel):
    backend = CpuBackend(kernel=kernel)
    case = build_case([SeqSpec(3000, 1)], 32, 4, 1, 64, torch.float32, 7, backend)
    run_and_check(case, backend, tolerance=1e-5)


@pytest.mark.parametrize("block_size", [40, 56])
@pytest.mark.parametrize("kv_head_num", [8, 4])  # 1 and 2 query heads per KV head
def test_decode_partitions_that_start_mid_block(block_size, kv_head_num):
    """Partition edges fall on multiples of 128 positions, which are mid-block for these block
    sizes: the decode loop must start and stop inside a block and prefetch across them."""
    backend = CpuBackend(kernel="fast")
    specs = [SeqSpec(3000, 1), SeqSpec(700, 1), SeqSpec(130, 1), SeqSpec(3, 1)]
    case = build_case(specs, block_size, 8, kv_head_num, 64, torch.float32, block_size, backend)
    plan = backend.prepare(case.meta).backend_state
    assert any(start % block_size for start in plan.part_kv_start.tolist())
    run_and_check(case, backend, tolerance=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_chunk_whose_last_partition_is_hidden_from_its_first_queries(kernel):
    """124 cached + 16 new: the KV partition [128, 140) holds no key that queries 0-3 may see."""
    backend = CpuBackend(kernel=kernel)
    case = build_case([SeqSpec(124, 16)], 16, 4, 2, 64, torch.float32, 13, backend)
    run_and_check(case, backend, tolerance=1e-5)


def test_vectorised_exp_matches_numpy():
    x = np.concatenate([-np.geomspace(1e-8, 86.9, 2000), [0.0, -87.5, -1e30]]).astype(np.float32)
    got = np.array([exp_nonpositive(v) for v in x])
    expected = np.exp(x.astype(np.float64))
    assert np.all(np.abs(got - expected) <= 1e-6 * expected + 1e-38)
    assert got[-1] == 0.0 and got[-2] == 0.0 and got[-3] == 1.0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype,block_size", [(torch.bfloat16, 16), (torch.bfloat16, 128),
                                              (torch.float16, 32)])
def test_half_precision_matches_naive(kernel, dtype, block_size):
    specs = [SeqSpec(0, 40), SeqSpec(33, 1), SeqSpec(100, 9)]
    backend = CpuBackend(kernel=kernel)
    case = build_case(specs, block_size, 8, 2, 64, dtype, block_size, backend)
    run_and_check(case, backend, tolerance=2e-2)


def test_empty_step_returns_empty_output():
    backend = CpuBackend()
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.int32),
                             block_tables=torch.zeros(0, 1, dtype=torch.int32),
                             query_start_loc=[0], seq_lens=[])
    cache = torch.zeros(2, 16, 2, 64)
    params = SelfAttentionParams(4, 2, 64, 0.125)
    empty = torch.zeros(0, 2, 64)
    out = backend.forward(torch.zeros(0, 4, 64), empty, empty, cache, cache, meta, params)
    assert out.shape == (0, 4, 64)


def test_attend_without_prepare_plans_itself():
    backend = CpuBackend()
    backend.warm_up()
    case = build_case([SeqSpec(20, 1), SeqSpec(0, 5)], 16, 4, 2, 64, torch.float32, 3, backend)
    out = backend.forward(case.query, case.key, case.value, case.key_cache, case.value_cache,
                          case.meta, case.params)
    assert case.meta.backend_state is not None
    expected = naive_attention(case.query[1:], case.full_keys[1], case.full_values[1], case.params)
    torch.testing.assert_close(out[1:].double(), expected, atol=1e-5, rtol=1e-5)


def test_fast_and_reference_agree_on_kernel_boundary_query_lengths():
    """Query lengths around the numba / tiled switch give the same result on both paths."""
    specs = [SeqSpec(40, n) for n in (15, 16, 17, 18)]
    results = []
    for kernel in KERNELS:
        backend = CpuBackend(kernel=kernel)
        case = build_case(specs, 16, 8, 2, 64, torch.float32, 11, backend)
        backend.prepare(case.meta)
        results.append(backend.forward(case.query, case.key, case.value, case.key_cache,
                                       case.value_cache, case.meta, case.params))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_plan_covers_every_kv_position_once_and_balances_threads(num_threads):
    seq_lens = [8192, 5, 300, 1, 2000] + [256] * 11
    query_lens = [1, 2, 16, 1, 40] + [1] * 11
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(slot_mapping=torch.zeros(starts[-1], dtype=torch.int32),
                             block_tables=torch.zeros(len(seq_lens), 1, dtype=torch.int32),
                             query_start_loc=starts, seq_lens=seq_lens)
    plan = plan_step(meta, max_kernel_query_len=16, num_threads=num_threads)
    assert plan.long_seqs == [4]
    served = [s for s in range(len(seq_lens)) if s != 4]
    for i, seq in enumerate(served):
        parts = range(plan.seq_part_start[i], plan.seq_part_start[i + 1])
        assert all(plan.part_seq[p] == seq for p in parts)
        covered = [pos for p in parts for pos in range(plan.part_kv_start[p], plan.part_kv_end[p])]
        assert covered == list(range(seq_lens[seq]))
    assert sorted(plan.thread_parts.tolist()) == list(range(len(plan.part_seq)))
    cost = (plan.part_kv_end - plan.part_kv_start) * [query_lens[s] for s in plan.part_seq]
    loads = [cost[plan.thread_parts[plan.thread_part_start[t]:plan.thread_part_start[t + 1]]].sum()
             for t in range(num_threads)]
    assert max(loads) - min(loads) <= cost.max()


def test_write_kv_skips_slot_minus_one():
    backend = CpuBackend()
    key_cache = torch.randn(4, 8, 2, 16)
    value_cache = torch.randn(4, 8, 2, 16)
    key, value = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([9, -1, 31, -1, 0], dtype=torch.int32)
    expected_k = key_cache.clone().view(-1, 2, 16)
    expected_v = value_cache.clone().view(-1, 2, 16)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot], expected_v[slot] = key[token], value[token]
    backend.write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache.view(-1, 2, 16), expected_k)
    assert torch.equal(value_cache.view(-1, 2, 16), expected_v)


def test_bad_inputs_raise_actionable_errors():
    backend = CpuBackend()
    case = build_case([SeqSpec(20, 2)], 16, 4, 2, 64, torch.float32, 5, backend)
    with pytest.raises(ValueError, match="query must be"):
        backend.attend(case.query[:1], case.key_cache, case.value_cache, case.meta, case.params)
    case.meta.block_tables[0, 0] = case.key_cache.shape[0]
    case.meta.backend_state = None
    with pytest.raises(ValueError, match="block ids outside"):
        backend.attend(case.query, case.key_cache, case.value_cache, case.meta, case.params)
    case.meta.seq_lens = [1]
    case.meta.backend_state = None
    with pytest.raises(ValueError, match="seq_lens"):
        backend.prepare(case.meta)
    with pytest.raises(ValueError, match="unknown cpu attention kernel"):
        CpuBackend(kernel="turbo")


PEAK_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from worker.attention import AttentionMetadata, SelfAttentionParams
    from worker.backends.cpu import CpuBackend

    def kib(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

    torch.set_num_threads(1)  # memory is the point here; one thread stays fast on a busy host
    tokens, block_size, heads, head_dim = int(sys.argv[1]), 128, 2, 32
    params = SelfAttentionParams(heads, 1, head_dim, head_dim ** -0.5)
    blocks = tokens // block_size
    backend = CpuBackend(kernel=sys.argv[2])

    def step(n):
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, dtype=torch.int32),
            block_tables=torch.arange(blocks, dtype=torch.int32)[None, :],
            query_start_loc=[0, n], seq_lens=[n])
        backend.prepare(meta)
        return backend.forward(query[:n], key[:n], key[:n], key_cache, value_cache, meta, params)

    query = torch.randn(tokens, heads, head_dim)
    key = torch.randn(tokens, 1, head_dim)
    key_cache = torch.zeros(blocks, block_size, 1, head_dim)
    value_cache = torch.zeros(blocks, block_size, 1, head_dim)
    step(block_size)  # warm up allocator and lazy imports
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # restart the peak-RSS (VmHWM) count from the current RSS
    before = kib("VmRSS")
    step(tokens)
    print(json.dumps({"peak_growth_bytes": (kib("VmHWM") - before) * 1024}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS reset")
@pytest.mark.parametrize("kernel", KERNELS)
def test_long_prefill_memory_stays_linear(kernel):
    """An 8192-token prefill would need heads x T x L x 4 bytes (512 MiB) for a full score
    matrix; the peak resident memory may grow by only a small fraction of that."""
    tokens = 8192
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(tokens), kernel],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=True,
    )
    growth = json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_bytes"]
    full_scores = 2 * tokens * tokens * 4
    assert 0 < growth < full_scores / 16, f"peak grew {growth / 2**20:.1f} MiB"


THREAD_COUNT_SCRIPT = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from worker.backends.cpu import CpuBackend
    CpuBackend(kernel="fast").warm_up()  # the process's first numba parallel call
    print(torch.get_num_threads())
""")


def test_fast_kernel_keeps_torch_thread_count():
    """numba's first parallel call starts an OpenMP pool that resets torch's thread count to the
    core count; an engine limited to one thread must stay at one (fresh process: first call)."""
    result = subprocess.run([sys.executable, "-c", THREAD_COUNT_SCRIPT], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=120, check=True)
    assert result.stdout.split()[-1] == "1"
