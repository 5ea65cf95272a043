"""
A `broker.clock.Clock` whose time moves only when a test advances it.

Sleeps and timeouts taken on it are timers on the fake time line; `advance`
walks that line timer by timer, letting the event loop run everything that
became ready after each one, so code under test sees the same order of events
it would see in real time, only without waiting.
"""

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

# Loop turns `settle` grants: enough for a chain of tasks waking one another
# (a waiter woken by a source woken by a timer), and still instant.
SETTLE_TURNS = 50
START_WALL = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a wall clock far from zero


@dataclass(order=True)
class _Timer:
    deadline: float
    sequence: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class FakeClock:
    """
    Fake time for unit tests: starts at `START_WALL` (wall) and 0 (monotonic).
    """

    def __init__(self, wall: float = START_WALL) -> None:
        self._offset = wall
        self._now = 0.0
        self._timers: list[_Timer] = []
        self._sequence = itertools.count()

    # ---- Clock ----------------------------------------------------------------

    def time(self) -> float:
        return self._offset + self._now

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_later(seconds, wake)
        try:
            await future
        finally:
            timer.cancelled = True

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        return self._timeout(seconds)

    @contextlib.asynccontextmanager
    async def _timeout(self, seconds: float | None) -> AsyncIterator[object]:
        async with asyncio.timeout(None) as deadline:
            timer = None
            if seconds is not None:
                loop = asyncio.get_running_loop()

                def expire() -> None:
                    if deadline.when() is None:
                        deadline.reschedule(loop.time())

                timer = self.call_later(seconds, expire)
            try:
                yield deadline
            finally:
                if timer is not None:
                    timer.cancelled = True

    # ---- driving time -----------------------------------------------------------

    def call_later(self, seconds: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self._now + max(0.0, seconds), next(self._sequence), callback)
        heapq.heappush(self._timers, timer)
        return timer

    @property
    def pending(self) -> int:
        """
        Timers still to fire (sleeps and timeouts in progress).
        """
        return sum(1 for timer in self._timers if not timer.cancelled)

    async def advance(self, seconds: float) -> None:
        """
        Move time forward by ``seconds``, firing every timer due on the way.
        """
        if seconds < 0:
            raise ValueError("time does not go back")
        target = self._now + seconds
        await settle()
        while self._timers and self._timers[0].deadline <= target:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, timer.deadline)
            timer.callback()
            await settle()
        self._now = target
        await settle()

    def set_wall(self, wall: float) -> None:
        """
        Set the wall clock (as an operator setting the system time would),
        leaving the monotonic clock alone.
        """
        self._offset = wall - self._now


async def settle(turns: int = SETTLE_TURNS) -> None:
    """
    Let the event loop run what is ready, a bounded number of turns.
    """
    for _ in range(turns):
        await asyncio.sleep(0)
