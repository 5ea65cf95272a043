"""
Benchmarks: ``make bench`` (``python -m tests.bench [NAME ...] [--json PATH]``).

Every figure is reported next to a baseline measured in the same run, and as a
ratio to it, because the machines we run on are shared and noisy. What each
benchmark measures, and the last recorded results, are in ``BENCHMARKS.md``.
``--json`` writes every figure (each run, medians, ratios) with the commit they
were measured at, after each benchmark, so an interrupted run keeps what it
measured.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.daemon import REPO

from . import (
    bench_coldstart,
    bench_egd,
    bench_entropykey,
    bench_failover,
    bench_fairness,
    bench_health,
    bench_hostile,
    bench_http,
    bench_pool,
    bench_qemu,
)
from .common import Report


def _table_only(run: Callable[[float], list[str]]) -> Callable[[float], Report]:
    return lambda seconds: Report(run(seconds))


BENCHMARKS: dict[str, Callable[[float], Report]] = {
    "pool": _table_only(bench_pool.run),
    "health": _table_only(bench_health.run),
    "entropykey": _table_only(bench_entropykey.run),
    "egd": bench_egd.run,
    "http": bench_http.run,
    "qemu": bench_qemu.run,
    "fairness": bench_fairness.run,
    "failover": bench_failover.run,
    "coldstart": bench_coldstart.run,
    "hostile": _table_only(bench_hostile.run),
}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.rstrip()


DAEMON_PATHS = ("broker", "sinks", "sources")


def _tree() -> dict[str, Any]:
    """
    The commit checked out, the daemon's files changed on top of it, and a
    digest of those changes (tracked files), so two states can be told apart.
    """
    changed = _git("status", "--porcelain", "--", *DAEMON_PATHS)
    diff = _git("diff", "HEAD", "--", *DAEMON_PATHS) or ""
    return {
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted": changed.splitlines() if changed else [],
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest(),
    }


def _meta(seconds: float) -> dict[str, Any]:
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **_tree(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], default=[])
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="time per measurement"
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="also write every figure here"
    )
    args = parser.parse_args()
    names = args.names or list(BENCHMARKS)
    meta = _meta(args.seconds)
    dirty = " (daemon code modified)" if meta["uncommitted"] else ""
    print(
        f"# ebroker benchmarks, {meta['time']} UTC, commit "
        f"{(meta['commit'] or 'unknown')[:12]}{dirty}, Python {meta['python']}, "
        f"{meta['cpus']} CPUs, {meta['machine']}, --seconds {args.seconds:g}"
    )
    print()
    results: dict[str, Any] = {"meta": meta, "benchmarks": {}}
    for name in names:
        # Each benchmark starts its own daemon, so the code it measures is
        # what is checked out when it starts: say so when that moved.
        tree = _tree()
        moved = ""
        if any(tree[key] != meta[key] for key in tree):
            moved = " (daemon code changed since the start: now at "
            moved += f"{(tree['commit'] or 'unknown')[:12]}"
            moved += ", modified)" if tree["uncommitted"] else ")"
        print(f"## {name}{moved}")
        sys.stdout.flush()
        try:
            report = BENCHMARKS[name](args.seconds)
        except Exception as exc:  # noqa: BLE001
            # One benchmark failing (the daemon under change, a tool missing
            # half-way) must not cost the figures of the others.
            report = Report([f"failed: {exc!r}"], {"failed": repr(exc)})
        for line in report.lines:
            print(line)
        print()
        sys.stdout.flush()
        results["benchmarks"][name] = {
            "tree": tree,
            "lines": report.lines,
            "data": report.data,
        }
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
