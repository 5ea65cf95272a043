"""
Flow control of one EGD connection: how much work it does per turn of the event
loop, and how much output its client may hold unread.

Work per turn
-------------
Requests that complete at once (``00``, ``04``, ``01 NN`` with output ready,
``02 NN`` with the bytes in the pool, ``03``) never make a connection wait, so
a client that pipelines them could keep the event loop to itself. `TurnBudget`
counts what the connection did in this callback of the loop: after
`TURN_REQUESTS` requests, or before a reply would take the turn past
`TURN_BYTES` bytes, the rest waits for the connection's worker, which yields
(``await asyncio.sleep(0)``) first, so every other connection, health check,
source and signal handler gets a turn. A zero-length or no-reply request is
still one request. At a few microseconds per request a turn costs well under a
millisecond.

Unread output
-------------
`OutputBound` counts what a client has been handed but not yet read, as far as
the broker's host can see it:

- the transport's user-space write buffer (``get_write_buffer_size()``), plus
- the kernel's send queue (``ioctl(TIOCOUTQ)``, i.e. ``SIOCOUTQ``): on TCP the
  bytes not yet acknowledged by the peer; on a Unix stream socket everything
  the peer has not read yet (charged as kernel memory, so a little more than
  the payload).

Before anything is withdrawn from the pool for a client, the answer at once
(`OutputBound.has_room`) needs the count plus the reply to stay below
``max_buffered_output``, and the worker (`OutputBound.room`) waits until the
count is below it; a client that stops
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

    __slots__ = ("_bytes", "_max_bytes", "_max_requests", "_requests")

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

    def room_for(self, nbytes: int) -> bool:
        """
        True when one more request with up to ``nbytes`` of reply fits in
        this turn.
        """
        return (
            self._requests < self._max_requests
            and self._bytes + nbytes <= self._max_bytes
        )

    def reset(self) -> None:
        """
        Start a new turn (the connection's code runs in a new callback).
        """
        self._requests = self._bytes = 0

    def spend(self) -> None:
        """
        End this turn early: the next `yield_if_spent` yields.
        """
        self._requests = self._max_requests

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
            self.reset()
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


def kernel_unread(fd: int) -> int:
    """
    Bytes the peer sent that wait unread in the kernel's receive queue of
    socket ``fd`` (0 if it cannot say).
    """
    try:
        reply = fcntl.ioctl(fd, termios.FIONREAD, _INT.pack(0))
    except OSError:
        return 0
    unread: int = _INT.unpack(reply)[0]
    return max(unread, 0)


class OutputBound:
    """
    Output a client holds unread, and the wait for it to fall below the bound.

    Also the protocol's `pause_writing`/`resume_writing` helper: the
    connection forwards both here.

    `has_room` answers without a system call while it can: everything unread
    now was either unread at the last measurement or written since, so that
    sum bounds it from above; only when the sum reaches the limit is the
    kernel asked again (``TIOCOUTQ``).
    """

    __slots__ = (
        "_buffered",
        "_closed",
        "_measured",
        "_paused",
        "_queued",
        "_resumed",
        "_since",
        "limit",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffered: Callable[[], int] = _nothing
        self._queued: Callable[[], int] = _nothing
        self._measured = 0
        self._since = 0
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None
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
        unread = self._buffered() + self._queued()
        self._measured = unread
        self._since = 0
        return unread

    def wrote(self, nbytes: int) -> None:
        """
        Count ``nbytes`` handed to the transport since the last measurement.
        """
        self._since += nbytes

    def has_room(self, more: int = 0) -> bool:
        """
        True when ``more`` bytes can be handed out without the client holding
        ``limit`` or more unread.
        """
        if self._paused:
            return False
        if self._measured + self._since + more < self.limit:
            return True
        return self.unread() + more < self.limit

    @property
    def paused(self) -> bool:
        """
        True while the transport's own buffer is past its high-water mark.
        """
        return self._paused

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    def close(self) -> None:
        """
        Release any wait: the connection is going away.
        """
        self._closed = True
        self.resume_writing()

    async def room(self) -> None:
        """
        Return once the client holds less than ``limit`` bytes unread.
        """
        delay = ROOM_POLL_FIRST
        while not self._closed and (self._paused or self.unread() >= self.limit):
            if self._paused:
                if self._resumed is None:
                    self._resumed = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._resumed)
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, ROOM_POLL_MAX)


def _nothing() -> int:
    return 0
