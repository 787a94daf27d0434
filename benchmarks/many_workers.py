"""The scheduler under many workers' reports: simulated workers running the built-in tiny model,
whose steps take milliseconds, so that the reports reaching the one scheduler actor come
hundreds to thousands a second (each costs it ~0.6 ms of Ray's own work on this host). Prints
throughput and the relay latency of streamed tokens (engine emit -> client), per round.

A 2-core host runs every process on the same cores, so the figures measure the daemon's cost
under contention, not what a cluster of NPUs reaches.

    python -m benchmarks.many_workers [--workers 8] [--jobs-per-worker 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading

from benchmarks.common import (emit_json, machine_info, progress, stopwatch,
                               stream_relay_latency, summary_ms)
from scheduler.sampling_params import SamplingParams

OUTPUT_TOKENS = 64
STREAMED_JOBS = 32  # of each round's jobs, read as streams for the relay latency


def jobs(count: int, salt: str) -> list[str]:
    """Prompts of 7-26 tokens, new each round (no prefix cache hits)."""
    return [f"{salt} job {i}: " + "word " * (i % 20) for i in range(count)]


def one_round(client, workers: int, jobs_per_worker: int, salt: str) -> dict:
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True, temperature=0)
    relay: list[float] = []
    with stopwatch() as elapsed:
        ids = client.submit_many(jobs(workers * jobs_per_worker, salt), params)
        readers = [threading.Thread(target=stream_relay_latency, args=(client, job_id, relay))
                   for job_id in ids[:STREAMED_JOBS]]
        for reader in readers:
            reader.start()
        client.results(ids)
    for reader in readers:
        reader.join()
    tokens = len(ids) * OUTPUT_TOKENS
    return {"jobs": len(ids), "output_tokens": tokens, "wall_s": round(elapsed[0], 3),
            "output_tokens_per_s": round(tokens / elapsed[0], 1),
            "relay_latency_per_streamed_chunk": summary_ms(relay)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--jobs-per-worker", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from cluster.config import load_config, with_overrides
    from cluster.embedded import EmbeddedDaemon

    cfg = with_overrides(load_config("cpu-sim"), engine={"kv_cache_gib": 0.1},
                         cluster={"simulated_npus": args.workers, "worker_num_cpus": 0.25},
                         scheduler={"max_queued_jobs": 2 * args.workers * args.jobs_per_worker})
    progress(f"starting {args.workers} simulated workers")
    # Ray prints its processes' warnings ("N worker processes have been started") to this
    # process's stdout, which is for the JSON only
    with contextlib.redirect_stdout(sys.stderr):
        daemon = EmbeddedDaemon(cfg)
        try:
            one_round(daemon.client, args.workers, 4, "warm-up")
            rounds = []
            for r in range(args.rounds):
                rounds.append(one_round(daemon.client, args.workers, args.jobs_per_worker,
                                        f"r{r}"))
                progress(f"round {r + 1}: {rounds[-1]['output_tokens_per_s']} output tok/s")
        finally:
            daemon.close()
    emit_json({
        "benchmark": "many_workers", "machine": machine_info(), "workers": args.workers,
        "model": "tiny", "output_tokens_per_job": OUTPUT_TOKENS, "rounds": rounds,
        "median_output_tokens_per_s": statistics.median(
            r["output_tokens_per_s"] for r in rounds),
        "median_relay_p99_ms": statistics.median(
            r["relay_latency_per_streamed_chunk"]["p99_ms"] for r in rounds),
    })


if __name__ == "__main__":
    main()
