"""
The ``getrandom`` source: the host kernel's CSPRNG through ``os.getrandom``.

It is the fallback of last resort: always there, never blocking once the kernel
is seeded. Reads run in a worker thread because ``getrandom`` may block at early
boot until the kernel's CRNG is initialised.
"""

import asyncio
import os
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import Field

from broker.configbase import ByteRate, Size, SourceConfigBase


class GetrandomSourceConfig(SourceConfigBase):
    """
    ``kind = "getrandom"``: the kernel CSPRNG.
    """

    kind: Literal["getrandom"] = Field(description="source driver")
    read_size: Size = Field(
        default=4096, ge=1, le=1 << 20, description="bytes per read"
    )
    rate: ByteRate | None = Field(
        default=None,
        description="cap on bytes drawn from the kernel, e.g. '64 KiB/s' or a plain "
        "number of bytes per second (unset: no cap)",
    )


class GetrandomSource:
    """
    Reads ``read_size`` bytes per call from ``os.getrandom``.
    """

    kind = "getrandom"

    def __init__(self, config: GetrandomSourceConfig) -> None:
        self.name = config.name
        self.priority = config.priority
        self.credit = config.credit
        self._read_size = config.read_size
        self._rate = config.rate.per_second if config.rate else None
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
        if self._rate:
            loop = asyncio.get_running_loop()
            delay = self._next_read - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._next_read = (
                max(self._next_read, loop.time()) + self._read_size / self._rate
            )
        return await asyncio.to_thread(os.getrandom, self._read_size)

    def details(self) -> dict[str, Any]:
        return {}
