"""`pagedserve up | down | status`: bringing the daemon up and down and reporting on it, as a
driver on the cluster (its jobs' verbs are in job_cmds)."""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys

from cluster.config import load_config
from scheduler.wording import counted, span


# Lines under the status table, each shown when its key of the status is set (not 0, not empty).
# "{key:noun}" puts the count with its noun, plural unless it is 1 (see _Count).
STATUS_NOTES = (
    ("draining", "draining (`pagedserve down --drain`): new jobs are refused"),
    ("engine_failures", "engine failures: {engine_failures} (workers replaced; "
                        "{quarantined_samples:sample} waiting to run alone)"),
    ("journal_error", "journal: {journal_error}; new jobs are refused until it can be written"),
    ("stalled_workers_killed", "hung workers killed: {stalled_workers_killed} (work to do but "
                               "no step for scheduler.worker_stall_timeout_s; their jobs failed "
                               "over)"),
    ("tied_jobs_aborted", "aborted for nobody: {tied_jobs_aborted:job} of HTTP requests "
                           "whose server was gone"),
    ("jobs_resumed", "resumed at start: {jobs_resumed:unfinished job} from the journal of the "
                     "previous scheduler"),
    ("results_restored", "kept at start: the results of {results_restored:finished job} from "
                         "the journal of the previous scheduler"),
    ("journal_damage", "journal damaged at start: {journal_damage}; the jobs recorded there "
                       "were lost, or run again if they had finished"),
    ("jobs_not_resumed", "not resumed: {jobs_not_resumed:journal job} no longer valid (the "
                         "scheduler's log says why)"),
    ("placement_problem", "{placement_problem}"),
    ("last_spawn_error", "last worker start error: {last_spawn_error}"),
)


def add_parsers(sub) -> None:
    p = sub.add_parser("up", help="bring the daemon up on the running Ray cluster")
    add_address_flag(p)
    p.add_argument("--config", default=None,
                   help="a preset (cpu-sim, ascend-910b) or a YAML file; default cpu-sim")
    p.add_argument("--min-workers", type=int, default=1,
                   help="wait for this many workers to load the model (then up to 30 s more "
                        "for the others still loading; default: 1)")
    p.add_argument("--timeout", type=seconds, default=600.0,
                   help="seconds to wait for workers (default: 600)")
    p.set_defaults(func=run_up)

    p = sub.add_parser("down", help="stop the daemon (scheduler and workers)")
    add_address_flag(p)
    p.add_argument("--drain", action="store_true",
                   help="first refuse new jobs and let the unfinished ones finish")
    p.add_argument("--timeout", type=seconds, default=600.0,
                   help="with --drain: seconds to wait for them (default: 600); the journal "
                        "keeps those still unfinished for the next `up`, and the command "
                        "exits 1")
    p.set_defaults(func=run_down)

    p = sub.add_parser("status", help="workers, KV usage and jobs of the running daemon")
    add_address_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print the whole status as one JSON object (every figure the table "
                        "leaves out too)")
    p.set_defaults(func=run_status)


