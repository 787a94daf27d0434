"""The daemon's figures: scale-out from 1 to 2 simulated workers, and the daemon's overhead
against the in-process engine (throughput, and relay latency per streamed token).

Workload: the engine issue's — a random ~25M-parameter Llama (hidden 512, 8 layers, 8 heads,
4 KV heads, intermediate 1376, vocab 2048), 48 requests with prompts of 16-256 tokens and 64
greedy output tokens each, float32, one torch thread per engine. Run by hand; prints JSON.

Three references bound what 2 workers can reach on this host: the same single-thread matmul loop
in 1 and then 2 processes at once (how well the machine itself runs two busy processes); two
in-process engines with half of the jobs each, run at once (the daemon minus Ray); and one
in-process engine running all the jobs, then each half in turn (the pair minus contention: what
splitting the batch alone costs, as each half still pays every step's fixed cost). They run in
every round, right after the 2-worker daemon, so all are compared at the same host speed.

    python -m benchmarks.daemon [--quick] [--rounds N]
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import (LlamaShape, build_random_llama, emit_json, machine_info,
                               progress, random_token_ids, stopwatch, stream_relay_latency,
                               summary_ms, uniform_ints)
from scheduler.sampling_params import SamplingParams

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def workload(num_requests: int, output_len: int, vocab: int,
             seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """The jobs; each round gets its own seed, so no engine's prefix cache has seen them."""
    g = torch.Generator().manual_seed(seed)
    lengths = uniform_ints(g, num_requests, 16, 256)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    return [(random_token_ids(g, n, vocab), params) for n in lengths]


WARMUP_PROMPT_LENS = (1900, 300, 40, 5)  # a full 2048-token step, chunked prefill, decode


def warmup_jobs(vocab: int, copies: int = 1) -> list[tuple[list[int], SamplingParams]]:
    """Jobs that take every engine through its step shapes once (numba kernels, allocator
    growth), so the timed run is not the first big one. ``copies``: one set per worker, longest
    first, so that routing by outstanding tokens gives each worker a set when they are
    submitted together."""
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    return [(random_token_ids(g, n, vocab), params)
            for n in WARMUP_PROMPT_LENS for _ in range(copies)]


def warm_up_llm(llm) -> None:
    jobs = warmup_jobs(2048)
    llm.generate([p for p, _ in jobs], [s for _, s in jobs])


def local_engine(model_dir: Path, prefix_caching: bool = True):
    """The in-process reference: one warmed engine in this process, 1 thread."""
    from cluster.llm import LLM

    torch.set_num_threads(1)
    llm = LLM(str(model_dir), kv_cache_gib=1.0, enable_prefix_caching=prefix_caching)
    warm_up_llm(llm)
    return llm


def in_process(llm, jobs) -> dict:
    with stopwatch() as elapsed:
        outs = llm.generate([p for p, _ in jobs], [s for _, s in jobs])
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens": tokens, "wall_s": round(elapsed[0], 3),
            "output_tokens_per_s": round(tokens / elapsed[0], 2)}


MATMUL_SIZE = 256  # fits in L2: the loop measures the cores, not memory


def _matmul_gflops(barrier, results, seconds: float) -> None:
    """One thread multiplying small float32 matrices for ``seconds`` after the barrier."""
    torch.set_num_threads(1)
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    torch.mm(a, b)
    barrier.wait()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            torch.mm(a, b)
        count += 50
    results.put(count * 2 * MATMUL_SIZE**3 / (time.perf_counter() - start) / 1e9)


def _in_process_part(barrier, results, model_dir: str, jobs) -> None:
    """One engine in its own process, 1 thread, timed from the barrier on."""
    os.environ["NUMBA_NUM_THREADS"] = "1"  # as the daemon gives its workers
    llm = local_engine(Path(model_dir))
    barrier.wait()
    figures = in_process(llm, jobs)
    results.put((figures["output_tokens"], figures["wall_s"]))


