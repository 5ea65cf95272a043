"""
Blocked withdrawals and the order they are served in.

A blocked read from the pool is a `Waiter`. Waiters queue in a `WaitPolicy`;
each turn the pool gives the waiter at the head at most the pool's ``chunk``
bytes, and a waiter that still needs more goes to the back. With the plain
`WaitQueue` blocked readers share scarce output round-robin and nobody is ever
skipped; the broker uses `broker.accounts.WeightedWaitQueue`, which orders
turns weighted-fair across customers.

What the pool tells a policy, and asks of it:

* ``charge(waiter, n)`` after each turn (negative ``n``: bytes taken for a
  waiter that gave up went back unserved);
* ``charge_key(key, n)`` for bytes taken outside the queue: by a non-blocking
  reader (``n`` may be 0: it asked), and by a blocked read that the buffer
  answered at once while nobody was queued, once per turn it would have had,
  which must leave a policy as pushing, serving and popping that read would;
* ``turn_for(key)``, only while someone is queued: whether a reader outside
  the queue may take bytes now (it never jumps the queue);
* ``reserved(key)``: buffered bytes a reader with ``key`` must leave for
  customers whose next request is on its way, and ``release_in()``: when the
  reserve lapses.
"""

import asyncio
import contextlib
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

from broker.provenance import Runs


@dataclass(slots=True)
class Waiter:
    """
    One blocked withdrawal.
    """

    wanted: int
    partial: bool
    """Resolve as soon as some bytes arrived, instead of waiting for all of them."""
    future: asyncio.Future[bytes]
    key: Hashable = None
    """Who is waiting (a connection, a client); used by fair queue policies."""
    collected: bytearray | None = None
    provenance: Runs = field(default_factory=list)
    """Tiers of the bytes taken for this waiter so far, in order."""

    @property
    def remaining(self) -> int:
        return self.wanted - (len(self.collected) if self.collected else 0)


class WaitQueue:
    """
    Order in which blocked withdrawals are served: first come, first served, with
    a waiter that needs more going to the back after each turn.
    """

    def __init__(self) -> None:
        self._queue: deque[Waiter] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, waiter: Waiter) -> None:
        self._queue.append(waiter)

    def peek(self) -> Waiter:
        return self._queue[0]

    def pop(self) -> Waiter:
        return self._queue.popleft()

    def requeue(self, waiter: Waiter) -> None:
        self._queue.append(waiter)

    def remove(self, waiter: Waiter) -> None:
        # Already gone when the dispatcher served it before the caller gave up.
        with contextlib.suppress(ValueError):
            self._queue.remove(waiter)

    def drain(self) -> list[Waiter]:
        waiters = list(self._queue)
        self._queue.clear()
        return waiters

    def charge(self, waiter: Waiter, nbytes: int) -> None:
        """
        Told after each turn how many bytes ``waiter`` got (negative: bytes
        taken for it went back unserved); weighted policies account with it,
        plain turns need not.
        """

    def charge_key(self, key: Hashable, nbytes: int) -> None:
        """
        Told how many bytes a reader with ``key`` took outside the queue.
        """

    def turn_for(self, key: Hashable) -> bool:
        """
        A reader outside the queue never jumps it.
        """
        return not self._queue

    def reserved(self, key: Hashable) -> int:
        """
        Plain turns keep nothing back for anyone.
        """
        return 0

    def release_in(self) -> float | None:
        """
        Plain turns have no reserve to lapse.
        """
        return None


class WaitPolicy(Protocol):
    """
    What the pool needs of a waiter queue (`WaitQueue`, or a weighted one).
    """

    def __len__(self) -> int: ...

    def push(self, waiter: Waiter) -> None: ...

    def peek(self) -> Waiter: ...

    def pop(self) -> Waiter: ...

    def requeue(self, waiter: Waiter) -> None: ...

    def remove(self, waiter: Waiter) -> None: ...

    def drain(self) -> list[Waiter]: ...

    def charge(self, waiter: Waiter, nbytes: int) -> None: ...

    def charge_key(self, key: Hashable, nbytes: int) -> None: ...

    def turn_for(self, key: Hashable) -> bool: ...

    def reserved(self, key: Hashable) -> int: ...

    def release_in(self) -> float | None: ...
