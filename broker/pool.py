"""
The entropy pool: conditions credited input and hands out every output byte once.

Theory of operation
-------------------
Input arrives from sources as raw bytes with a credit in bits per byte. It is
absorbed into a SHA-512 conditioner. As soon as the conditioner has absorbed at
least ``BLOCK_BITS + RESERVE_BITS`` (256 + 64 = 320) credited bits, it emits one
output block: the first 32 bytes of its digest. The other 32 bytes are never
output; they seed the next conditioner state, so entropy absorbed beyond what a
block needed is carried forward rather than lost (though never credited twice:
credit restarts from zero for each block). Input with zero credit (untrusted
client writes) is mixed into the conditioner and releases nothing.

Output blocks wait in a bounded buffer. Sources pause while the buffer is full
(`wait_for_space`); the buffer can exceed ``capacity`` by at most one source
read. Withdrawals take bytes from the front of the buffer; a byte leaves the
buffer exactly once and goes to exactly one caller. Bytes a waiter had collected
but never received (its wait timed out or was cancelled) go back to the front
of the buffer: they were never served, so serving them later is not a repeat.

Waiters queue in a `WaitPolicy`. Each turn gives the waiter at the head at most
``chunk`` bytes; a waiter that still needs more goes to the back. With the plain
`WaitQueue` blocked readers share scarce output round-robin, and nobody is ever
skipped; the broker uses `broker.accounts.WeightedWaitQueue`, which orders turns
weighted-fair across customers (the pool tells it each turn's size through
``charge``).
"""

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from broker.errors import PoolClosedError

