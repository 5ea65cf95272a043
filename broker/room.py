"""
When sources may add output to the pool, and the waits a paused source parks on.

Sources may add output while one more block fits in the pool's buffer. The
pool tells its `Room` the level whenever it changes (`update`); a paused
source waits either for room (`wait_open`) or for the level to fall below a
mark (`wait_below`: a source that may fill only part of the pool, or that
waits for room for a whole read). Closing wakes every waiter.
"""

import asyncio
import contextlib

from broker.conditioner import BLOCK_BYTES


class Room:
    """
    Room for sources in a buffer of ``capacity`` bytes.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._open = asyncio.Event()
        self._open.set()
        self._below: list[tuple[int, asyncio.Future[None]]] = []

    def has_space(self, level: int) -> bool:
        """
        Whether one more block fits with ``level`` bytes buffered.
        """
        return level + BLOCK_BYTES <= self.capacity

    def update(self, level: int) -> None:
        """
        The buffer now holds ``level`` bytes: pause or wake sources.
        """
        if not self.has_space(level):
            self._open.clear()
            return
        if not self._open.is_set():
            self._open.set()
        for limit, future in self._below:
            if level < limit and not future.done():
                future.set_result(None)

    def close(self) -> None:
        """
        Wake every waiter for good.
        """
        self._open.set()
        for _, future in self._below:
            if not future.done():
                future.set_result(None)

    async def wait_open(self) -> None:
        """
        Wait until a block fits again (the caller checks; this only parks).
        """
        self._open.clear()
        await self._open.wait()

    async def wait_below(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        """
        Wait until the level falls below ``limit`` while a block fits.
        """
        future: asyncio.Future[None] = loop.create_future()
        entry = (limit, future)
        self._below.append(entry)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._below.remove(entry)
