"""
Flow control of one EGD connection: how much work it does per turn of the event
loop, and how much output its client may hold unread.

Work per turn
-------------
Requests that complete at once (``00``, ``04``, ``01 NN`` with output ready,
``02 00``, ``03``) never make a connection's worker wait, so a client that
pipelines them could keep the event loop to itself. `TurnBudget` counts what
the worker did since it last yielded: after `TURN_REQUESTS` requests or
`TURN_BYTES` bytes of output, whichever comes first, the worker yields
(``await asyncio.sleep(0)``), so every other connection, health check, source
and signal handler gets a turn. A zero-length or no-reply request is still one
request. At about 10 µs per request a turn costs well under a millisecond.

Unread output
-------------
`OutputBound` counts what a client has been handed but not yet read, as far as
the broker's host can see it:

- the transport's user-space write buffer (``get_write_buffer_size()``), plus
- the kernel's send queue (``ioctl(TIOCOUTQ)``, i.e. ``SIOCOUTQ``): on TCP the
  bytes not yet acknowledged by the peer; on a Unix stream socket everything
  the peer has not read yet (charged as kernel memory, so a little more than
  the payload).

Before anything is withdrawn from the pool for a client, `OutputBound.room`
waits until that count is below ``max_buffered_output``; a client that stops
reading therefore holds at most ``max_buffered_output`` plus one reply (one
``chunk_size`` piece of a ``02`` read, at most 256 bytes) on the broker's host.
Over TCP the peer's own receive buffer is beyond the broker's sight: it holds
at most what the client's ``SO_RCVBUF`` lets it advertise (128 KiB by default
on Linux, and it only grows while the client reads).

Nothing tells the broker when the kernel's queue drains, so while the
transport itself is not paused the wait re-checks the count after
`ROOM_POLL_FIRST`, doubling up to `ROOM_POLL_MAX`: a stalled client costs at
most ten ``ioctl`` calls a second, and a client that resumes reading still has
the whole bound to read before the delay could matter.
"""

import asyncio
import fcntl
import struct
import termios
from collections.abc import Callable
from typing import Final

TURN_REQUESTS: Final = 32
"""Requests one connection answers before it lets others run."""
TURN_BYTES: Final = 8192
"""Output bytes one connection writes before it lets others run."""
ROOM_POLL_FIRST: Final = 0.005
ROOM_POLL_MAX: Final = 0.1

_INT = struct.Struct("i")


class TurnBudget:
    """
    What one connection did since its worker last yielded.
    """

    def __init__(
        self, requests: int = TURN_REQUESTS, output_bytes: int = TURN_BYTES
    ) -> None:
        self._max_requests = requests
        self._max_bytes = output_bytes
        self._requests = 0
        self._bytes = 0

    def wrote(self, nbytes: int) -> None:
        """
        Count ``nbytes`` of output written this turn.
        """
        self._bytes += nbytes

    def answered(self) -> None:
        """
        Count one request answered this turn (whether or not it had a reply).
        """
        self._requests += 1

    @property
    def spent(self) -> bool:
        """
        True when the connection has done its share for this turn.
        """
        return self._requests >= self._max_requests or self._bytes >= self._max_bytes

    async def yield_if_spent(self) -> None:
        """
        Let the event loop run everything else once the share is used up.
        """
        if self.spent:
            self._requests = self._bytes = 0
            await asyncio.sleep(0)


def kernel_queued(fd: int) -> int:
    """
    Bytes in the kernel's send queue of socket ``fd`` (0 if it cannot say).
    """
    try:
        reply = fcntl.ioctl(fd, termios.TIOCOUTQ, _INT.pack(0))
    except OSError:
        # A socket closing under us has nothing left to count.
        return 0
    queued: int = _INT.unpack(reply)[0]
    return max(queued, 0)


class OutputBound:
    """
    Output a client holds unread, and the wait for it to fall below the bound.

    Also the protocol's `pause_writing`/`resume_writing` helper: the
    connection forwards both here.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffered: Callable[[], int] = lambda: 0
        self._queued: Callable[[], int] = lambda: 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False

    def attach(self, buffered: Callable[[], int], queued: Callable[[], int]) -> None:
        """
        Count with ``buffered()`` (user-space buffer) and ``queued()`` (kernel).
        """
        self._buffered = buffered
        self._queued = queued

    def unread(self) -> int:
        """
        Bytes handed to the client and not yet read, as seen from this host.
        """
        return self._buffered() + self._queued()

    @property
    def paused(self) -> bool:
        """
        True while the transport's own buffer is past its high-water mark.
        """
        return not self._writable.is_set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def close(self) -> None:
        """
        Release any wait: the connection is going away.
        """
        self._closed = True
        self._writable.set()

    async def room(self) -> None:
        """
        Return once the client holds less than ``limit`` bytes unread.
        """
        delay = ROOM_POLL_FIRST
        while not self._closed and self.unread() >= self.limit:
            if not self._writable.is_set():
                await self._writable.wait()
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, ROOM_POLL_MAX)
