"""`pagedserve selftest`: check a device's attention backend and the tiny model against the cpu reference."""
from __future__ import annotations

import argparse

DEVICES = ("cpu", "npu", "cuda")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "selftest", help="check a device's paged attention and the tiny model against the cpu",
        description="Runs every attention case (prefill, decode, chunked, mixed; several block "
                    "sizes, head layouts and dtypes) and the tiny model on the device, compares "
                    "each with the cpu reference in float32, and prints one row per check. "
                    "Exit 0 when all pass, 1 when any fails, 2 when the device is unavailable.")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--seed", type=int, default=0, help="seed of the random cases")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch loads only now, after the CLI has decided TORCH_DEVICE_BACKEND_AUTOLOAD.
    from worker.selftest import format_table, run_selftest

    results = run_selftest(args.device, seed=args.seed)
    print(format_table(results), flush=True)
    return 0 if all(r.passed for r in results) else 1
