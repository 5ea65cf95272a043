"""
The ``getrandom`` source: the host kernel's CSPRNG through ``os.getrandom``.

It is the fallback of last resort: always there, and never blocking once the
kernel's generator is initialised, which it is for good soon after boot. So a
read asks the kernel without blocking (``GRND_NONBLOCK``), on the event loop,
with no round trip through a worker thread: filling 64 KiB takes the kernel a
fraction of what health-testing and conditioning those bytes then takes the
loop anyway. Only while the generator is not yet initialised (early boot:
``BlockingIOError``) does a read wait in a thread.

A read returns ``read_size`` bytes, or fewer when the supervisor asks for less
(`read_up_to`: only what the pool has room to credit). With ``rate`` set,
reads are paced to that many bytes per second, each at most a quarter of a
second's worth, so the pauses between reads stay short next to the watchdog.
"""

import asyncio
import os
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import Field

from broker.configbase import ByteRate, Size, SourceConfigBase

_PACE = 0.25
"""Seconds of ``rate`` one read may take at most."""


class GetrandomSourceConfig(SourceConfigBase):
    """
    ``kind = "getrandom"``: the kernel CSPRNG.
    """

    kind: Literal["getrandom"] = Field(description="source driver")
    read_size: Size = Field(
        default=64 * 1024, ge=1, le=1 << 20, description="bytes per read"
    )
    rate: ByteRate | None = Field(
        default=None,
        description="cap on bytes drawn from the kernel, e.g. '64 KiB/s' or a plain "
        "number of bytes per second (unset: no cap)",
    )


class GetrandomSource:
    """
    Reads up to ``read_size`` bytes per call from ``os.getrandom``.
    """

    kind = "getrandom"

    def __init__(self, config: GetrandomSourceConfig) -> None:
        self.name = config.name
        self.priority = config.priority
        self.credit = config.credit
        self._rate = config.rate.per_second if config.rate else None
        self._read_size = config.read_size
        if self._rate:
            self._read_size = max(1, min(self._read_size, int(self._rate * _PACE)))
        self._next_read = 0.0

    @property
    def nominal_rate(self) -> float | None:
        return float(self._rate) if self._rate else None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def read(self) -> bytes:
        return await self.read_up_to(self._read_size)

    async def read_up_to(self, limit: int) -> bytes:
        """
        Read at most ``limit`` bytes (and at most ``read_size``).
        """
        size = max(1, min(limit, self._read_size))
        if self._rate:
            loop = asyncio.get_running_loop()
            delay = self._next_read - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._next_read = max(self._next_read, loop.time()) + size / self._rate
        try:
            return os.getrandom(size, os.GRND_NONBLOCK)
        except BlockingIOError:
            # Not initialised yet (early boot): wait for it off the loop.
            return await asyncio.to_thread(os.getrandom, size)

    def details(self) -> dict[str, Any]:
        return {}