def seconds(text: str) -> float:
    """A finite number of seconds > 0, for argparse (which names the flag in its error)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def add_address_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")


def run_up(args: argparse.Namespace) -> int:
    from cluster import bringup

    cfg = load_config(args.config)
    bringup.connect(args.address)
    try:
        status = bringup.up(cfg, min_workers=args.min_workers, timeout=args.timeout,
                            on_wait=functools.partial(print_loading,
                                                      min_workers=args.min_workers))
    except KeyboardInterrupt:
        if bringup.find_scheduler() is not None:  # it was only this wait that stopped
            print("pagedserve: stopped waiting; the daemon goes on starting (`pagedserve "
                  "status` shows it, `pagedserve down` stops it)", file=sys.stderr)
        raise
    print(format_status(status))
    warn_config_not_applied(status)
    if status.get("drain_cancelled"):
        print("pagedserve: it was draining to go down; it takes new jobs again",
              file=sys.stderr)
    return 0


def warn_config_not_applied(status: dict, again: str = "up") -> None:
    """Says on stderr which settings of the config given the daemon already up did not take
    (to `up`: also that it was up already, when all did)."""
    if status.get("config_not_applied") == [] and again == "up":
        print("pagedserve: already up, with this config", file=sys.stderr)
    elif status.get("config_not_applied"):
        print(f"pagedserve: already up with another config, which it keeps (`pagedserve down`, "
              f"then `{again}`, to apply this one; unfinished jobs resume): "
              + "; ".join(status["config_not_applied"]), file=sys.stderr)


def print_loading(status: dict, min_workers: int = 1) -> None:
    """A line on stderr while `up` waits for workers to load the model (or, with fewer NPUs
    in the cluster than ``min_workers``, for nodes to join)."""
    ready = sum(1 for w in status["workers"] if w.get("ready"))
    loading = len(status["workers"]) - ready
    problem = f"; {status['placement_problem']}" if status.get("placement_problem") else ""
    if not problem and status.get("placeable_workers", min_workers) < min_workers:
        problem = (f"; the cluster has NPUs for {counted(status['placeable_workers'], 'worker')}"
                   f", fewer than --min-workers {min_workers}: waiting for nodes to join")
    print(f"pagedserve: waiting for workers: {ready} ready, {loading} loading the model "
          f"(up {status['uptime_s']:.0f} s){problem}", file=sys.stderr, flush=True)


def print_draining(status: dict) -> None:
    """A line on stderr while `down --drain` waits for the jobs to finish."""
    print(f"pagedserve: draining: {counted(status['jobs_unfinished'], 'job')} unfinished",
          file=sys.stderr, flush=True)


def run_down(args: argparse.Namespace) -> int:
    from cluster import bringup

    bringup.connect(args.address)
    try:
        kept = bringup.down(args.timeout if args.drain else None, on_wait=print_draining)
    except bringup.DrainCancelled:
        print("pagedserve: the drain was interrupted; the daemon stays up and takes new jobs "
              "again", file=sys.stderr)
        return 130
    except bringup.DrainEnded as exc:
        print(f"pagedserve: {exc}", file=sys.stderr)
        return 1
    except bringup.SchedulerUnanswered as exc:
        print(f"pagedserve is down; {exc}")
        return 0
    if kept is None:
        print("pagedserve was not running")
    elif kept:
        timed_out = f"the drain timed out after {args.timeout:g} s; " if args.drain else ""
        print(f"pagedserve is down; {timed_out}the journal keeps "
              f"{counted(kept, 'unfinished job')}, which the next `pagedserve up` resumes")
        return 1 if args.drain else 0  # a drain that left jobs did not do what was asked
    else:
        print("pagedserve is down")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from cluster.client import Client

    status = Client(args.address, timeout_s=5).status()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def format_status(status: dict) -> str:
    """The status table: one line per worker, then totals (80 columns)."""
    header = f"{'worker':<9} {'node':<8} {'device':<8} {'pid':>7} {'KV used/total':>13} " \
             f"{'running':>7} {'waiting':>7} {'tok/s':>7} {'prefix':>6}"
    lines = [header]
    used = total = running = waiting = hits = queried = 0
    rate = 0.0
    for w in status["workers"]:
        if not w.get("ready"):
            lines.append(f"{w['worker_id']:<9} {w.get('node_id', '')[:8]:<8} (starting)")
            continue
        kv = f"{w.get('kv_used', 0)}/{w.get('kv_total', 0)}"
        hit = _percent(w.get("prefix_hit_tokens", 0), w.get("prefix_query_tokens", 0))
        lines.append(f"{w['worker_id']:<9} {w['node_id'][:8]:<8} {_device(w):<8} "
                     f"{w['pid']:>7} {kv:>13} {w.get('running', 0):>7} {w.get('waiting', 0):>7} "
                     f"{w.get('tokens_per_s', 0.0):>7.1f} {hit:>6}")
        used += w.get("kv_used", 0)
        total += w.get("kv_total", 0)
        running += w.get("running", 0)
        waiting += w.get("waiting", 0)
        rate += w.get("tokens_per_s", 0.0)
        hits += w.get("prefix_hit_tokens", 0)
        queried += w.get("prefix_query_tokens", 0)
    ready = sum(1 for w in status["workers"] if w.get("ready"))
    held = status.get("pending_samples", 0)  # by the scheduler, for a worker to take them
    waiting = f"{waiting + held} waiting" + (f" ({held} for a worker)" if held else "")
    lines.append(f"total: {counted(ready, 'worker')} ready, {running} running, {waiting}")
    lines.append(f"{rate:.1f} tok/s, KV {used}/{total} blocks; jobs unfinished "
                 f"{status['jobs_unfinished']}, failovers {status['failovers']}")
    if queried:
        lines.append(f"prefix cache: {_percent(hits, queried)} of {queried} prompt tokens "
                     "looked up were cached")
    counts = {key: _Count(value) if type(value) is int else value
              for key, value in status.items()}
    lines += [note.format(**counts) for key, note in STATUS_NOTES if status.get(key)]
    if status.get("gone_workers"):
        lines.append(_gone_note(status["gone_workers"], status.get("workers_gone", 0)))
    return "\n".join(lines)


def _gone_note(gone: list[dict], total: int) -> str:
    latest = gone[-1]
    logs = "its log" if len(gone) == 1 else f"the last {len(gone)}'s logs"
    return (f"gone: {counted(max(total, len(gone)), 'worker')} since the scheduler started, the "
            f"last {latest['worker_id']} {span(latest['gone_for_s'])} ago ({latest['why']}); "
            f"`pagedserve logs` shows the end of {logs}")


def _percent(part: int, whole: int) -> str:
    """A prefix-cache hit rate as a table cell; "-" before any prompt was looked up."""
    return f"{100 * part / whole:.0f}%" if whole else "-"


class _Count(int):
    """A count that formats as itself, or with a format spec as that noun: "{n:job}"."""

    def __format__(self, noun: str) -> str:
        return counted(int(self), noun) if noun else str(int(self))


def _device(worker: dict) -> str:
    """A CPU-simulation worker is shown by the logical NPU it holds ("sim npu1"): every one of
    them computes on cpu:0."""
    if worker["device"].startswith("cpu") and worker.get("npu_ids"):
        return f"sim npu{worker['npu_ids'][0]}"
    return worker["device"]
