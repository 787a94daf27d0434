"""`pagedserve bench`: load an OpenAI-compatible completions server and report latency and
throughput, for one request rate or a sweep of them."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from scheduler.wording import counted

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "OPENAI_API_KEY"  # where OpenAI's own clients read the key
PROGRESS_TICK_S = 1.0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmark a running HTTP server (TTFT, TPOT, ITL, throughput, goodput)",
        description="Streams completions from POST {base-url}/v1/completions at a chosen arrival "
                    "rate and reports time to first token (TTFT), time per output token after "
                    "the first (TPOT), inter-token latency (ITL), end-to-end latency and "
                    "throughput. The table goes to stderr; --json prints a JSON document. "
                    "Exits 1 when any request failed (after printing the report).")
    target = p.add_argument_group("server")
    target.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help=f"server address (default {DEFAULT_BASE_URL})")
    target.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"bearer token, if the server wants one (default: ${API_KEY_ENV}, "
                             "which, unlike an argument, other users cannot read in `ps`)")
    target.add_argument("--model", default=None,
                        help="model name to send (default: the first one /v1/models lists)")
    target.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one request may take (default 120)")
    target.add_argument("--max-duration", type=float, default=3600.0,
                        help="seconds one run may take; what is unfinished then counts as "
                             "failed (default 3600)")

    load = p.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=100, help="requests per run (default 100)")
    rates = load.add_mutually_exclusive_group()
    rates.add_argument("--request-rate", default="inf",
                       help="requests per second, or inf to send all at once (default inf)")
    rates.add_argument("--sweep-rates", default=None, metavar="R1,R2,...",
                       help="run once per rate, e.g. 1,4,inf")
    load.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson",
                      help="gaps between requests: exponential, or gamma with --burstiness "
                           "(default poisson)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape: < 1 burstier, > 1 more regular (default 1, as poisson)")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="most requests in flight at once (default: no limit)")
    load.add_argument("--seed", type=int, default=0,
                      help="seed of random prompts and arrival times; run i of a sweep uses "
                           "seed + i, so that no run meets the prompts of another in the "
                           "server's prefix cache (a --dataset file's are the same every run)")

    data = p.add_argument_group("prompts")
    data.add_argument("--dataset", default="random", metavar="random|FILE.jsonl",
                      help='"random" (the default), or JSONL lines {"prompt": text or token ids, '
                           '"max_tokens": n} (cycled to --num-prompts)')
    data.add_argument("--random-input-len", type=int, default=128,
                      help="prompt length of the random dataset: tokens, or characters with "
                           "--random-prompt text (default 128)")
    data.add_argument("--random-output-len", type=int, default=64,
                      help="completion tokens of the random dataset, and the max_tokens of "
                           "dataset lines that give none (default 64)")
    data.add_argument("--random-range-ratio", type=float, default=0.5,
                      help="lengths drawn uniformly in [len*(1-r), len*(1+r)] (default 0.5)")
    data.add_argument("--random-prompt", choices=("ids", "text"), default="ids",
                      help="random token ids (default) or random words (length in characters)")
    data.add_argument("--random-vocab-size", type=int, default=256,
                      help="random token ids are drawn from [0, N) (default 256)")

    out = p.add_argument_group("output")
    out.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=None,
                     help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:3000")
    out.add_argument("--json", action="store_true", help="print the JSON document to stdout")
    out.add_argument("--output", metavar="FILE.json", default=None,
                     help="also write the JSON document here")
    out.add_argument("--per-request", action="store_true",
                     help="include every request's figures in the JSON document")
    out.add_argument("--plot", metavar="FILE.png", default=None,
                     help="draw latency CDFs and throughput vs rate (needs matplotlib)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster import bench

    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 s, got {args.timeout}")
    # each run its own seed: a later run of a sweep sending the same random prompts again
    # would find them in the server's prefix cache and look faster than it is
    specs = [bench.LoadSpec(rate, args.arrival, args.burstiness, args.seed + i,
                            args.max_concurrency, args.max_duration)
             for i, rate in enumerate(parse_rates(args))]
    slos = bench.parse_slos(args.goodput)
    if args.plot:
        from cluster.bench_plot import require_matplotlib

        require_matplotlib()
    for flag, path in (("--output", args.output), ("--plot", args.plot)):
        if path:
            check_writable(flag, path)
    workloads = load_workloads(args, [spec.seed for spec in specs])
    target = bench.Target(args.base_url, args.model, args.api_key, args.timeout)
    if target.model is None:
        target.model = asyncio.run(bench.first_model_id(args.base_url, args.api_key))
    asyncio.run(bench.check_server(target, workloads[0][0]))

    outcomes, summaries = [], []
    try:
        for spec, requests in zip(specs, workloads):
            outcome = asyncio.run(_run_with_progress(target, requests, spec))
            summary = bench.summarize(outcome, slos)
            if args.per_request:
                summary["requests"] = bench.request_records(outcome)
            print(bench.format_summary(summary), file=sys.stderr, flush=True)
            outcomes.append(outcome)
            summaries.append(summary)
            if outcome.server_gone:  # the later rates would only fail the same way
                break
    except KeyboardInterrupt:  # Ctrl-C in a sweep: the runs that finished are still results
        if summaries:
            print(f"interrupted: writing the {counted(len(summaries), 'run')} that finished",
                  file=sys.stderr)
            _write_results(args, target.model, outcomes, summaries)
        raise
    _write_results(args, target.model, outcomes, summaries)
    failed = sum(s["failed"] for s in summaries)
    if summaries[-1]["server_gone"]:
        skipped = len(specs) - len(summaries)
        not_sent = summaries[-1]["not_sent"]
        print(f"pagedserve: the server at {args.base_url} stopped accepting connections "
              f"during the run at rate {summaries[-1]['request_rate']}; {failed} of "
              f"{counted(total_requests(summaries), 'request')} failed"
              + (f" ({not_sent} not sent)" if not_sent else "")
              + (f", {counted(skipped, 'later run')} not started" if skipped else ""),
              file=sys.stderr)
        return 1
    if failed:  # not only in the table: scripts read the exit code
        print(f"pagedserve: {failed} of {counted(total_requests(summaries), 'request')} failed "
              "(see the errors above)", file=sys.stderr)
        return 1
    return 0


def total_requests(summaries: list[dict]) -> int:
    return sum(s["completed"] + s["failed"] for s in summaries)


def _write_results(args: argparse.Namespace, model: str, outcomes: list,
                   summaries: list[dict]) -> None:
    """The sweep table, and the JSON document and plot where asked for."""
    document = {"base_url": args.base_url, "model": model, "dataset": args.dataset,
                "num_prompts": args.num_prompts, "seed": args.seed, "runs": summaries}
    if len(summaries) > 1:
        print(format_sweep(summaries), file=sys.stderr)
    if args.json:
        print(json.dumps(document, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        from cluster.bench_plot import draw

        draw(outcomes, summaries, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


def check_writable(flag: str, path: str) -> None:
    """Before the run, not after it, where the error would lose the run's results."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: there is no directory {folder}")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")


