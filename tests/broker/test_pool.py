"""
Pool accounting: output never exceeds what credited input supports, no byte is
handed out twice, and no waiter is skipped.
"""

import asyncio
import hashlib
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.conditioner import RESEED_BLOCKS, SECRET_BYTES
from broker.errors import PoolClosedError
from broker.pool import (
    BLOCK_BITS,
    BLOCK_BYTES,
    RESERVE_BITS,
    EntropyPool,
    Tier,
    Waiter,
    WaitQueue,
)
from tests.broker.test_conditioner import CountingSecret, fixed_secret
from tests.helpers import DEADLINE


def max_output(credited_bits: float) -> int:
    """
    Bytes the full-entropy rule allows for this much credited input.
    """
    return int(credited_bits // (BLOCK_BITS + RESERVE_BITS)) * BLOCK_BYTES


def test_output_needs_block_plus_64_credited_bits() -> None:
    """
    One 32-byte block needs 320 credited bits: 40 bytes at 8 bits/byte.
    """
    pool = EntropyPool(4096)
    pool.add(os.urandom(39), 8)
    assert 0 == pool.level
    pool.add(os.urandom(1), 8)
    assert BLOCK_BYTES == pool.level


def test_fractional_credit_is_exact() -> None:
    """
    At 0.5 bits/byte a block needs 640 bytes, not one fewer.
    """
    pool = EntropyPool(4096)
    pool.add(os.urandom(639), 0.5)
    assert 0 == pool.level
    pool.add(b"\x01", 0.5)
    assert BLOCK_BYTES == pool.level


def test_uncredited_input_releases_nothing() -> None:
    """
    Bytes mixed without credit (untrusted client writes) never release output.
    """
    pool = EntropyPool(4096)
    pool.mix(os.urandom(100_000))
    assert 0 == pool.level
    assert 100_000 == pool.stats().uncredited_bytes_in


def test_output_is_conditioned_not_copied() -> None:
    """
    Output is a keyed hash of the input, never the raw input itself.
    """
    key = bytes(64)
    pool = EntropyPool(4096, secret=lambda size: key)
    raw = bytes(range(40))
    pool.add(raw, 8)
    out = pool.read_nowait(32)
    assert raw[:32] != out
    label = b"ebroker conditioner v2 key"
    assert hashlib.sha512(label + key + raw).digest()[:32] == out


@settings(max_examples=200, deadline=None)
@given(
    inputs=st.lists(
        st.tuples(
            st.integers(1, 3000), st.sampled_from([0.0, 0.25, 1.0, 3.5, 7.0, 8.0])
        ),
        min_size=1,
        max_size=30,
    ),
    reads=st.lists(st.integers(0, 700), max_size=40),
)
def test_never_more_out_than_credit_supports(
    inputs: list[tuple[int, float]], reads: list[int]
) -> None:
    """
    Whatever the input sizes and credits, released bytes never exceed the
    full-entropy bound, and every byte withdrawn is distinct output.
    """
    pool = EntropyPool(1 << 20)
    credited = 0.0
    served = bytearray()
    reads_iter = iter(reads)
    for size, credit in inputs:
        pool.add(os.urandom(size), credit)
        credited += size * credit
        served += pool.read_nowait(next(reads_iter, 0))
        assert pool.level + len(served) <= max_output(credited)
    served += pool.read_nowait(1 << 20)
    assert len(served) <= max_output(credited)
    assert len(served) == pool.stats().bytes_out
    blocks = {bytes(served[i : i + 32]) for i in range(0, len(served) - 31, 32)}
    assert len(served) // 32 == len(blocks)


async def test_waiters_are_served_in_order_and_nobody_twice() -> None:
    """
    Blocked readers are served first come first served in bounded turns; the
    bytes they get are disjoint and together equal what the pool produced.
    """
    pool = EntropyPool(1 << 16, chunk=64)
    tasks = [asyncio.create_task(pool.read(100)) for _ in range(5)]
    await asyncio.sleep(0)
    assert 5 == pool.waiters
    produced = 0
    while any(not task.done() for task in tasks):
        pool.add(os.urandom(40), 8)
        produced += 32
        await asyncio.sleep(0)
    results = [await task for task in tasks]
    assert all(100 == len(result) for result in results)
    joined = b"".join(results)
    assert 500 + pool.level == produced
    chunks = {joined[i : i + 4] for i in range(0, len(joined), 4)}
    assert len(joined) // 4 == len(chunks)


async def test_a_waiter_is_never_skipped() -> None:
    """
    A large blocked read keeps its place in the rotation: it gets a chunk every
    round while later readers take their turns, and completes.
    """
    pool = EntropyPool(1 << 16, chunk=32)
    big = asyncio.create_task(pool.read(256))
    await asyncio.sleep(0)
    small = [asyncio.create_task(pool.read(32)) for _ in range(3)]
    await asyncio.sleep(0)
    for _ in range(4):
        pool.add(os.urandom(40), 8)
    await asyncio.sleep(0)
    # Turns went big, small0, small1, small2: round-robin, big got one chunk.
    assert [True, True, True] == [task.done() for task in small]
    assert not big.done()
    for _ in range(7):
        pool.add(os.urandom(40), 8)
    await asyncio.sleep(0)
    assert 256 == len(await big)


async def test_partial_reads_stream_what_is_there() -> None:
    """
    A partial (streaming) read returns as soon as any output exists.
    """
    pool = EntropyPool(4096, chunk=64)
    reader = asyncio.create_task(pool.read(255, partial=True))
    await asyncio.sleep(0)
    pool.add(os.urandom(40), 8)
    assert 32 == len(await reader)


async def test_timed_out_wait_gives_bytes_back() -> None:
    """
    A deadline that passes consumes nothing: the bytes collected so far go back
    to the pool for the next reader and are not counted as served.
    """
    pool = EntropyPool(4096, chunk=64)
    pool.add(os.urandom(40), 8)
    with pytest.raises(TimeoutError):
        await pool.read(64, timeout=0.01)
    assert 32 == pool.level
    assert 0 == pool.stats().bytes_out
    assert 32 == len(pool.read_nowait(64))


async def test_cancelled_wait_gives_bytes_back() -> None:
    """
    A reader that goes away (client disconnected) loses nothing for others.
    """
    pool = EntropyPool(4096, chunk=16)
    reader = asyncio.create_task(pool.read(64))
    await asyncio.sleep(0)
    pool.add(os.urandom(40), 8)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert 32 == pool.level
    assert 0 == pool.stats().bytes_out


async def test_nonblocking_read_does_not_jump_the_queue() -> None:
    """
    While someone is blocked, a non-blocking read gets nothing rather than the
    bytes the blocked reader is owed.
    """
    pool = EntropyPool(4096)
    blocked = asyncio.create_task(pool.read(64))
    await asyncio.sleep(0)
    pool.add(os.urandom(40), 8)
    assert b"" == pool.read_nowait(16)
    pool.add(os.urandom(40), 8)
    assert 64 == len(await blocked)


async def test_full_pool_pauses_sources_until_drained() -> None:
    """
    A full output buffer makes wait_for_space block; a withdrawal releases it.
    """
    pool = EntropyPool(64)
    pool.add(os.urandom(80), 8)
    assert not pool.has_space
    waiter = asyncio.create_task(pool.wait_for_space())
    await asyncio.sleep(0)
    assert not waiter.done()
    pool.read_nowait(32)
    async with asyncio.timeout(1):
        await waiter


async def test_level_waiter_wakes_when_the_level_falls_below_its_mark() -> None:
    """
    A source allowed to fill only part of the pool sleeps until withdrawals
    take the level below its mark, and not at the first withdrawal.
    """
    pool = EntropyPool(4096)
    pool.add(os.urandom(40 * 64), 8)
    assert 2048 == pool.level
    waiter = asyncio.create_task(pool.wait_for_level_below(1024))
    await asyncio.sleep(0)
    pool.read_nowait(512)
    await asyncio.sleep(0)
    assert not waiter.done()
    pool.read_nowait(1024)
    async with asyncio.timeout(DEADLINE):
        await waiter
    assert pool.level < 1024


async def test_close_releases_level_waiters() -> None:
    """
    Closing the pool lets a source parked on a level mark go on to stop.
    """
    pool = EntropyPool(4096)
    pool.add(os.urandom(40 * 64), 8)
    waiter = asyncio.create_task(pool.wait_for_level_below(32))
    await asyncio.sleep(0)
    pool.close()
    async with asyncio.timeout(DEADLINE):
        await waiter


async def test_close_fails_waiters() -> None:
    """
    Closing the pool wakes every waiter with PoolClosedError.
    """
    pool = EntropyPool(4096)
    reader = asyncio.create_task(pool.read(10))
    await asyncio.sleep(0)
    pool.close()
    with pytest.raises(PoolClosedError):
        await reader
    with pytest.raises(PoolClosedError):
        pool.read_nowait(1)


def test_credit_must_be_in_range() -> None:
    """
    A credit outside 0..8 bits per byte is a programming error.
    """
    with pytest.raises(ValueError, match="credit"):
        EntropyPool(4096).add(b"x", 9)


async def test_waiter_draining_a_full_pool_wakes_sources() -> None:
    """
    A large blocked read that empties a full buffer lets paused sources resume.
    """
    pool = EntropyPool(64)
    pool.add(os.urandom(80), 8)
    assert not pool.has_space
    paused = asyncio.create_task(pool.wait_for_space())
    reader = asyncio.create_task(pool.read(4096))
    async with asyncio.timeout(1):
        await paused
    assert 0 == pool.level
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


# ---- keyed conditioning -------------------------------------------------------------

RECORDING = [
    (os.urandom(size), credit) for size, credit in [(1024, 0.0)] + [(512, 8.0)] * 40
]
"""A raw recording as `record_raw` writes it: a start-up test's worth mixed, then
credited reads."""


def replay(pool: EntropyPool) -> bytes:
    """
    Feed ``RECORDING`` through ``pool`` as the supervisor would and drain it.
    """
    for data, credit in RECORDING:
        pool.add(data, credit)
    return pool.read_nowait(pool.level)


def test_raw_recording_does_not_reproduce_output() -> None:
    """
    The same raw input through two pools gives unrelated output: knowing every
    source byte does not tell what a client received.
    """
    first = replay(EntropyPool(1 << 20))
    second = replay(EntropyPool(1 << 20))
    assert len(first) == len(second) > 0
    blocks = {first[i : i + BLOCK_BYTES] for i in range(0, len(first), BLOCK_BYTES)}
    assert not any(
        second[i : i + BLOCK_BYTES] in blocks
        for i in range(0, len(second), BLOCK_BYTES)
    )


def test_same_secret_reproduces_output() -> None:
    """
    With the secret stream fixed, the same recording gives the same output:
    the key is what the output depends on beyond the input.
    """
    first = replay(EntropyPool(1 << 20, secret=fixed_secret(b"k")))
    second = replay(EntropyPool(1 << 20, secret=fixed_secret(b"k")))
    assert first == second


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(1, 20_000),
    cuts=st.lists(st.integers(0, 20_000), max_size=20),
    credit=st.sampled_from([0.5, 3.5, 7.9, 8.0]),
    capacity=st.sampled_from([64, 1000, 1 << 20]),
)
def test_output_does_not_depend_on_how_input_is_split(
    size: int, cuts: list[int], credit: float, capacity: int
) -> None:
    """
    One large add and the same bytes in many small adds give the same blocks
    with the same secret: blocks end where credit says, not where calls do.
    """
    data = os.urandom(size)
    whole = EntropyPool(capacity, secret=fixed_secret(b"k"))
    whole.add(data, credit)
    pieces = EntropyPool(capacity, secret=fixed_secret(b"k"))
    bounds = [0, *sorted({cut for cut in cuts if cut < size}), size]
    for start, end in itertools.pairwise(bounds):
        pieces.add(data[start:end], credit)
    assert whole.stats() == pieces.stats()
    assert whole.read_nowait(capacity) == pieces.read_nowait(capacity)


