"""
Shared helpers: CPU-time rates, ratio formatting and the daemon under test.
"""

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.integration.daemon import Daemon, default_config, start_daemon

REPEATS = 3
"""Runs of each noisy measurement (the daemon benchmarks); medians are compared."""


def cpu_rate(seconds: float, once: Callable[[], int]) -> float:
    """
    Call ``once`` until ``seconds`` of process CPU time have passed.

    Args:
        seconds: CPU time to spend (at least one call is made).
        once: does one unit of work and returns how many items it handled.

    Returns:
        Items per CPU second.
    """
    done = 0
    start = time.process_time()
    while True:
        done += once()
        elapsed = time.process_time() - start
        if elapsed >= seconds:
            return done / elapsed


def ratio(measured: float, baseline: float) -> str:
    """
    Format ``measured / baseline`` with sensible precision.
    """
    r = measured / baseline
    if r >= 100:
        return f"{r:,.0f}"
    if r >= 0.01:
        return f"{r:.2f}"
    return f"{r:.2e}"


def spread(results: list[float], scale: float = 1e6) -> str:
    """
    Format every run's result (divided by ``scale``) for a table cell.
    """
    return " / ".join(f"{r / scale:.2f}" for r in results)


@contextlib.contextmanager
def bench_daemon() -> Iterator[Daemon]:
    """
    The real ``ebroker serve`` (getrandom source, 1 MiB pool, EGD and HTTP on
    loopback ports), stopped on exit.
    """
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        config = default_config(tmp / "state", pool_size="1 MiB", log_level="warning")
        daemon = start_daemon(tmp, config)
        try:
            yield daemon
        finally:
            daemon.stop()