def parse_rates(args: argparse.Namespace) -> list[float]:
    from cluster.bench import parse_rate

    if args.sweep_rates is None:
        return [parse_rate(args.request_rate)]
    items = [item.strip() for item in args.sweep_rates.split(",")]
    if not all(items):
        raise ValueError(f"--sweep-rates {args.sweep_rates!r} has an empty rate; give rates "
                         "separated by commas, e.g. 1,4,inf")
    return [parse_rate(item) for item in items]


def load_workloads(args: argparse.Namespace, seeds: list[int]) -> list[list]:
    """The requests of each run: random ones drawn with that run's seed; a --dataset file's,
    read once, the same for every run."""
    from cluster import bench

    if args.dataset == "random":
        return [bench.random_workload(args.num_prompts, args.random_input_len,
                                      args.random_output_len, args.random_range_ratio, seed,
                                      args.random_prompt, args.random_vocab_size)
                for seed in seeds]
    return [bench.load_dataset(args.dataset, args.num_prompts, args.random_output_len)] * len(seeds)


async def _run_with_progress(target, requests, spec):
    from cluster.bench import run_load
    from cluster.progress import progress

    rate = "inf" if spec.rate == float("inf") else f"{spec.rate:g}"
    with progress(len(requests), f"rate {rate}", "req") as bar:
        ticking = asyncio.ensure_future(_tick(bar))
        try:
            return await run_load(target, requests, spec, on_finish=lambda _: bar.update(1))
        finally:
            ticking.cancel()


async def _tick(bar) -> None:
    """Lets the progress show the time go by while no request finishes (long generations)."""
    while True:
        await asyncio.sleep(PROGRESS_TICK_S)
        bar.update(0)


def format_sweep(summaries: list[dict]) -> str:
    """One line per rate: the figures to compare across a sweep."""
    lines = [f"{'rate':>6} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>10} "
             f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'E2E p50':>9}"]
    for s in summaries:
        def ms(key, p):
            value = s[key][p]
            return f"{'-':>9}" if value is None else f"{value:9.1f}"
        lines.append(f"{str(s['request_rate']):>6} {s['completed']:>5} {s['failed']:>5} "
                     f"{s['request_throughput']:7.2f} {s['output_throughput']:10.1f} "
                     f"{ms('ttft_ms', 'p50')} {ms('ttft_ms', 'p99')} {ms('tpot_ms', 'p50')} "
                     f"{ms('e2el_ms', 'p50')}")
    return "\n".join(lines)
