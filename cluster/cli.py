"""The `pagedserve` command: verbs, and one-line errors instead of tracebacks for bad input."""
from __future__ import annotations

import argparse
import logging
import sys

from cluster import daemon_cmds, demo, generate_cmd

# Errors the user can act on: bad input is a ValueError (InvalidRequestError, ModelLoadError,
# ConfigError, ...) or OSError (files, no cluster); the rest are named here and looked up only
# if their module was imported (so `pagedserve --help` imports neither torch nor Ray).
NAMED_USER_ERRORS = (("scheduler.service", "OverloadedError"),
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
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    demo.add_parser(sub)
    generate_cmd.add_parser(sub)
    daemon_cmds.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("pagedserve: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose or not isinstance(exc, user_errors()):
            raise
        print(f"pagedserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