def _run_processes(target, args_per_process: list[tuple]) -> list:
    """Run ``target(barrier, results, *args)`` in one spawned process per args, started
    together at a barrier; returns what each put on the results queue."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(args_per_process)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, results, *args)) for args in args_per_process]
    for proc in procs:
        proc.start()
    out = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return out


def machine_scale_out(seconds: float = 4.0) -> dict:
    one = _run_processes(_matmul_gflops, [(seconds,)])[0]
    two = _run_processes(_matmul_gflops, [(seconds,)] * 2)
    return {"method": f"{MATMUL_SIZE}x{MATMUL_SIZE} float32 torch.mm loop, 1 thread per process",
            "one_process_gflops": round(one, 1), "two_processes_gflops": [round(g, 1) for g in two],
            "scale_2_vs_1": round(sum(two) / one, 3)}


def split_without_contention(llm, jobs) -> dict:
    """All the jobs on one engine, then the pair's two halves one after the other on it: the
    halves' longer wall time bounds two workers that never slow each other down. The engine
    must not cache prefixes, or the halves would find their prompts computed."""
    whole = in_process(llm, jobs)
    halves = [in_process(llm, jobs[i::2]) for i in range(2)]
    slower = max(h["wall_s"] for h in halves)
    return {"all_jobs": whole, "halves_wall_s": [h["wall_s"] for h in halves],
            "scale_2_vs_1": round(whole["wall_s"] / slower, 3)}


def in_process_pair(model_dir: Path, jobs) -> dict:
    """Two engines in two processes, each with every other job, started together."""
    parts = _run_processes(_in_process_part, [(str(model_dir), jobs[i::2]) for i in range(2)])
    tokens, wall = sum(t for t, _ in parts), max(w for _, w in parts)
    return {"output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(tokens / wall, 2)}


@contextlib.contextmanager
def warmed_daemon(model_dir: Path, workers: int):
    """An embedded daemon with ``workers`` simulated NPUs, each warmed; yields its client."""
    from cluster.config import load_config, with_overrides
    from cluster.embedded import EmbeddedDaemon

    cfg = with_overrides(load_config("cpu-sim"),
                         engine={"model": str(model_dir), "kv_cache_gib": 1.0},
                         cluster={"simulated_npus": workers, "torch_threads": 1})
    daemon = EmbeddedDaemon(cfg)
    try:
        client = daemon.client
        warmup = client.submit_many(*zip(*warmup_jobs(2048, copies=workers)))
        warmed = {client.status_of(j)["workers"][0] for j in warmup}
        assert len(warmed) == workers, f"warm-up reached {len(warmed)} of {workers} workers"
        for job_id in warmup:
            client.result(job_id)
        yield client
    finally:
        daemon.close()


def through_daemon(client, jobs, workers: int) -> dict:
    """Throughput (results only, no client-side streaming), then relay latency measured on
    the same jobs run again with every one streamed."""
    with stopwatch() as elapsed:
        ids = client.submit_many(*zip(*jobs))  # one call: all jobs arrive together
        results = [client.result(j) for j in ids]
    placed = {client.status_of(j)["workers"][0] for j in ids}
    relay: list[float] = []
    ids = client.submit_many(*zip(*jobs))
    threads = [threading.Thread(target=stream_relay_latency, args=(client, j, relay))
               for j in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    return {"workers": workers, "workers_used": len(placed), "output_tokens": tokens,
            "wall_s": round(elapsed[0], 3), "output_tokens_per_s": round(tokens / elapsed[0], 2),
            "relay_latency_per_streamed_chunk": summary_ms(relay)}


def run_round(model_dir: Path, llm, uncached_llm, jobs, local_first: bool) -> dict:
    """The in-process engine and the 1-worker daemon run back to back (the daemon idle while
    the local engine runs), in the given order: alternating it over rounds cancels the drift
    of this host's speed within a round. Then the 2-worker daemon, the in-process pair and the
    split without contention."""
    with warmed_daemon(model_dir, 1) as client:
        if local_first:
            local, one = in_process(llm, jobs), through_daemon(client, jobs, 1)
        else:
            one, local = through_daemon(client, jobs, 1), in_process(llm, jobs)
    with warmed_daemon(model_dir, 2) as client:
        two = through_daemon(client, jobs, 2)
    return {"order": "in-process first" if local_first else "daemon first",
            "in_process": local, "daemon_1_worker": one, "daemon_2_workers": two,
            "in_process_pair": in_process_pair(model_dir, jobs),
            "split_without_contention": split_without_contention(uncached_llm, jobs)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 requests x 16 tokens (smoke run)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of in-process / 1 worker / 2 workers (default 5): this "
                             "host's speed drifts within a minute, so goals use per-round "
                             "ratios' medians")
    args = parser.parse_args(argv)
    shape = LlamaShape()
    num, out_len = (8, 16) if args.quick else (48, 64)
    from worker.models.tiny import tiny_model_dir

    rounds = []
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as scratch:
        model_dir = Path(scratch)
        progress("writing the random Llama checkpoint")
        build_random_llama(shape, model_dir, tiny_model_dir())
        llm = local_engine(model_dir)
        uncached_llm = local_engine(model_dir, prefix_caching=False)
        for r in range(max(1, args.rounds)):
            progress(f"round {r + 1}: in-process engine (1 thread) and daemon with 1 worker, "
                     f"then 2 workers, then two in-process engines at once, then the split alone")
            jobs = workload(num, out_len, shape.vocab_size, seed=r)
            rounds.append(run_round(model_dir, llm, uncached_llm, jobs, local_first=r % 2 == 0))
        progress("machine: one busy process vs two")
        machine = machine_scale_out()
    emit_json(report(rounds, machine, num, out_len))


def report(rounds: list[dict], machine: dict, num: int, out_len: int) -> dict:
    def rate(r, name):
        return r[name]["output_tokens_per_s"]

    scale = [round(rate(r, "daemon_2_workers") / rate(r, "daemon_1_worker"), 3) for r in rounds]
    overhead = [round(1 - rate(r, "daemon_1_worker") / rate(r, "in_process"), 4) for r in rounds]
    pair_scale = [round(rate(r, "in_process_pair") / rate(r, "in_process"), 3) for r in rounds]
    two_vs_pair = [round(rate(r, "daemon_2_workers") / rate(r, "in_process_pair"), 3)
                   for r in rounds]
    split = [r["split_without_contention"]["scale_2_vs_1"] for r in rounds]
    return {
        "benchmark": "daemon", "machine": machine_info(),
        "workload": {"requests": num, "prompt_len": [16, 256], "output_len": out_len,
                     "model": "random Llama hidden 512 x 8 layers, vocab 2048, float32",
                     "torch_threads_per_engine": 1},
        "rounds": rounds,
        "scale_out_2_vs_1_per_round": scale,
        "scale_out_2_vs_1": statistics.median(scale),
        "daemon_overhead_1_worker_per_round": overhead,
        "daemon_overhead_1_worker": statistics.median(overhead),
        "references": {
            "machine_scale_out": machine,
            "split_without_contention_2_vs_1_per_round": split,
            "split_without_contention_2_vs_1": statistics.median(split),
            "in_process_pair_vs_in_process_per_round": pair_scale,
            "in_process_pair_vs_in_process": statistics.median(pair_scale),
            "daemon_2_workers_vs_in_process_pair_per_round": two_vs_pair,
            "daemon_2_workers_vs_in_process_pair": statistics.median(two_vs_pair),
        },
        "goals": {"scale_out_2_vs_1": ">= 1.7", "daemon_overhead_1_worker": "<= 0.10",
                  "checked_on": "medians of the per-round ratios"},
    }


if __name__ == "__main__":
    main()
