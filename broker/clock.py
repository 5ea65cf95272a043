"""
The broker's view of time, injected so that waits can be driven by a test.

Everything in the core that waits, refills, probes, times out or stamps a
period takes a `Clock`. `SYSTEM_CLOCK` is the real one; tests pass a fake whose
time moves only when the test says so, so a 30 s watchdog or a one-day quota
period is checked in microseconds and never depends on how loaded the machine
is.

Two readings, because they answer different questions: `Clock.time` is wall
time (Unix seconds) for what a person reads or a period is cut on, and
`Clock.monotonic` is for durations and rates, which must not jump when the
system clock is set.
"""

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class Clock(Protocol):
    """
    Time and waiting, as the core uses them.
    """

    def time(self) -> float:
        """
        Wall-clock time in Unix seconds.
        """
        ...

    def monotonic(self) -> float:
        """
        Seconds on a clock that never goes back; only differences mean anything.
        """
        ...

    async def sleep(self, seconds: float) -> None:
        """
        Wait ``seconds`` on this clock.
        """
        ...

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        """
        Raise `TimeoutError` out of the block once ``seconds`` pass on this
        clock (``None``: never), as `asyncio.timeout` does.
        """
        ...


class SystemClock:
    """
    The real clock: the system's time and the event loop's timers.
    """

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
