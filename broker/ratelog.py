"""
Logging that an attacker cannot turn into a flood.

A hostile client can be refused thousands of times a second; one log line per
refusal would fill the disk and bury everything else. `RateLimitedLog` writes
the first event of each reason at once, then at most one line per reason per
``interval`` carrying how many were suppressed since the last line. The exact
counts belong in metrics, not in the log: `CountedLog` keeps both, and is what
every sink uses for the connections it refuses or drops.
"""

from collections import Counter
from collections.abc import Mapping
from typing import Any

from structlog.typing import FilteringBoundLogger

from broker.clock import SYSTEM_CLOCK, Clock

DEFAULT_INTERVAL = 10.0


class RateLimitedLog:
    """
    One warning per reason per interval, with the count of those held back.
    """

    def __init__(
        self,
        logger: FilteringBoundLogger,
        event: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._log = logger
        self._event = event
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, reason: str, **fields: Any) -> None:
        """
        Record one event for ``reason``; log it unless one was logged lately.
        """
        now = self._clock.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self._interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        self._log.warning(self._event, reason=reason, suppressed=suppressed, **fields)


class CountedLog:
    """
    Events counted exactly by reason (for status and metrics) and logged
    through a `RateLimitedLog`: what a sink keeps of the connections it turns
    away or drops.
    """

    def __init__(self, logger: FilteringBoundLogger, event: str) -> None:
        self._counts: Counter[str] = Counter()
        self._log = RateLimitedLog(logger, event)

    def __call__(self, reason: str, **fields: Any) -> None:
        self._counts[reason] += 1
        self._log(reason, **fields)

    def counts(self) -> Mapping[str, int]:
        return dict(self._counts)