def test_key_adds_no_credit() -> None:
    """
    However much secret material there is, output needs the same credited
    input as before: one block per 320 credited bits.
    """
    pool = EntropyPool(1 << 20)
    pool.mix(os.urandom(4096))
    pool.add(os.urandom(39), 8)
    assert 0 == pool.level
    pool.add(os.urandom(1), 8)
    assert BLOCK_BYTES == pool.level


@pytest.mark.parametrize(
    "blocks", [RESEED_BLOCKS - 1, RESEED_BLOCKS, 2 * RESEED_BLOCKS]
)
def test_pool_reseeds_every_1024_blocks(blocks: int) -> None:
    """
    The pool draws its key once and fresh secret material after every 1,024
    output blocks (32 KiB), however the input was split.
    """
    secret = CountingSecret()
    pool = EntropyPool(1 << 20, secret=secret)
    data = os.urandom(blocks * 40)
    for start in range(0, len(data), 1000):
        pool.add(data[start : start + 1000], 8)
        pool.read_nowait(pool.level)
    assert blocks == pool.stats().blocks_out
    assert 1 + blocks // RESEED_BLOCKS == secret.calls


def test_secret_is_asked_for_64_bytes() -> None:
    """
    Key and reseeds are 64 bytes of kernel material each.
    """
    sizes: list[int] = []

    def secret(size: int) -> bytes:
        sizes.append(size)
        return os.urandom(size)

    EntropyPool(4096, secret=secret)
    assert [SECRET_BYTES] == sizes == [64]


