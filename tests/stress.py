"""
Run the whole suite several times in a row while every core is kept busy.

A test that passes on a quiet machine and fails on a loaded one depends on
timing; this is where it shows. Each run gets its own random test order
(pytest-randomly), so an order dependence shows here too. Usage::

    python -m tests.stress --runs 5 [-- extra pytest arguments]

Exit status 0 only when every run passed.
"""

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _spin() -> None:
    # Pure busy work: the point is to take a core away from the suite.
    while True:
        pass


@contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """
    Keep ``count`` cores busy for as long as the block runs.
    """
    workers = [
        multiprocessing.Process(target=_spin, daemon=True, name=f"busy-{index}")
        for index in range(count)
    ]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=5, help="suite runs in a row")
    parser.add_argument(
        "--busy",
        type=int,
        default=os.cpu_count() or 2,
        help="busy-loop processes alongside (default: one per core)",
    )
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest")
    args = parser.parse_args(argv)
    outcomes: list[tuple[int, int, float]] = []
    with busy_cores(args.busy):
        for run in range(1, args.runs + 1):
            print(f"==> run {run}/{args.runs} with {args.busy} busy cores", flush=True)
            started = time.monotonic()
            code = subprocess.call(
                [sys.executable, "-m", "pytest", "-q", *args.pytest_args]
            )
            outcomes.append((run, code, time.monotonic() - started))
    for run, code, seconds in outcomes:
        verdict = "passed" if code == 0 else f"FAILED (exit {code})"
        print(f"run {run}: {verdict} in {seconds:.0f} s")
    failed = sum(1 for _, code, _ in outcomes if code != 0)
    print(f"{args.runs - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
