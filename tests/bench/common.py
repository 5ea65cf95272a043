"""
Shared helpers: CPU-time rates, ratios, medians, polling and what a benchmark
hands back.
"""

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

REPEATS = 3
"""Runs of each noisy measurement (the daemon benchmarks); medians are compared."""

POLL = 0.002
"""Seconds between two looks at a condition in another process."""


@dataclass
class Report:
    """
    What a benchmark prints (Markdown lines) and its figures for ``--json``.
    """

    lines: list[str]
    data: dict[str, Any] = field(default_factory=dict)


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
    Format ``measured / baseline`` with sensible precision; "n/a" without a
    baseline.
    """
    if not baseline:
        return "n/a"
    r = measured / baseline
    if r >= 100:
        return f"{r:,.0f}"
    if r >= 0.01:
        return f"{r:.2f}"
    return f"{r:.2e}"


def spread(results: Iterable[float], scale: float = 1e6, digits: int = 2) -> str:
    """
    Format every run's result (divided by ``scale``) for a table cell.
    """
    return " / ".join(f"{r / scale:,.{digits}f}" for r in results)


def medians(runs: Sequence[Mapping[str, float | None]]) -> dict[str, Any]:
    """
    The median of every key the runs have in common, over the runs where it
    is not None (None if it is None in every run).
    """
    keys = set(runs[0]).intersection(*runs[1:]) if runs else set()
    result: dict[str, Any] = {}
    for key in sorted(keys):
        known = [value for run in runs if (value := run[key]) is not None]
        result[key] = statistics.median(known) if known else None
    return result


def poll(predicate: Callable[[], bool], timeout: float, interval: float = POLL) -> bool:
    """
    Look at ``predicate`` until it holds or ``timeout`` seconds have passed.

    Returns:
        Whether it held.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def comparison(
    bare: Sequence[Mapping[str, float | None]],
    ours: Sequence[Mapping[str, float | None]],
    ratio_keys: Iterable[str],
) -> dict[str, Any]:
    """
    Both sides' runs and medians, and ebroker / bare of the medians of
    ``ratio_keys``, as ``--json`` records them.
    """
    bare_median, ours_median = medians(bare), medians(ours)
    return {
        "bare": {"runs": list(bare), "median": bare_median},
        "ebroker": {"runs": list(ours), "median": ours_median},
        "ratio": {
            key: ours_median[key] / bare_median[key]
            if ours_median[key] is not None and bare_median[key]
            else None
            for key in ratio_keys
        },
    }