# ---- capacity ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(BLOCK_BYTES, 2000),
    steps=st.lists(
        st.tuples(st.integers(0, 5000), st.sampled_from([0.5, 4.0, 8.0])),
        min_size=1,
        max_size=30,
    ),
    reads=st.lists(st.integers(0, 700), max_size=30),
)
def test_level_never_exceeds_capacity(
    capacity: int, steps: list[tuple[int, float]], reads: list[int]
) -> None:
    """
    However large the adds, the level and the stats stay at or below capacity,
    and the per-tier level adds up to the level.
    """
    pool = EntropyPool(capacity)
    reads_iter = iter(reads)
    for size, credit in steps:
        pool.add(os.urandom(size), credit, tier=size % 3)
        stats = pool.stats()
        assert pool.level == stats.level <= capacity
        assert stats.level == sum(stats.level_by_tier.values())
        pool.read_nowait(next(reads_iter, 0))
        assert pool.level <= capacity


def test_block_waits_in_the_conditioner_until_room_frees() -> None:
    """
    A full pool keeps one complete block inside the conditioner and emits it as
    soon as a withdrawal makes room; credit beyond that block is dropped.
    """
    pool = EntropyPool(64)
    pool.add(os.urandom(40 * 5), 8)
    assert 64 == pool.level
    assert 2 == pool.stats().blocks_out
    assert not pool.has_space
    first = pool.read_nowait(32)
    assert 64 == pool.level
    assert 3 == pool.stats().blocks_out
    rest = pool.read_nowait(64)
    assert 0 == pool.level
    assert 3 == pool.stats().blocks_out
    assert 3 == len({first, rest[:32], rest[32:]})


