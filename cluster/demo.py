"""`pagedserve demo`: the main job on the embedded default — a mixed batch on the tiny model,
with a progress bar and a summary of what the engine did."""
from __future__ import annotations

import argparse
import random
import time

from tqdm import tqdm

from cluster.engine_args import add_engine_flags, engine_options
from scheduler.sampling_params import SamplingParams

SHARED_PREFIX = (
    "You are a careful assistant for a platform team. Answer briefly, cite the runbook section, "
    "and never restart a production node without a ticket. The cluster has eight nodes with eight "
    "accelerators each; jobs are batched continuously over a paged key-value cache. "
)
TOPICS = ["scaling out", "a dead worker", "KV cache pressure", "prefix caching", "long prompts",
          "streaming tokens", "priorities", "preemption", "the journal", "health checks"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a mixed batch of jobs on the built-in tiny model")
    p.add_argument("--jobs", type=int, default=48, help="number of jobs (default 48)")
    p.add_argument("--seed", type=int, default=0)
    add_engine_flags(p)
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
    from cluster.llm import LLM

    jobs = demo_workload(args.jobs, args.seed)
    llm = LLM(args.model, **engine_options(args))
    bar = tqdm(total=len(jobs), unit="job", desc="demo")
    peak = {"kv": 0.0}

    def on_output(index, delta):
        peak["kv"] = max(peak["kv"], llm.engine.stats().kv_usage)
        if delta.finished:
            bar.update(1)

    start = time.monotonic()
    results = llm.generate([p for p, _ in jobs], [s for _, s in jobs], on_output=on_output)
    elapsed = time.monotonic() - start
    bar.close()
    print(summary_table(results, elapsed, llm.engine.stats(), peak["kv"]))
    return 0


def summary_table(results, elapsed: float, stats, peak_kv: float) -> str:
    ttfts = sorted(r.ttft for r in results if r.ttft is not None)
    out_tokens = sum(len(o.token_ids) for r in results for o in r.outputs)
    rows = [
        ("jobs", f"{len(results)}"),
        ("output tokens", f"{out_tokens}"),
        ("wall time", f"{elapsed:.2f} s"),
        ("output tokens/s", f"{out_tokens / elapsed:.1f}"),
        ("TTFT p50 / p99", f"{_pct(ttfts, 50) * 1e3:.0f} ms / {_pct(ttfts, 99) * 1e3:.0f} ms"),
        ("KV utilisation (peak)", f"{peak_kv:.1%} of {stats.kv_blocks_total} blocks"),
        ("prefix-cache hit rate", f"{stats.prefix_hit_rate:.1%}"),
        ("preemptions", f"{stats.num_preemptions}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]