BLOCK_BYTES = 32
BLOCK_BITS = BLOCK_BYTES * 8
RESERVE_BITS = 64
# Credit is tracked in thousandths of a bit so fractional credits stay exact.
_MILLI = 1000
_NEEDED_MILLIBITS = (BLOCK_BITS + RESERVE_BITS) * _MILLI
_COMPACT_AT = 64 * 1024


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
        Told after each turn how many bytes ``waiter`` got; weighted policies
        account with it, plain turns need not.
        """


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


@dataclass(frozen=True, slots=True)
class PoolStats:
    """
    A snapshot of the pool's counters.
    """

    capacity: int
    level: int
    waiters: int
    bytes_in: int
    credited_bits_in: int
    uncredited_bytes_in: int
    bytes_out: int
    blocks_out: int


class EntropyPool:
    """
    Conditioned, accounted, bounded store of output bytes.
    """

    def __init__(
        self,
        capacity: int = 1 << 20,
        chunk: int = 256,
        waiters: WaitPolicy | None = None,
    ) -> None:
        if capacity < BLOCK_BYTES:
            raise ValueError("pool capacity must hold at least one block")
        self.capacity = capacity
        self.chunk = chunk
        self._conditioner = hashlib.sha512(b"ebroker pool v1")
        self._credit_millibits = 0
        self._buffer = bytearray()
        self._offset = 0
        self._waiters: WaitPolicy = waiters if waiters is not None else WaitQueue()
        self._space = asyncio.Event()
        self._space.set()
        self._closed = False
        self.bytes_in = 0
        self.credited_millibits_in = 0
        self.uncredited_bytes_in = 0
        self.bytes_out = 0
        self.blocks_out = 0

    # ---- input side -------------------------------------------------------------

    def add(self, data: bytes, bits_per_byte: float) -> None:
        """
        Absorb ``data``, crediting ``bits_per_byte`` (0..8) bits for each byte.
        """
        if not data:
            return
        if not 0.0 <= bits_per_byte <= 8.0:
            raise ValueError("credit must be between 0 and 8 bits per byte")
        self.bytes_in += len(data)
        rate = round(bits_per_byte * _MILLI)
        if rate == 0:
            self.uncredited_bytes_in += len(data)
            self._conditioner.update(data)
            return
        self.credited_millibits_in += rate * len(data)
        view = memoryview(data)
        position = 0
        produced = False
        while position < len(view):
            missing = _NEEDED_MILLIBITS - self._credit_millibits
            take = -(-missing // rate)  # ceiling division
            piece = view[position : position + take]
            self._conditioner.update(piece)
            position += len(piece)
            self._credit_millibits += len(piece) * rate
            if self._credit_millibits >= _NEEDED_MILLIBITS:
                self._emit_block()
                produced = True
        if produced:
            self._dispatch()
            self._update_space()

    def mix(self, data: bytes) -> None:
        """
        Absorb ``data`` without crediting it (e.g. bytes a client wrote).
        """
        self.add(data, 0.0)

    def _emit_block(self) -> None:
        digest = self._conditioner.digest()
        self._buffer += digest[:BLOCK_BYTES]
        self._conditioner = hashlib.sha512(b"ebroker pool chain v1")
        self._conditioner.update(digest[BLOCK_BYTES:])
        # Surplus credit inside the last piece is dropped: under-crediting is safe.
        self._credit_millibits = 0
        self.blocks_out += 1

    @property
    def has_space(self) -> bool:
        return self.level < self.capacity

    async def wait_for_space(self) -> None:
        """
        Return once the output buffer is below capacity (sources call this before
        each read, which is how a full pool pauses them).
        """
        while not self.has_space and not self._closed:
            self._space.clear()
            await self._space.wait()

    def _update_space(self) -> None:
        if self.has_space:
            self._space.set()
        else:
            self._space.clear()

    # ---- output side ------------------------------------------------------------

    @property
    def level(self) -> int:
        """
        Output bytes ready to be withdrawn.
        """
        return len(self._buffer) - self._offset

    @property
    def waiters(self) -> int:
        return len(self._waiters)

    def _take(self, count: int) -> bytes:
        count = min(count, self.level)
        start = self._offset
        data = bytes(self._buffer[start : start + count])
        self._offset += count
        if self._offset >= _COMPACT_AT and self._offset * 2 >= len(self._buffer):
            del self._buffer[: self._offset]
            self._offset = 0
        return data

    def _give_back(self, data: bytes) -> None:
        if not data:
            return
        if self._offset >= len(data):
            self._offset -= len(data)
            self._buffer[self._offset : self._offset + len(data)] = data
        else:
            self._buffer[: self._offset] = b""
            self._buffer[0:0] = data
            self._offset = 0
        self._dispatch()
        self._update_space()

    def read_nowait(self, count: int) -> bytes:
        """
        Withdraw up to ``count`` bytes that are ready now (possibly none).

        Blocked readers are served as soon as output appears, so bytes are only
        ever ready when nobody is waiting: a non-blocking reader never jumps the
        queue.
        """
        if self._closed:
            raise PoolClosedError("pool is closed")
        if count <= 0 or len(self._waiters):
            return b""
        data = self._take(count)
        self.bytes_out += len(data)
        self._update_space()
        return data

    async def read(
        self,
        count: int,
        *,
        partial: bool = False,
        timeout: float | None = None,
        key: Hashable = None,
    ) -> bytes:
        """
        Withdraw ``count`` bytes, waiting for them.

        Args:
            count: bytes wanted.
            partial: return as soon as at least one byte is available (at most
                ``count``); used to stream a long read in pieces.
            timeout: give up after this many seconds; None waits forever.
            key: identity of the waiter, for fair queue policies.

        Returns:
            ``count`` bytes, or with ``partial`` between 1 and ``count`` bytes.

        Raises:
            TimeoutError: the timeout passed first; no byte was consumed.
            PoolClosedError: the pool closed while waiting.
        """
        if self._closed:
            raise PoolClosedError("pool is closed")
        if count <= 0:
            return b""
        if not len(self._waiters) and (self.level >= count or (partial and self.level)):
            return self.read_nowait(count)
        loop = asyncio.get_running_loop()
        waiter = Waiter(count, partial, loop.create_future(), key)
        self._waiters.push(waiter)
        self._dispatch()
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except BaseException:
            self._abandon(waiter)
            raise

    def _abandon(self, waiter: Waiter) -> None:
        self._waiters.remove(waiter)
        if waiter.future.done() and not waiter.future.cancelled():
            if waiter.future.exception() is None:
                unserved = waiter.future.result()
                self.bytes_out -= len(unserved)
                self._give_back(unserved)
            return
        waiter.future.cancel()
        if waiter.collected:
            self._give_back(bytes(waiter.collected))

    def _dispatch(self) -> None:
        if len(self._waiters) and self.level:
            self._serve_waiters()
            # Waiters may just have drained a full buffer: let sources resume.
            self._update_space()

    def _serve_waiters(self) -> None:
        while len(self._waiters) and self.level:
            waiter = self._waiters.peek()
            if waiter.future.done():
                self._waiters.pop()
                continue
            if waiter.partial:
                data = self._take(min(waiter.remaining, self.chunk))
                self._waiters.charge(waiter, len(data))
                self._waiters.pop()
                self.bytes_out += len(data)
                waiter.future.set_result(data)
                continue
            if waiter.collected is None:
                waiter.collected = bytearray()
            taken = self._take(min(waiter.remaining, self.chunk))
            waiter.collected += taken
            self._waiters.charge(waiter, len(taken))
            self._waiters.pop()
            if waiter.remaining:
                self._waiters.requeue(waiter)
            else:
                self.bytes_out += len(waiter.collected)
                waiter.future.set_result(bytes(waiter.collected))

    # ---- lifecycle and reporting ----------------------------------------------------

    def close(self) -> None:
        """
        Fail every waiter with `PoolClosedError` and refuse further withdrawals.
        """
        self._closed = True
        self._space.set()
        for waiter in self._waiters.drain():
            if not waiter.future.done():
                waiter.future.set_exception(PoolClosedError("pool is closed"))

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> PoolStats:
        return PoolStats(
            capacity=self.capacity,
            level=self.level,
            waiters=len(self._waiters),
            bytes_in=self.bytes_in,
            credited_bits_in=self.credited_millibits_in // _MILLI,
            uncredited_bytes_in=self.uncredited_bytes_in,
            bytes_out=self.bytes_out,
            blocks_out=self.blocks_out,
        )
