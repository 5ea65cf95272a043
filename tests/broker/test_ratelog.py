"""
A flood of refusals makes a handful of log lines, each saying how many it stands for.
"""

import structlog
from structlog.testing import capture_logs

from broker.ratelog import CountedLog, RateLimitedLog
from tests.fakeclock import FakeClock


async def test_one_line_per_reason_per_interval() -> None:
    """
    5,000 refusals within one interval log once; the next line, an interval
    later, counts the ones held back. Reasons are limited separately.
    """
    clock = FakeClock()
    refused = RateLimitedLog(
        structlog.get_logger("test"), "connection_refused", interval=10, clock=clock
    )
    with capture_logs() as logs:
        for _ in range(5000):
            refused("max_connections", peer="127.0.0.2")
        refused("malformed", peer="127.0.0.3")
        await clock.advance(10)
        refused("max_connections", peer="127.0.0.2")
    assert [
        ("max_connections", 0),
        ("malformed", 0),
        ("max_connections", 4999),
    ] == [(entry["reason"], entry["suppressed"]) for entry in logs]
    assert {"connection_refused"} == {entry["event"] for entry in logs}
    assert {"warning"} == {entry["log_level"] for entry in logs}


def test_counted_log_counts_every_event_and_logs_few() -> None:
    """
    Counts are exact for status and metrics while the log stays rate-limited.
    """
    refused = CountedLog(structlog.get_logger("test"), "connection_refused")
    with capture_logs() as logs:
        for _ in range(1000):
            refused("max_connections", peer="127.0.0.2")
        refused("denied", peer="127.0.0.3")
    assert {"max_connections": 1000, "denied": 1} == refused.counts()
    assert 2 == len(logs)
