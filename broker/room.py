"""
When sources may add output to the pool, and the waits a paused source parks on.

Theory of operation
-------------------
Sources may add output while one more block fits in the pool's buffer. Once
the buffer has filled up (no room for a block), they stay paused until
``resume_room`` bytes fit again: a sixteenth of the capacity, at most 64 KiB.
A fast source is then read about once per that much output drawn, not once
per withdrawal, and a source that reads in large pieces finds room for a
whole read when it resumes. The buffer itself still takes any block that
fits: only the sources' pausing has this hysteresis.

The pool tells its `Room` the level whenever it changes (`update`); sources
wait either for room (`wait_open`) or for the level to fall below a mark
(`wait_below`: a source that may fill only part of the pool). Closing wakes
every waiter.
"""

import asyncio
import contextlib

from broker.conditioner import BLOCK_BYTES

RESUME_ROOM_MOST = 64 * 1024
"""The most a full buffer must have drained before sources resume."""


class Room:
    """
    Room for sources in a buffer of ``capacity`` bytes.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.resume_room = max(BLOCK_BYTES, min(capacity // 16, RESUME_ROOM_MOST))
        """Room a full buffer must have again before sources resume."""
        self._full = False
        self._open = asyncio.Event()
        self._open.set()
        self._below: list[tuple[int, asyncio.Future[None]]] = []

    def has_space(self, level: int) -> bool:
        """
        Whether sources may add output with ``level`` bytes buffered.
        """
        room = self.capacity - level
        return room >= (self.resume_room if self._full else BLOCK_BYTES)

    def update(self, level: int) -> None:
        """
        The buffer now holds ``level`` bytes: pause or wake sources.
        """
        room = self.capacity - level
        if room < BLOCK_BYTES:
            self._full = True
        elif self._full and room >= self.resume_room:
            self._full = False
        if self._full:
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
        Wait until sources may add again (the caller checks; this only parks).
        """
        self._open.clear()
        await self._open.wait()

    async def wait_below(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        """
        Wait until the level falls below ``limit`` while sources may add.
        """
        future: asyncio.Future[None] = loop.create_future()
        entry = (limit, future)
        self._below.append(entry)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._below.remove(entry)
