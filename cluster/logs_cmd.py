"""`pagedserve logs`: the last lines of the daemon's logs, the scheduler's, each worker's and
those of the workers gone most recently, read on the nodes they ran on."""
from __future__ import annotations

import argparse
import json

from cluster.daemon_cmds import add_address_flag
from cluster.job_cmds import FIND_TIMEOUT_S
from scheduler.gone_workers import GONE_WORKERS_KEPT
from scheduler.wording import span

DEFAULT_LINES = 40


def add_parser(sub) -> None:
    p = sub.add_parser("logs", help="the last lines of the scheduler's and workers' logs, "
                                    "from whichever node each runs on (and of the "
                                    f"{GONE_WORKERS_KEPT} workers gone most recently)")
    add_address_flag(p)
    p.add_argument("-n", "--lines", type=int, default=DEFAULT_LINES,
                   help=f"lines of each log (default {DEFAULT_LINES})")
    p.add_argument("--worker", action="append", metavar="ID",
                   help="only this worker's, after the scheduler's (repeatable; ids as "
                        "`pagedserve status` shows them, a gone worker's too)")
    p.add_argument("--json", action="store_true", help="print the tails as one JSON list")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.client import Client

    # the call waits up to 10 s for silent workers; a daemon that is not up is said at once
    client = Client(args.address, timeout_s=30, find_timeout_s=FIND_TIMEOUT_S)
    tails = client.logs(args.lines, args.worker)
    print(json.dumps(tails, indent=2) if args.json else format_tails(tails))
    return 1 if any(_not_read(tail, asked=bool(args.worker)) for tail in tails) else 0


def _not_read(tail: dict, asked: bool) -> bool:
    """A log that could not be read, and counts against the exit status: a live process's, or
    a gone worker's asked for by id. Unasked, a gone worker's log on a node that has left, or
    removed since, is to be expected: it kept every `logs` failing until 8 more workers went."""
    return "error" in tail and ("gone" not in tail or asked)


def format_tails(tails: list[dict]) -> str:
    """Each log under a header line naming whose it is, where it runs and its file."""
    out = []
    for tail in tails:
        who = "scheduler" if tail["source"] == "scheduler" else f"worker {tail['source']}"
        where = f"pid {tail['pid']} on node {tail['node_id'][:8]}" if "pid" in tail else \
            f"node {tail['node_id'][:8]}"
        if "gone" in tail:
            where += f"; gone {span(tail['gone_for_s'])} ago"
        out.append(f"== {who} ({where})" + (f": {tail['file']}" if tail.get("file") else ""))
        if "gone" in tail:
            out.append(f"   ({tail['gone']})")
        if "error" in tail:
            out.append(f"   ({tail['error']})")
        elif not tail["file"]:
            out.append("   (its stderr is not a file here: no log to show)")
        else:
            out += tail["lines"] or ["   (empty)"]
    return "\n".join(out)
