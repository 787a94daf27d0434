"""`pagedserve demo`: the main job on the embedded default (or the running cluster) — a mixed
batch on the tiny model, with a progress bar and a summary of what the engine did."""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time

from tqdm import tqdm

from cluster.config import load_config
from scheduler.sampling_params import SamplingParams
from scheduler.wording import counted

SHARED_PREFIX = (
    "You are a careful assistant for a platform team. Answer briefly, cite the runbook section, "
    "and never restart a production node without a ticket. The cluster has eight nodes with eight "
    "accelerators each; jobs are batched continuously over a paged key-value cache. "
)
TOPICS = ["scaling out", "a dead worker", "KV cache pressure", "prefix caching", "long prompts",
          "streaming tokens", "priorities", "preemption", "the journal", "health checks"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a mixed batch of jobs through the daemon (embedded "
                                    "local Ray cluster if none is running)")
    p.add_argument("--jobs", type=int, default=48, help="number of jobs (default 48)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the jobs' lengths, prompts and sampling (default 0)")
    p.add_argument("--config", default=None, help="preset or YAML file (default cpu-sim)")
    p.set_defaults(func=run)


def demo_workload(num_jobs: int, seed: int) -> list[tuple[str, SamplingParams]]:
    """Mixed lengths; every third job shares a long prefix; seeded sampling so runs repeat."""
    rng = random.Random(seed)
    jobs = []
    for i in range(num_jobs):
        topic = rng.choice(TOPICS)
        body = f"Question {i}: what should an operator do about {topic}? " * rng.randint(1, 6)
        prompt = SHARED_PREFIX + body if i % 3 == 0 else body
        params = SamplingParams(max_tokens=rng.randint(16, 96), temperature=0.8, top_p=0.95,
                                seed=seed * 1000 + i, ignore_eos=True)
        jobs.append((prompt, params))
    return jobs


def run(args: argparse.Namespace) -> int:
    from cluster import bringup
    from cluster.client import Client
    from cluster.daemon_cmds import format_status
    from cluster.embedded import EmbeddedDaemon

    if args.jobs < 1:
        raise ValueError("--jobs must be >= 1")
    cfg = load_config(args.config)
    daemon = None
    if bringup.cluster_is_running():
        was_up = bringup.find_scheduler() is not None
        status, client = bringup.up(cfg), Client()
        if not was_up:
            print("pagedserve is now up on the running Ray cluster and stays up after the demo "
                  "(`pagedserve down` stops it)", file=sys.stderr)
    else:
        print(f"no Ray cluster running: starting an embedded one with "
              f"{counted(cfg.cluster.simulated_npus, 'simulated NPU')}", file=sys.stderr)
        daemon = EmbeddedDaemon(cfg)
        status, client = daemon.status, daemon.client
    try:
        print(format_status(status), file=sys.stderr)
        before = client.status()
        results, elapsed, final, peak_kv = _run_jobs(client, demo_workload(args.jobs, args.seed))
    finally:
        if daemon is not None:
            daemon.close()
    print(summary_table(results, elapsed, before, final, peak_kv))
    return 0


def _run_jobs(client, jobs):
    """Submit everything, then wait with a progress bar (of these jobs only: the daemon may
    run others) while watching KV usage."""
    start = time.monotonic()
    ids = client.submit_many([prompt for prompt, _ in jobs], [params for _, params in jobs],
                             wait_for_room=True)
    results: list = [None] * len(ids)
    waiter = threading.Thread(target=_collect, args=(client, ids, results), daemon=True)
    waiter.start()
    peak_kv, mine = 0.0, set(ids)
    with tqdm(total=len(ids), unit="job", desc="demo", mininterval=0.5) as bar:
        while waiter.is_alive():
            peak_kv = max(peak_kv, _kv_usage(client.status()))
            unfinished = sum(job["job_id"] in mine for job in client.jobs(finished_limit=0))
            if len(ids) - unfinished > bar.n:
                bar.update(len(ids) - unfinished - bar.n)
            waiter.join(0.3)
        bar.update(len(ids) - bar.n)
    elapsed = time.monotonic() - start
    return results, elapsed, client.status(), peak_kv


def _collect(client, ids, results) -> None:
    for i, job_id in enumerate(ids):
        results[i] = client.result(job_id)


def _kv_usage(status: dict) -> float:
    used = sum(w.get("kv_used", 0) for w in status["workers"])
    total = sum(w.get("kv_total", 0) for w in status["workers"])
    return used / total if total else 0.0


def summary_table(results, elapsed: float, before: dict, after: dict, peak_kv: float) -> str:
    """The demo's figures; counters are the workers' growth from ``before`` to ``after``, so a
    daemon that was up already adds only what ran meanwhile (other clients' jobs included)."""
    ttfts = sorted(r.ttft for r in results if r.ttft is not None)
    out_tokens = sum(len(o.token_ids) for r in results for o in r.outputs)
    workers = [w for w in after["workers"] if w.get("ready")]
    kv_total = sum(w.get("kv_total", 0) for w in workers)
    hits, queried, preempted = (_growth(before, after, key) for key in
                                ("prefix_hit_tokens", "prefix_query_tokens", "preemptions"))
    rows = [
        ("jobs", f"{len(results)} on {counted(len(workers), 'worker')}"),
        ("output tokens", f"{out_tokens}"),
        ("wall time", f"{elapsed:.2f} s"),
        ("output tokens/s", f"{out_tokens / elapsed:.1f}"),
        ("TTFT p50 / p99", f"{_pct(ttfts, 50) * 1e3:.0f} ms / {_pct(ttfts, 99) * 1e3:.0f} ms"),
        ("KV utilisation (peak)", f"{peak_kv:.1%} of {kv_total} blocks"),
        ("prefix-cache hit rate", f"{hits / queried if queried else 0.0:.1%} of "
                                  f"{queried} prompt tokens looked up"),
        ("preemptions", f"{preempted}"),
        # a scheduler restarted meanwhile counts from 0 again
        ("failovers", f"{max(0, after['failovers'] - before['failovers'])}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _growth(before: dict, after: dict, key: str) -> int:
    """How much a worker counter grew, summed over the workers (a new one from 0)."""
    start = {w["worker_id"]: w.get(key, 0) for w in before["workers"]}
    return sum(w.get(key, 0) - start.get(w["worker_id"], 0) for w in after["workers"])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]
