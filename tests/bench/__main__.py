"""
Benchmarks: ``make bench`` (``python -m tests.bench [NAME ...]``).

Every figure is reported next to a baseline measured in the same run, and as a
ratio to it, because the machines we run on are shared and noisy. What each
benchmark measures, and the last recorded results, are in ``BENCHMARKS.md``.
"""

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Callable

from tests.bench import (
    bench_entropykey,
    bench_health,
    bench_hostile,
    bench_pool,
    bench_sinks,
)

BENCHMARKS: dict[str, Callable[[float], list[str]]] = {
    "pool": bench_pool.run,
    "health": bench_health.run,
    "entropykey": bench_entropykey.run,
    "egd": bench_sinks.run_egd,
    "http": bench_sinks.run_http,
    "hostile": bench_hostile.run,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], default=[])
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="time per measurement"
    )
    args = parser.parse_args()
    names = args.names or list(BENCHMARKS)
    print(
        f"# ebroker benchmarks, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} "
        f"UTC, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{platform.machine()}, --seconds {args.seconds:g}"
    )
    print()
    for name in names:
        print(f"## {name}")
        for line in BENCHMARKS[name](args.seconds):
            print(line)
        print()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
