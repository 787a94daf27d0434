"""Paged self-attention on the cpu backend against SDPA over contiguous K/V; prints JSON.

Run by hand: ``python benchmarks/attention.py [--quick]``. Timings are the best and the median
of interleaved repeats (best-of-N is the figure to compare on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.attention import AttentionMetadata, SelfAttentionParams  # noqa: E402
from worker.backends.cpu import CpuBackend  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
THREADS = 2


def paged_step(num_seqs, cached, new, block_size, seed=0):
    """Caches holding each sequence's ``cached`` tokens in shuffled blocks, plus this step's
    ``new`` tokens per sequence; also the same K/V laid out contiguously ``[B, kv_heads, L, d]``."""
    gen = torch.Generator().manual_seed(seed)
    kv_len = cached + new
    blocks_per_seq = -(-kv_len // block_size)
    num_blocks = num_seqs * blocks_per_seq
    tables = torch.randperm(num_blocks, generator=gen).view(num_seqs, blocks_per_seq).int()
    keys = torch.randn(num_seqs, kv_len, KV_HEADS, HEAD_DIM, generator=gen)
    values = torch.randn(num_seqs, kv_len, KV_HEADS, HEAD_DIM, generator=gen)
    shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)
    key_cache, value_cache = torch.zeros(shape), torch.zeros(shape)
    positions = torch.arange(kv_len)
    slots = tables[:, positions // block_size].long() * block_size + positions % block_size  # [B, L]
    key_cache.view(-1, KV_HEADS, HEAD_DIM)[slots[:, :cached].flatten()] = keys[:, :cached].flatten(0, 1)
    value_cache.view(-1, KV_HEADS, HEAD_DIM)[slots[:, :cached].flatten()] = values[:, :cached].flatten(0, 1)
    meta = AttentionMetadata(
        slot_mapping=slots[:, cached:].flatten().int(),
        block_tables=tables,
        query_start_loc=[i * new for i in range(num_seqs + 1)],
        seq_lens=[kv_len] * num_seqs,
    )
    return {
        "query": torch.randn(num_seqs * new, HEADS, HEAD_DIM, generator=gen),
        "key": keys[:, cached:].flatten(0, 1).contiguous(),
        "value": values[:, cached:].flatten(0, 1).contiguous(),
        "key_cache": key_cache,
        "value_cache": value_cache,
        "meta": meta,
        "contiguous_keys": keys.transpose(1, 2).contiguous(),
        "contiguous_values": values.transpose(1, 2).contiguous(),
    }


def time_interleaved(candidates: dict, repeats: int) -> dict:
    """Run every candidate once per round (so load changes hit all alike); ms best and median."""
    for fn in candidates.values():
        fn()
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"best_ms": round(min(s), 3), "median_ms": round(sorted(s)[len(s) // 2], 3)}
        for name, s in samples.items()
    }


def paged_forward(backend, step, params):
    backend.prepare(step["meta"])
    return lambda: backend.forward(
        step["query"], step["key"], step["value"], step["key_cache"], step["value_cache"],
        step["meta"], params,
    )


def gathered_sdpa(step, params):
    """The approach this backend replaced, for comparison: copy each sequence's blocks out,
    then SDPA over the copy (decode: one query per sequence, so no mask)."""
    meta, key_cache, value_cache = step["meta"], step["key_cache"], step["value_cache"]
    block_size = key_cache.shape[1]

    def gather(cache, ids, kv_len):
        return cache.index_select(0, ids).flatten(0, 1)[:kv_len].transpose(0, 1).unsqueeze(0)

    def run():
        outs = []
        for i, kv_len in enumerate(meta.seq_lens):
            q0, q1 = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            ids = meta.block_tables[i, : -(-kv_len // block_size)].long()
            k, v = gather(key_cache, ids, kv_len), gather(value_cache, ids, kv_len)
            q = step["query"][q0:q1].transpose(0, 1).unsqueeze(0)
            outs.append(F.scaled_dot_product_attention(q, k, v, scale=params.qk_scale, enable_gqa=True))
        return outs

    return run


def decode_case(block_size, repeats):
    num_seqs, cached = 32, 1024
    step = paged_step(num_seqs, cached, 1, block_size)
    params = SelfAttentionParams(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5)
    k, v = step["contiguous_keys"], step["contiguous_values"]
    group = HEADS // KV_HEADS
    k_expanded, v_expanded = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    q = step["query"].view(num_seqs, HEADS, 1, HEAD_DIM)
    q_grouped = step["query"].view(num_seqs, KV_HEADS, group, HEAD_DIM)
    scale = params.qk_scale
    times = time_interleaved({
        "paged": paged_forward(CpuBackend(kernel="fast"), step, params),
        "sdpa_enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
        "sdpa_expanded_kv": lambda: F.scaled_dot_product_attention(q, k_expanded, v_expanded, scale=scale),
        # Decode only: a KV head's query heads as one batch of queries (no mask needed).
        "sdpa_grouped_queries": lambda: F.scaled_dot_product_attention(q_grouped, k, v, scale=scale),
    }, repeats)
    slow = time_interleaved({
        "reference": paged_forward(CpuBackend(kernel="reference"), step, params),
        "gather_then_sdpa": gathered_sdpa(step, params),
    }, max(3, repeats // 4))
    ideal = min(times["sdpa_enable_gqa"]["best_ms"], times["sdpa_expanded_kv"]["best_ms"])
    return {
        "case": f"decode {num_seqs} seqs x {cached} cached, {HEADS}/{KV_HEADS} heads, d {HEAD_DIM}, fp32",
        "block_size": block_size,
        "paged_ms": times["paged"]["best_ms"],
        "contiguous_ms": ideal,
        "ratio": round(times["paged"]["best_ms"] / ideal, 3),
        "ratio_vs_grouped_queries": round(
            times["paged"]["best_ms"] / times["sdpa_grouped_queries"]["best_ms"], 3
        ),
        "reference_ms": slow["reference"]["best_ms"],
        "gather_then_sdpa_ms": slow["gather_then_sdpa"]["best_ms"],
        "detail": {**times, **slow},
    }


def prefill_case(repeats):
    num_seqs, tokens, block_size = 4, 2048, 128
    step = paged_step(num_seqs, 0, tokens, block_size)
    params = SelfAttentionParams(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5)
    q = step["query"].view(num_seqs, tokens, HEADS, HEAD_DIM).transpose(1, 2)
    k, v = step["contiguous_keys"], step["contiguous_values"]
    times = time_interleaved({
        "paged": paged_forward(CpuBackend(kernel="fast"), step, params),
        "reference": paged_forward(CpuBackend(kernel="reference"), step, params),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=params.qk_scale, enable_gqa=True
        ),
    }, repeats)
    return {
        "case": f"prefill {num_seqs} x {tokens} tokens, block {block_size}, fp32",
        "paged_ms": times["paged"]["best_ms"],
        "reference_ms": times["reference"]["best_ms"],
        "contiguous_ms": times["sdpa_causal"]["best_ms"],
        "ratio": round(times["paged"]["best_ms"] / times["sdpa_causal"]["best_ms"], 3),
        "detail": times,
    }


PEAK_MEMORY_SCRIPT = """
import json, sys, time
import torch
sys.path.insert(0, sys.argv[3])
from benchmarks.attention import HEADS, HEAD_DIM, KV_HEADS, THREADS, paged_forward, paged_step
from worker.attention import SelfAttentionParams
from worker.backends.cpu import CpuBackend

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

