"""
Pool accounting: output never exceeds what credited input supports, no byte is
handed out twice, and no waiter is skipped.
"""

import asyncio
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import PoolClosedError
from broker.pool import BLOCK_BITS, BLOCK_BYTES, RESERVE_BITS, EntropyPool


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
    Output is a hash of the input, never the raw input itself.
    """
    pool = EntropyPool(4096)
    raw = bytes(range(40))
    pool.add(raw, 8)
    out = pool.read_nowait(32)
    assert raw[:32] != out
    assert hashlib.sha512(b"ebroker pool v1" + raw).digest()[:32] == out


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