async def test_one_large_add_serves_a_reader_beyond_capacity() -> None:
    """
    A single read from a source larger than the pool still serves a blocked
    reader all the output it backs, not just what the buffer could hold.
    """
    pool = EntropyPool(64, chunk=32)
    reader = asyncio.create_task(pool.read(1000))
    await asyncio.sleep(0)
    pool.add(os.urandom(40 * 40), 8)
    await asyncio.sleep(0)
    assert reader.done()
    assert 1000 == len(await reader)
    stats = pool.stats()
    assert stats.level <= 64
    assert stats.blocks_out * BLOCK_BYTES == 1000 + stats.level
    assert stats.level + BLOCK_BYTES > 64


def test_capacity_not_a_multiple_of_a_block_pauses_sources() -> None:
    """
    With room for less than a whole block, sources are paused rather than
    spinning on a pool that can take nothing.
    """
    pool = EntropyPool(100)
    pool.add(os.urandom(40 * 4), 8)
    assert 96 == pool.level
    assert not pool.has_space


async def test_given_back_bytes_past_capacity_drop_the_newest() -> None:
    """
    Bytes a reader never received go back to the front even when new blocks
    filled the buffer meanwhile; the newest bytes beyond capacity are
    discarded, never served, so the level stays within capacity.
    """
    pool = EntropyPool(64)
    reader = asyncio.create_task(pool.read(64))
    await asyncio.sleep(0)
    pool.add(os.urandom(80), 8, tier=1)
    pool.add(os.urandom(80), 8, tier=2)
    assert 64 == pool.level
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    stats = pool.stats()
    assert 64 == stats.level
    assert {1: 64} == stats.level_by_tier
    assert 0 == stats.bytes_out
    assert {1: 0} == stats.bytes_out_by_tier
    assert 64 == pool.bytes_discarded