torch.set_num_threads(THREADS)
tokens, kernel = int(sys.argv[1]), sys.argv[2]
params = SelfAttentionParams(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM ** -0.5)
paged_forward(CpuBackend(kernel=kernel), paged_step(1, 0, 64, 128), params)()  # lazy imports
step = paged_step(1, 0, tokens, 128)
run = paged_forward(CpuBackend(kernel=kernel), step, params)
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # restart the peak-RSS (VmHWM) count from the current RSS
before = kib("VmRSS")
start = time.perf_counter()
out = run()
seconds = time.perf_counter() - start
print(json.dumps({
    "peak_growth_mib": round((kib("VmHWM") - before) / 1024, 1),
    "output_mib": round(out.numel() * 4 / 2**20, 1),
    "seconds": round(seconds, 2),
}))
"""


def long_prefill_memory(tokens, kernel):
    """Peak RSS growth over one prefill (Linux VmHWM, reset just before), in a fresh process."""
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(tokens), kernel, repo],
        capture_output=True, text=True, check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    full_scores_mib = HEADS * tokens * tokens * 4 / 2**20
    return {"case": f"single prefill of {tokens} tokens ({kernel})", **result,
            "full_score_matrix_mib": round(full_scores_mib)}


FIRST_CALL_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
start = time.perf_counter()
import torch
from benchmarks.attention import HEADS, HEAD_DIM, KV_HEADS, paged_forward, paged_step
from worker.attention import SelfAttentionParams
from worker.backends.cpu import CpuBackend
imported = time.perf_counter()
run = paged_forward(CpuBackend(), paged_step(2, 64, 1, 16), SelfAttentionParams(HEADS, KV_HEADS, HEAD_DIM, 0.1))
first = time.perf_counter(); run(); first = time.perf_counter() - first
second = time.perf_counter(); run(); second = time.perf_counter() - second
print(json.dumps({"first_call_s": round(first, 3), "second_call_ms": round(second * 1e3, 3)}))
"""


def numba_first_call():
    """First fp32 call in a fresh process: with numba's on-disk cache warm, and compiling cold."""
    repo = str(Path(__file__).resolve().parents[1])
    results = {}
    with tempfile.TemporaryDirectory() as empty_cache:
        for label, env in (("cold_compile", {"NUMBA_CACHE_DIR": empty_cache}), ("warm_cache", {})):
            out = subprocess.run(
                [sys.executable, "-c", FIRST_CALL_SCRIPT, repo], capture_output=True, text=True,
                check=True, env={**os.environ, **env},
            ).stdout
            results[label] = json.loads(out.strip().splitlines()[-1])
    return results


CASES = ("first_call", "decode", "prefill", "memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 4096-token memory case")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    repeats = 8 if args.quick else 30
    runners = {
        "first_call": numba_first_call,
        "decode": lambda: [decode_case(bs, repeats) for bs in (16, 128)],
        "prefill": lambda: prefill_case(max(3, repeats // 6)),
        "memory": lambda: [
            long_prefill_memory(4096 if args.quick else 8192, kernel) for kernel in ("reference", "fast")
        ],
    }
    report = {"threads": THREADS, **{case: runners[case]() for case in args.cases}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
