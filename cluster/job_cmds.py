"""`pagedserve submit | result | abort | jobs`: jobs of the running daemon, waited for or picked
up again later by id, and listed."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable

from cluster import stop_signals
from scheduler.wording import counted

FIND_TIMEOUT_S = 5.0  # to say that the daemon is not up


def add_parsers(sub) -> None:
    from cluster.daemon_cmds import add_address_flag
    from cluster.generate_cmd import add_sampling_flags

    p = sub.add_parser("submit", help="submit jobs to the running daemon and wait for them")
    add_address_flag(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", metavar="FILE.jsonl",
                     help="jobs, one JSON object per line; '-' reads stdin")
    add_sampling_flags(p, unseeded="the daemon gives each job a random seed when it accepts "
                                   "it, so a failover or restart repeats its tokens")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per job, in input order")
    p.add_argument("--no-wait", action="store_true",
                   help="print the job ids and return; `pagedserve result` picks them up")
    p.set_defaults(func=run_submit)

    ids_help = ("job ids; '-' reads them from stdin, one per line, bare or as the JSON objects "
                "`submit --no-wait --json` prints")
    p = sub.add_parser("result", help="wait for jobs by id and print their output")
    add_address_flag(p)
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID", help=ids_help)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per job, in the order given")
    p.set_defaults(func=run_result)

    p = sub.add_parser("abort", help="abort jobs by id")
    add_address_flag(p)
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID", help=ids_help)
    p.set_defaults(func=run_abort)

    p = sub.add_parser("jobs", help="list the daemon's unfinished jobs, then the latest finished")
    add_address_flag(p)
    p.add_argument("--finished", type=_count, default=20, metavar="N",
                   help="how many of the latest finished jobs to list (default: 20)")
    p.add_argument("--json", action="store_true", help="one JSON object per job")
    p.set_defaults(func=run_jobs)


def _count(text: str) -> int:
    """An integer >= 0, for argparse (which then names the flag in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def run_submit(args) -> int:
    from cluster.batch_submit import sent_by
    from cluster.client import USER_ERRORS, Client, DaemonUnavailableError
    from cluster.generate_cmd import load_jobs
    from cluster.jobs_file import located
    from scheduler.sampling_params import InvalidRequestError

    jobs = load_jobs(args)
    client = Client(args.address, find_timeout_s=FIND_TIMEOUT_S)
    batch = ([j.prompt for j in jobs], [j.params for j in jobs])
    priorities = [j.priority for j in jobs]
    paced = None
    try:
        if args.no_wait:
            _warn_if_results_may_be_forgotten(len(jobs), client.status()["max_finished_jobs"])
            ids = client.submit_many(*batch, priorities=priorities, wait_for_room=True,
                                     on_wait=_say_queue_full)
            _print_ids(ids, args.json)
            return 0
        paced = client.submit_paced(*batch, priorities=priorities, on_wait=_say_queue_full)
        failed = _print_results(args.json, client, paced, [j.params.n for j in jobs])
    except DaemonUnavailableError as exc:  # nothing can be withdrawn now
        if paced is None or not paced.submitted:
            raise
        raise DaemonUnavailableError(
            f"{exc}; the jobs this submit queued and did not print could not be withdrawn: a "
            "daemon brought down keeps the unfinished ones in its journal, and the next `up` "
            "runs them (`pagedserve jobs` lists them, `pagedserve abort` stops them)") from None
    except (*USER_ERRORS, KeyboardInterrupt) as exc:
        # all or nothing: the jobs this submit queued are withdrawn, nobody would read them
        _withdraw(client, *sent_by(exc if paced is None else paced),
                  interrupted=isinstance(exc, KeyboardInterrupt))
        if isinstance(exc, InvalidRequestError):
            raise located(exc, jobs, args.prompts) from None
        raise
    return _exit_code(failed, len(jobs))


def run_result(args) -> int:
    from cluster.client import Client

    job_ids = given_ids(args.job_ids)
    client = Client(args.address, find_timeout_s=FIND_TIMEOUT_S)
    # every id is checked before anything is printed, so a typo does not cut the output short
    samples = [len(client.status_of(job_id)["num_tokens"]) for job_id in job_ids]
    return _exit_code(_print_results(args.json, client, job_ids, samples), len(job_ids))


def run_abort(args) -> int:
    from cluster.client import Client

    job_ids = given_ids(args.job_ids)
    client = Client(args.address, find_timeout_s=FIND_TIMEOUT_S)
    for job_id in job_ids:
        client.status_of(job_id)  # an unknown id fails before any job is aborted
    for job_id in job_ids:
        print(f"aborted {job_id}" if client.abort(job_id) else f"{job_id} had already finished")
    return 0


def given_ids(args: list[str]) -> list[str]:
    """The ids on the command line, with '-' replaced by those read from stdin."""
    from cluster.jobs_file import read_lines

    ids = []
    for arg in args:
        ids += _ids_from(read_lines("-", "job ids")) if arg == "-" else [arg]
    if not ids:
        raise ValueError("no job ids on stdin")
    return ids


def _ids_from(lines) -> list[str]:
    ids = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line.startswith("{"):
            ids += [line] if line else []
            continue
        try:
            ids.append(str(json.loads(line)["job_id"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"stdin:{number}: a JSON line must be an object with a "
                             "\"job_id\"") from None
    return ids


def run_jobs(args) -> int:
    from cluster.client import Client

    listed = Client(args.address, find_timeout_s=FIND_TIMEOUT_S).jobs(args.finished)
    if args.json:
        for job in listed:
            print(json.dumps(job))
    elif not listed:
        print("no jobs")
    else:
        print(format_jobs(listed, time.time()))
    return 0


def format_jobs(jobs: list[dict], now: float) -> str:
    """One line per job: id, state, tokens so far of the most allowed, prompt tokens, age,
    workers."""
    lines = [f"{'job id':<32}  {'state':<9} {'tokens':>11} {'prompt':>6} {'age':>8}  workers"]
    for job in jobs:
        allowed = job["max_tokens"] * len(job["num_tokens"])
        tokens = f"{sum(job['num_tokens'])}/{allowed}"
        workers = ",".join(sorted({w for w in job["workers"] if w})) or "-"
        lines.append(f"{job['job_id']:<32}  {_state(job):<9} {tokens:>11} "
                     f"{job['num_prompt_tokens']:>6} {_age(now - job['arrival_time']):>8}  "
                     f"{workers}")
    return "\n".join(lines)


def _state(job: dict) -> str:
    if job["error"]:
        return "failed"
    if job["finished"]:
        return "/".join(sorted(set(job["finish_reasons"])))  # stop, length, abort
    return "running" if any(job["num_tokens"]) else "queued"  # queued: no token out yet


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def _warn_if_results_may_be_forgotten(num_jobs: int, kept: int) -> None:
    if num_jobs > kept:
        print(f"pagedserve: warning: the scheduler keeps the last {counted(kept, 'finished job')} "
              f"(scheduler.max_finished_jobs), and some of these {num_jobs} may be forgotten "
              "before `pagedserve result` reads them; a submit that waits reads each job as it "
              "finishes", file=sys.stderr)


def _say_queue_full(status: dict) -> None:
    print(f"pagedserve: the daemon's queue is full "
          f"({counted(status['jobs_unfinished'], 'unfinished job')}, "
          f"scheduler.max_queued_jobs={status['max_queued_jobs']}): waiting for room",
          file=sys.stderr, flush=True)


def _print_ids(ids: list[str], as_json: bool) -> None:
    for i, job_id in enumerate(ids):
        print(json.dumps({"index": i, "job_id": job_id}) if as_json else job_id)
    print(f"pagedserve: queued {counted(len(ids), 'job')}; `pagedserve result JOB_ID...` waits "
          "for the output", file=sys.stderr)


def _print_results(as_json: bool, client, ids: Iterable[str], samples_per_job: list[int]
                   ) -> int:
    """Each job's output in order, as ``ids`` yields them: JSON lines (with their progress on
    stderr), or the text streamed. A failed job gets its error (an "error" field, or a line
    on stderr) and the others go on; returns how many failed."""
    from cluster.client import JobFailedError
    from cluster.generate_cmd import TerminalPrinter, job_record
    from cluster.progress import progress

    failed = 0
    if as_json:
        with progress(len(samples_per_job), "jobs", "job") as bar:
            for i, (job_id, outcome) in enumerate(client.iter_results(ids)):
                if isinstance(outcome, JobFailedError):
                    record, failed = {"error": str(outcome)}, failed + 1
                else:
                    record = job_record(i, outcome)
                print(json.dumps({"index": i, "job_id": job_id, **record}), flush=True)
                bar.update()
        return failed
    printer = TerminalPrinter(samples_per_job)
    for i, job_id in enumerate(ids):
        reasons = set()
        for delta in client.stream(job_id):
            printer.on_output(i, delta)
            reasons.add(delta.finish_reason)
        if "error" in reasons:
            failed += 1
            try:
                client.result(job_id)
            except JobFailedError as exc:
                print(f"pagedserve: {exc}", file=sys.stderr, flush=True)
    return failed


def _exit_code(failed: int, total: int) -> int:
    if failed:
        print(f"pagedserve: {failed} of {counted(total, 'job')} failed", file=sys.stderr)
    return 1 if failed else 0


def _withdraw(client, job_ids: list[str], in_flight: list[str], interrupted: bool) -> None:
    """Abort the jobs this submit queued: nobody would read their results. A second Ctrl-C
    meanwhile would leave the rest running for nobody: it waits."""
    with stop_signals.deferred():
        aborted = client.withdraw(job_ids, in_flight)
    if interrupted:
        print(f"pagedserve: aborted the {counted(aborted, 'unfinished job')} of this "
              "submit", file=sys.stderr)
