"""The `pagedserve` command: verbs, and one-line errors instead of tracebacks for bad input."""
from __future__ import annotations

import argparse
import logging
import sys

from cluster import demo, generate_cmd

# Bad input surfaces as ValueError subclasses (InvalidRequestError, ModelLoadError, ...) or OSError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve",
        description="Distributed LLM inference on Ray: paged KV cache, continuous batching, "
                    "Ascend NPU workers, CPU simulation mode.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    demo.add_parser(sub)
    generate_cmd.add_parser(sub)
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
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"pagedserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
