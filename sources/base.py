"""
The Source interface: what every driver provides to the supervisor.

A driver is an async context manager (open the device on enter, release it on
exit) with ``async read() -> bytes``. Drivers raise `broker.errors.SourceError` (or
any ``OSError``) on device trouble; they never retry on their own, because the
supervisor decides what happens next (backoff, reconnect, failover between
sources and tiers), and they never time a read out: the supervisor's watchdog
cancels a read that takes too long, so a read must leave the driver closable
when it is cancelled. The one exception is a driver with several endpoints for
one supply (the upstream ``egd`` and ``http`` sources): it moves to its next
endpoint within a read, once per endpoint and within half its watchdog, and
raises only when none answers, so that one dead upstream is not a tier change.
"""

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, Self


class Source(Protocol):
    """
    One entropy source driver.
    """

    name: str
    kind: str
    priority: int
    credit: float
    """Entropy credited per byte, in bits (0..8)."""

    @property
    def nominal_rate(self) -> float | None:
        """
        Bytes per second the source is expected to deliver, if known.
        """
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def read(self) -> bytes:
        """
        Return the next block of raw bytes (never empty).

        Raises:
            SourceError: the device failed, reached EOF or cannot be used.
        """
        ...

    def details(self) -> Mapping[str, Any]:
        """
        Driver-specific facts for status pages and metrics (an Entropy Key's
        serial, temperature, frame counters); empty when a driver has none.
        """
        ...