# ---- provenance ----------------------------------------------------------------------


def test_block_goes_to_the_tier_with_most_credit() -> None:
    """
    A block is attributed to the tier that contributed most of its credited
    bits, whatever order the input came in.
    """
    pool = EntropyPool(4096)
    pool.add(os.urandom(10), 8, tier=0)
    pool.add(os.urandom(30), 8, tier=3)
    pool.add(os.urandom(25), 8, tier=2)
    pool.add(os.urandom(15), 8, tier=0)
    assert {3: 32, 2: 32} == pool.stats().level_by_tier


@pytest.mark.parametrize(
    ("tiers", "expected"),
    [((2, 1), 1), ((1, 2), 1), ((None, 4), 4), ((4, None), 4), ((None, None), -1)],
)
def test_ties_go_to_the_lower_tier(tiers: tuple[Tier, Tier], expected: int) -> None:
    """
    Equal credit goes to the lower tier number; input without a tier loses
    every tie, and a block with no tier at all counts as -1.
    """
    pool = EntropyPool(4096)
    for tier in tiers:
        pool.add(os.urandom(20), 8, tier=tier)
    assert {expected: BLOCK_BYTES} == pool.stats().level_by_tier


def test_uncredited_input_has_no_say_in_attribution() -> None:
    """
    Only credited bits count: bytes mixed in uncredited do not win a block.
    """
    pool = EntropyPool(4096)
    pool.add(os.urandom(4000), 0, tier=0)
    pool.add(os.urandom(40), 8, tier=5)
    assert {5: BLOCK_BYTES} == pool.stats().level_by_tier


async def test_bytes_out_by_tier_adds_up_to_bytes_out() -> None:
    """
    Whatever mix of non-blocking reads, streaming and whole waiters, timeouts
    and give-backs, bytes handed out per tier sum to bytes_out and buffered
    bytes per tier sum to the level.
    """
    pool = EntropyPool(1024, chunk=48)
    tiers = [0, 1, 1, None, 2]
    readers = [
        asyncio.create_task(pool.read(size, partial=size % 2 == 1))
        for size in (100, 33, 250, 65)
    ]
    doomed = asyncio.create_task(pool.read(5000))
    await asyncio.sleep(0)
    for step in range(60):
        pool.add(os.urandom(37), 8, tier=tiers[step % len(tiers)])
        pool.read_nowait(step % 20)
        await asyncio.sleep(0)
        stats = pool.stats()
        assert stats.bytes_out == sum(stats.bytes_out_by_tier.values())
        assert stats.level == sum(stats.level_by_tier.values())
    await asyncio.gather(*readers)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    pool.read_nowait(17)
    stats = pool.stats()
    assert stats.bytes_out == sum(stats.bytes_out_by_tier.values()) > 0
    assert stats.level == sum(stats.level_by_tier.values()) > 0
    assert {-1, 0, 1, 2} >= set(stats.bytes_out_by_tier)


def test_bytes_out_by_tier_follows_the_blocks_read() -> None:
    """
    Reading across a tier boundary charges each tier for its own bytes.
    """
    pool = EntropyPool(4096)
    pool.add(os.urandom(40), 8, tier=0)
    pool.add(os.urandom(40), 8, tier=1)
    pool.read_nowait(40)
    stats = pool.stats()
    assert {0: 32, 1: 8} == stats.bytes_out_by_tier
    assert {1: 24} == stats.level_by_tier


def test_tiny_credits_are_rounded_down_never_up() -> None:
    """
    Credit claimed per byte is rounded down to the thousandth of a bit: 500,000
    bytes claiming 319 bits in all never release a block, which needs 320.
    """
    pool = EntropyPool(4096)
    pool.add(bytes(500_000), 319 / 500_000)
    assert 0 == pool.level


