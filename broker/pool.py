"""
The entropy pool: conditions credited input and hands out every output byte once.

Theory of operation
-------------------
Input arrives from sources as raw bytes with a credit in bits per byte, and
optionally the tier (priority) of the source that sent it. It is absorbed into
a keyed SHA-512 `Conditioner` (see `broker.conditioner` for the key, the reseed
policy and what a raw recording does and does not reveal). As soon as the
conditioner has absorbed at least ``BLOCK_BITS + RESERVE_BITS`` (256 + 64 =
320) credited bits, it emits one 32-byte output block. The key is credited with
nothing: output is released only against credited source input. Credit
restarts from zero for each block; entropy absorbed beyond what a block needed
is carried forward in the conditioner's state but never credited twice. Input
with zero credit (untrusted client writes) is mixed in and releases nothing.

Output blocks wait in a buffer that never holds more than ``capacity`` bytes.
A block is emitted only while there is room for all of it; when there is none,
the block stays inside the conditioner, complete and credited, until a
withdrawal makes room. Further input meanwhile is still mixed in, but its
credit is dropped: the state cannot hold more than that one block's worth, and
under-crediting is safe. Sources pause while there is no room for a block
(`wait_for_space`, `broker.room`), so that costs at most the read each had in
flight.

Withdrawals take bytes from the front of the buffer; a byte leaves the buffer
exactly once and goes to exactly one caller. Bytes a waiter had collected but
never received (its wait timed out or was cancelled) go back to the front of
the buffer: they were never served, so serving them later is not a repeat. If
new blocks filled the buffer meanwhile, the newest bytes beyond ``capacity``
are discarded (never served, so nothing is repeated; only output is lost).

Provenance: each block is attributed to the tier that contributed the most
credited bits to it (`broker.provenance`; input given without a tier counts as
tier -1 in `PoolStats`). Bytes remember their tier while buffered, while a
waiter holds them and when given back, so `PoolStats.level_by_tier` and
`PoolStats.bytes_out_by_tier` each add up to ``level`` and ``bytes_out``.

Waiters queue in a `WaitPolicy` (`broker.waiters`). Each turn gives the waiter
at the head at most ``chunk`` bytes; a waiter that still needs more goes to the
back. With the plain `WaitQueue` blocked readers share scarce output
round-robin, and nobody is ever skipped; the broker uses
`broker.accounts.WeightedWaitQueue`, which orders turns weighted-fair across
customers (the pool tells it each turn's size through ``charge``).

A weighted policy may *reserve* buffered output (`WaitPolicy.reserved`) for a
customer that is owed output and whose next request is on its way. Nobody is
made to wait for it: the reader at the head is served from the bytes beyond the
reserve, and only when the buffer holds no more than the reserve does the pass
stop, with a timer (``release_in``) to look again when the reserve lapses. The
reserve never passes half of ``capacity``, so sources always have room to add
output for everyone else. Every byte handed out is charged to its reader's
customer: a turn through ``charge``; a non-blocking read, which never jumps the
queue and leaves the reserve alone too, through ``charge_key``; bytes given
back by a waiter that gave up are charged back (a negative ``charge``).

Built for synchronous callers (protocol callbacks): while nobody is queued
and the buffer holds the bytes, `available`, `read_nowait` and `read` do O(1)
work (a reserve is only worked out when the buffer is under half full) and
create no future, timer or task. A blocked read answered at once is charged
per turn it would have had (``charge_key``), which leaves a policy as queued
turns would. The event loop is looked up once (each lookup costs a getpid).
"""

import asyncio
import contextlib
import math
import os
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from broker.conditioner import BLOCK_BYTES as BLOCK_BYTES
from broker.conditioner import Conditioner, SecretSource
from broker.errors import PoolClosedError
from broker.provenance import NO_TIER as NO_TIER
from broker.provenance import Ledger, Runs, majority_tier, stat_key
from broker.provenance import Tier as Tier
from broker.room import Room
from broker.waiters import Waiter as Waiter
from broker.waiters import WaitPolicy as WaitPolicy
from broker.waiters import WaitQueue as WaitQueue

BLOCK_BITS = BLOCK_BYTES * 8
RESERVE_BITS = 64
# Credit is tracked in thousandths of a bit so fractional credits stay exact.
_MILLI = 1000
_NEEDED_MILLIBITS = (BLOCK_BITS + RESERVE_BITS) * _MILLI
_COMPACT_AT = 64 * 1024


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
    bytes_out_by_tier: dict[int, int]
    """Bytes handed out (and not given back) per source tier; no tier is -1."""
    level_by_tier: dict[int, int]
    """Bytes buffered now per source tier; no tier is -1."""


