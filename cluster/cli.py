"""The `pagedserve` command: verbs, and one-line errors instead of tracebacks for bad input."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from cluster.stop_signals import Interrupted, StopSignals
from cluster.version import pagedserve_version

# Errors the user can act on: bad input is a ValueError (InvalidRequestError, ModelLoadError,
# ConfigError, ...) or OSError (files, no cluster); the rest are named here and looked up only
# if their module was imported (so `pagedserve --help` imports neither torch nor Ray).
NAMED_USER_ERRORS = (("cluster.bringup", "DaemonStartError"),
                     ("scheduler.service", "OverloadedError"),
                     ("scheduler.service", "UnknownJobError"),
                     ("cluster.client", "JobFailedError"),
                     ("worker.device", "DeviceUnavailableError"))


def user_errors() -> tuple[type[BaseException], ...]:
    found = [getattr(sys.modules[m], name) for m, name in NAMED_USER_ERRORS if m in sys.modules]
    return (ValueError, OSError, *found)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve",
        description="Distributed LLM inference on Ray: paged KV cache, continuous batching, "
                    "Ascend NPU workers, CPU simulation mode.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    parser.add_argument("--version", action="version", version=f"pagedserve {pagedserve_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    # Imported here, not at the top: some verb modules import torch, which must come after
    # main() has decided TORCH_DEVICE_BACKEND_AUTOLOAD.
    from cluster import (bench_cmd, daemon_cmds, demo, generate_cmd, job_cmds, logs_cmd,
                         selftest_cmd, serve_cmd)

    demo.add_parser(sub)
    generate_cmd.add_parser(sub)
    daemon_cmds.add_parsers(sub)
    job_cmds.add_parsers(sub)
    logs_cmd.add_parser(sub)
    selftest_cmd.add_parser(sub)
    serve_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    return parser


def requested_device(argv: list[str]) -> str | None:
    """The --device value in ``argv``, read before argparse (and torch) runs; None if absent."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.partition("=")[2]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if requested_device(argv) in (None, "cpu"):
        # Since torch 2.5 `import torch` also imports an installed torch_npu, which fails on a
        # host without CANN. cpu runs turn that off; npu runs are unaffected either way, since
        # the npu backend imports torch_npu itself. See docs/ascend.md.
        os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    _open_closed_streams()
    with StopSignals() as stop:
        try:
            args = build_parser().parse_args(argv)
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                                format="%(levelname)s %(name)s: %(message)s")
            return _run(args, stop)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            print("pagedserve: interrupted" if signum == signal.SIGINT
                  else f"pagedserve: stopped by {signal.Signals(signum).name}", file=sys.stderr)
            return 128 + signum


def _run(args: argparse.Namespace, stop: StopSignals) -> int:
    try:
        return args.func(args)
    except BrokenPipeError:  # `pagedserve jobs --json | head`: the reader left, as SIGPIPE says
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except Exception as exc:
        if stop.received is not None:  # a library turned the interrupt into another error
            raise Interrupted(stop.received) from exc
        if args.verbose or not isinstance(exc, user_errors()):
            raise
        print(f"pagedserve: error: {exc}", file=sys.stderr)
        return 2


def _open_closed_streams() -> None:
    """A standard stream the caller closed (`<&-`, `>&-`) is None in Python: read nothing
    from it, write nowhere, instead of an AttributeError traceback at the first use."""
    if sys.stdin is None:
        sys.stdin = open(os.devnull)  # noqa: SIM115 - for the life of the process
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115


if __name__ == "__main__":
    sys.exit(main())