class RecordingQueue(WaitQueue):
    """
    Plain turns that record charges, and keep ``reserve`` bytes back until
    released (``release_in`` 0: at once, on the next loop turn).
    """

    def __init__(self, reserve: int = 0) -> None:
        super().__init__()
        self.charges: list[tuple[object, int]] = []
        self.reserve = reserve

    def charge(self, waiter: Waiter, nbytes: int) -> None:
        self.charges.append((waiter.key, nbytes))

    def charge_key(self, key: object, nbytes: int) -> None:
        self.charges.append((key, nbytes))

    def reserved(self, key: object) -> int:
        return self.reserve

    def release_in(self) -> float | None:
        if not self.reserve:
            return None
        self.reserve = 0
        return 0.0


async def test_nonblocking_read_is_charged_to_its_key() -> None:
    """
    What a non-blocking reader takes is charged to its key, as a turn would
    be; an empty read is reported too (the reader asked).
    """
    policy = RecordingQueue()
    pool = EntropyPool(4096, waiters=policy)
    pool.add(os.urandom(40), 8)
    assert 20 == len(pool.read_nowait(20, key="client"))
    assert 12 == len(pool.read_nowait(20))
    assert b"" == pool.read_nowait(20, key="client")
    assert [("client", 20), (None, 12), ("client", 0)] == policy.charges


async def test_given_back_bytes_are_charged_back() -> None:
    """
    Bytes a reader collected but never received go back to the pool and are
    charged back to its key, so its customer pays only for what it got.
    """
    policy = RecordingQueue()
    pool = EntropyPool(4096, chunk=16, waiters=policy)
    reader = asyncio.create_task(pool.read(64, key="client"))
    await asyncio.sleep(0)
    pool.add(os.urandom(40), 8)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert 32 == pool.level
    assert 0 == sum(n for key, n in policy.charges if key == "client")


async def test_reserve_stays_in_the_buffer_until_it_lapses() -> None:
    """
    Bytes the policy reserves are neither served to a blocked reader nor
    read without blocking; when the reserve lapses the reader is served.
    """
    policy = RecordingQueue(reserve=32)
    pool = EntropyPool(4096, waiters=policy)
    pool.add(os.urandom(40), 8)
    assert 0 == pool.available("other")
    reader = asyncio.create_task(pool.read(32, key="other"))
    await asyncio.sleep(0)
    assert 32 == pool.level
    assert 32 == len(await reader)
    assert 0 == pool.level


async def test_reserve_never_passes_half_the_capacity() -> None:
    """
    However much a policy asks to keep, half the buffer stays servable, so
    sources keep room to add output.
    """
    policy = RecordingQueue(reserve=1 << 20)
    pool = EntropyPool(64, waiters=policy)
    pool.add(os.urandom(80), 8)
    assert 64 == pool.level
    assert 32 == pool.available()
    assert 32 == len(pool.read_nowait(64))


class CountingQueue(RecordingQueue):
    """
    Recording turns that also count the waiters queued.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pushed = 0

    def push(self, waiter: Waiter) -> None:
        self.pushed += 1
        super().push(waiter)


async def test_read_the_buffer_can_answer_is_served_on_the_spot() -> None:
    """
    With nobody queued, a blocked read that the buffer can answer returns at
    once without becoming a waiter, and is charged like the turn it would
    have had; one that cannot be answered still queues.
    """
    policy = CountingQueue()
    pool = EntropyPool(4096, chunk=64, waiters=policy)
    pool.add(os.urandom(40 * 4), 8)
    assert 32 == len(await pool.read(32, key="a"))
    assert 64 == len(await pool.read(500, partial=True, key="b"))
    assert 0 == policy.pushed
    assert [("a", 32), ("b", 64)] == policy.charges
    reader = asyncio.create_task(pool.read(64, key="c"))
    await asyncio.sleep(0)
    assert 1 == policy.pushed
    pool.add(os.urandom(40 * 2), 8)
    assert 64 == len(await reader)


async def test_large_read_on_the_spot_is_charged_turn_by_turn() -> None:
    """
    A whole read larger than a turn, answered at once from a well-stocked
    buffer, is charged in turn-sized pieces, as queued turns would be.
    """
    policy = CountingQueue()
    pool = EntropyPool(4096, chunk=16, waiters=policy)
    pool.add(os.urandom(40 * 100), 8)
    assert 40 == len(await pool.read(40, key="a"))
    assert 0 == policy.pushed
    assert [("a", 16), ("a", 16), ("a", 8)] == policy.charges
    assert 40 == pool.stats().bytes_out