class EntropyPool:
    """
    Conditioned, accounted, bounded store of output bytes.
    """

    def __init__(
        self,
        capacity: int = 1 << 20,
        chunk: int = 256,
        waiters: WaitPolicy | None = None,
        *,
        secret: SecretSource = os.urandom,
    ) -> None:
        """
        Args:
            capacity: most output bytes ever buffered.
            chunk: most bytes a waiter gets per turn.
            waiters: the order blocked withdrawals are served in.
            secret: where the conditioner's key and reseeds come from; tests
                pass a fixed stream to make output reproducible.
        """
        if capacity < BLOCK_BYTES:
            raise ValueError("pool capacity must hold at least one block")
        self.capacity = capacity
        self.chunk = chunk
        self._conditioner = Conditioner(secret)
        self._credit_millibits = 0
        self._block_credit: dict[Tier, int] = {}
        self._buffer = bytearray()
        self._ledger = Ledger()
        self._offset = 0
        self._waiters: WaitPolicy = waiters if waiters is not None else WaitQueue()
        self._half = capacity // 2
        """The most a policy may reserve: sources keep room for everyone else."""
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self._room = Room(capacity)
        self._closed = False
        self._release: asyncio.TimerHandle | None = None
        self.bytes_in = 0
        self.credited_millibits_in = 0
        self.uncredited_bytes_in = 0
        self.bytes_out = 0
        self.bytes_out_by_tier: dict[Tier, int] = {}
        self.blocks_out = 0
        self.bytes_discarded = 0
        """Given-back bytes that no longer fitted (never served, so never repeated)."""

    # ---- input side -------------------------------------------------------------

    def add(self, data: bytes, bits_per_byte: float, *, tier: Tier = None) -> None:
        """
        Absorb ``data``, crediting ``bits_per_byte`` (0..8) bits for each byte.

        Args:
            data: raw source bytes.
            bits_per_byte: entropy credited per byte.
            tier: priority of the source that sent ``data``, for provenance.
        """
        if not data:
            return
        if not 0.0 <= bits_per_byte <= 8.0:
            raise ValueError("credit must be between 0 and 8 bits per byte")
        self.bytes_in += len(data)
        # Down, never up: a claimed 0.0015 bits per byte must not become 2
        # millibits, and many bytes at a tiny claim must not add up to a block.
        rate = math.floor(bits_per_byte * _MILLI)
        if rate == 0:
            self.uncredited_bytes_in += len(data)
            self._conditioner.absorb(data)
            return
        self.credited_millibits_in += rate * len(data)
        size = len(data)
        position = 0
        produced = False
        conditioner = self._conditioner
        block_credit = self._block_credit
        # Input bytes of a block that starts from no credit.
        per_block = -(-_NEEDED_MILLIBITS // rate)
        while position < size:
            if self._credit_millibits >= _NEEDED_MILLIBITS:
                # No room for a complete block: blocked readers may make some.
                self._dispatch()
            missing = _NEEDED_MILLIBITS - self._credit_millibits
            if missing <= 0:
                # The block still waits for room; the state holds no more
                # credit than that, so the rest is mixed in uncredited.
                conditioner.absorb(memoryview(data)[position:])
                break
            first = -(-missing // rate)  # ceiling division
            left = size - position
            if left < first:
                # Not enough for the block: credit what there is.
                conditioner.absorb(memoryview(data)[position:])
                self._credit(tier, left * rate)
                break
            room = (self.capacity - self.level) // BLOCK_BYTES
            if not room:
                # Complete the block; it waits in the conditioner for room.
                conditioner.absorb(memoryview(data)[position : position + first])
                position += first
                self._credit(tier, first * rate)
                continue
            # As many blocks as the input backs and the buffer holds, in one
            # pass: only the first can have credit from earlier input.
            count = min(room, 1 + (left - first) // per_block)
            block_credit[tier] = block_credit.get(tier, 0) + first * rate
            first_tier = majority_tier(block_credit)
            self._buffer += conditioner.emit_blocks(
                data, position, first, per_block, count
            )
            position += first + (count - 1) * per_block
            self._ledger.append(first_tier, BLOCK_BYTES)
            if count > 1:
                self._ledger.append(tier, (count - 1) * BLOCK_BYTES)
            # Surplus credit inside a block's last piece is dropped:
            # under-crediting is safe.
            self._credit_millibits = 0
            block_credit.clear()
            self.blocks_out += count
            produced = True
        if produced:
            self._dispatch()
            self._update_space()

    def _credit(self, tier: Tier, millibits: int) -> None:
        self._credit_millibits += millibits
        self._block_credit[tier] = self._block_credit.get(tier, 0) + millibits

    def mix(self, data: bytes) -> None:
        """
        Absorb ``data`` without crediting it (e.g. bytes a client wrote).
        """
        self.add(data, 0.0)

    def _emit_block(self) -> bool:
        """
        Emit the block the conditioner holds, if it is fully credited and fits.
        """
        if self._credit_millibits < _NEEDED_MILLIBITS:
            return False
        if len(self._buffer) - self._offset + BLOCK_BYTES > self.capacity:
            return False
        self._buffer += self._conditioner.emit()
        self._ledger.append(majority_tier(self._block_credit), BLOCK_BYTES)
        # Surplus credit inside the last piece is dropped: under-crediting is safe.
        self._credit_millibits = 0
        self._block_credit.clear()
        self.blocks_out += 1
        return True

    @property
    def has_space(self) -> bool:
        """
        Whether one more block fits without the buffer passing ``capacity``.
        """
        return self._room.has_space(self.level)

    async def wait_for_space(self) -> None:
        """
        Return once the output buffer has room for a block (sources call this
        before each read, which is how a full pool pauses them).
        """
        while not self.has_space and not self._closed:
            await self._room.wait_open()

    async def wait_for_level_below(self, limit: int) -> None:
        """
        Return once the buffer holds fewer than ``limit`` bytes and has room
        for a block (or the pool is closed): how a source that may fill only
        part of the pool is paused.
        """
        if self._closed or (self.has_space and self.level < limit):
            return
        await self._room.wait_below(limit, self._running_loop())

    def _update_space(self) -> None:
        # Called whenever the level changed: a block the conditioner was
        # holding for want of room may fit now.
        if self._credit_millibits >= _NEEDED_MILLIBITS and self._emit_block():
            self._dispatch()
        self._room.update(len(self._buffer) - self._offset)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once: asking for the running loop is a getpid system call.
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

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

    def _take(self, count: int, waiter: Waiter | None = None) -> bytes:
        """
        Remove up to ``count`` bytes from the front of the buffer. Their
        provenance goes with them to ``waiter``; without one they are handed
        out at once (counted in ``bytes_out``).
        """
        buffer = self._buffer
        start = self._offset
        count = min(count, len(buffer) - start)
        end = start + count
        data = bytes(buffer[start:end])
        runs = self._ledger.take(count)
        if waiter is not None:
            waiter.provenance += runs
        elif len(runs) == 1:
            # The usual case, inline: all from one tier.
            tier = runs[0][0]
            self.bytes_out += count
            by_tier = self.bytes_out_by_tier
            by_tier[tier] = by_tier.get(tier, 0) + count
        else:
            self._count_out(runs)
        if end >= _COMPACT_AT and end * 2 >= len(buffer):
            del buffer[:end]
            end = 0
        self._offset = end
        return data

    def _count_out(self, runs: Iterable[tuple[Tier, int]], sign: int = 1) -> None:
        for tier, size in runs:
            self.bytes_out += sign * size
            self.bytes_out_by_tier[tier] = (
                self.bytes_out_by_tier.get(tier, 0) + sign * size
            )

    def _give_back(self, data: bytes, runs: Runs) -> None:
        if not data:
            return
        if self._offset >= len(data):
            self._offset -= len(data)
            self._buffer[self._offset : self._offset + len(data)] = data
        else:
            self._buffer[: self._offset] = b""
            self._buffer[0:0] = data
            self._offset = 0
        self._ledger.prepend(runs)
        excess = self.level - self.capacity
        if excess > 0:
            # Blocks emitted while these bytes were out filled the buffer:
            # the newest bytes go, as they were never served.
            del self._buffer[len(self._buffer) - excess :]
            self._ledger.drop_tail(excess)
            self.bytes_discarded += excess
        self._dispatch()
        self._update_space()

    def _reserve(self, key: Hashable) -> int:
        # Bounded so sources keep room to add output for everyone else.
        return min(self._waiters.reserved(key), self._half)

    def _spare(self, key: Hashable, wanted: int) -> int:
        """
        Buffered bytes beyond what the policy keeps for others, or just
        ``wanted`` when the buffer holds so much that no reserve can reach it.
        """
        level = len(self._buffer) - self._offset
        if level - wanted >= self._half:
            return wanted
        return level - self._reserve(key)

    def available(self, key: Hashable = None) -> int:
        """
        Bytes `read_nowait` would give a reader with ``key`` now.

        O(1) unless a weighted policy keeps a reserve for other customers
        (then O(resting customers)); creates no future and yields nothing.
        """
        waiters = self._waiters
        if len(waiters) and not waiters.turn_for(key):
            return 0
        return max(0, self.level - self._reserve(key))

    def read_nowait(self, count: int, key: Hashable = None) -> bytes:
        """
        Withdraw up to ``count`` bytes that are ready now (possibly none).

        A non-blocking reader never jumps the queue: it takes bytes only when
        the wait policy says it is ``key``'s turn (with plain turns: nobody is
        waiting), never what the policy keeps for a customer whose next request
        is on its way, and what it takes is charged to ``key``'s customer as a
        blocked turn would be. Safe to call from a protocol callback: it never
        waits, and creates no future.

        Args:
            count: most bytes wanted.
            key: identity of the reader, for fair queue policies.

        Raises:
            PoolClosedError: the pool is closed.
        """
        if self._closed:
            raise PoolClosedError("pool is closed")
        waiters = self._waiters
        if count > 0 and (not len(waiters) or waiters.turn_for(key)):
            count = min(count, self._spare(key, count))
            if count > 0:
                data = self._take(count)
                waiters.charge_key(key, count)
                self._update_space()
                return data
        waiters.charge_key(key, 0)
        return b""

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

        When nobody is queued and the buffer can answer at once, the read is
        served on the spot, with no future, timer or task switch, and charged
        as the turns that would have served it (`WaitPolicy.charge_key` per
        turn); otherwise it queues as a `Waiter`.

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
        if not len(self._waiters):
            data = self._serve_at_once(count, partial, key)
            if data:
                return data
        waiter = Waiter(count, partial, self._running_loop().create_future(), key)
        self._waiters.push(waiter)
        self._dispatch()
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except BaseException:
            self._abandon(waiter)
            raise

    def _serve_at_once(self, count: int, partial: bool, key: Hashable) -> bytes:
        """
        Serve a blocked read that nobody is queued ahead of, if the buffer can
        answer it now exactly as its turns would: a partial read's one turn,
        or a whole read that no reserve can cut short. Else return nothing.
        """
        chunk = self.chunk
        if partial:
            size = min(count, chunk, self._spare(key, min(count, chunk)))
        elif count <= chunk or self.level - count >= self._half:
            # One turn, or turns that no reserve can reach into.
            size = count if self._spare(key, count) >= count else 0
        else:
            size = 0
        if size <= 0:
            return b""
        data = self._take(size)
        charge = self._waiters.charge_key
        for turn in range(0, size, chunk):
            charge(key, min(chunk, size - turn))
        self._update_space()
        return data

    def _abandon(self, waiter: Waiter) -> None:
        self._waiters.remove(waiter)
        if waiter.future.done() and not waiter.future.cancelled():
            if waiter.future.exception() is None:
                data = waiter.future.result()
                self._count_out(waiter.provenance, -1)
                self._waiters.charge(waiter, -len(data))
                self._give_back(data, waiter.provenance)
            return
        waiter.future.cancel()
        if waiter.collected:
            # Never served: its customer is not charged for them.
            self._waiters.charge(waiter, -len(waiter.collected))
            self._give_back(bytes(waiter.collected), waiter.provenance)

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
            spare = self.level - self._reserve(waiter.key)
            if spare <= 0:
                self._arm_release(waiter.future.get_loop())
                return
            size = min(waiter.remaining, self.chunk, spare)
            if waiter.partial:
                data = self._take(size, waiter)
                self._waiters.charge(waiter, len(data))
                self._waiters.pop()
                self._count_out(waiter.provenance)
                waiter.future.set_result(data)
                continue
            if waiter.collected is None:
                waiter.collected = bytearray()
            taken = self._take(size, waiter)
            waiter.collected += taken
            self._waiters.charge(waiter, len(taken))
            self._waiters.pop()
            if waiter.remaining:
                self._waiters.requeue(waiter)
            else:
                self._count_out(waiter.provenance)
                waiter.future.set_result(bytes(waiter.collected))

    def _arm_release(self, loop: asyncio.AbstractEventLoop) -> None:
        # Any add, read or give-back looks again anyway; the timer covers a
        # customer that never returns while no source is adding.
        if self._release is not None:
            return
        delay = self._waiters.release_in()
        if delay is not None:
            self._release = loop.call_later(delay, self._released)

    def _released(self) -> None:
        self._release = None
        if not self._closed:
            self._dispatch()

    # ---- lifecycle and reporting ----------------------------------------------------

    def close(self) -> None:
        """
        Fail every waiter with `PoolClosedError` and refuse further withdrawals.
        """
        self._closed = True
        self._room.close()
        if self._release is not None:
            self._release.cancel()
            self._release = None
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
            bytes_out_by_tier={
                stat_key(tier): size for tier, size in self.bytes_out_by_tier.items()
            },
            level_by_tier={
                stat_key(tier): size
                for tier, size in self._ledger.level_by_tier.items()
            },
        )
