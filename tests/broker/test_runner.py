"""
The runner reads a fast source in pieces the pool has room for, parks it while
the pool is full, and lets the event loop run between reads.

Time is a `FakeClock`; the source is the real kernel generator, wrapped to
record what it was asked for.
"""

import asyncio
from typing import Any, Self

import pytest

from broker.pool import BLOCK_BYTES, EntropyPool
from broker.supervisor import Supervisor
from sources.getrandom import GetrandomSource, GetrandomSourceConfig
from tests.fakeclock import FakeClock, settle

READ = 64 * 1024


class RecordingGetrandom(GetrandomSource):
    """
    The getrandom source, recording each read's limit (None: a plain read).
    """

    def __init__(self) -> None:
        super().__init__(
            GetrandomSourceConfig.model_validate(
                {"name": "g", "kind": "getrandom", "read_size": READ}
            )
        )
        self.limits: list[int | None] = []

    async def __aenter__(self) -> Self:
        return self

    async def read(self) -> bytes:
        self.limits.append(None)
        return await super().read_up_to(READ)

    async def read_up_to(self, limit: int) -> bytes:
        self.limits.append(limit)
        return await super().read_up_to(limit)


async def start(pool: EntropyPool, clock: FakeClock) -> tuple[Supervisor, Any]:
    supervisor = Supervisor(pool, clock=clock, standby_probe=10.0, low_watermark=4096)
    source = RecordingGetrandom()
    supervisor.add(source)
    supervisor.start()
    return supervisor, source


async def until_full(pool: EntropyPool) -> None:
    for _ in range(100):
        if not pool.has_space:
            return
        await settle()
    raise AssertionError("the pool never filled")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_full_pool_parks_a_fast_source(clock: FakeClock) -> None:
    """
    A source that never has to wait fills the pool and is then parked: it is
    not read again, however many loop turns pass, until a sixteenth of the
    pool has been drawn; then it reads just what that room backs (40 input
    bytes a block at 8 bits per byte) and is parked again.
    """
    pool = EntropyPool(256 * 1024)
    supervisor, source = await start(pool, clock)
    try:
        await until_full(pool)
        reads = len(source.limits)
        await settle(500)
        assert reads == len(source.limits)
        resume = pool.capacity // 16
        pool.read_nowait(resume - BLOCK_BYTES)
        await settle()
        assert reads == len(source.limits)
        pool.read_nowait(BLOCK_BYTES)
        await settle()
        assert len(source.limits) > reads
        assert not pool.has_space
        assert all(
            limit == resume // BLOCK_BYTES * 40 for limit in source.limits[reads:]
        )
    finally:
        await supervisor.stop()


async def test_reads_are_bounded_by_the_room(clock: FakeClock) -> None:
    """
    Healthy reads ask for no more than the pool has room to credit, so the
    read that fills the pool is not mostly dropped: credit offered beyond
    what the blocks used is under a block per read.
    """
    pool = EntropyPool(256 * 1024)
    supervisor, source = await start(pool, clock)
    try:
        await until_full(pool)
        assert any(limit is not None for limit in source.limits)
        stats = pool.stats()
        wasted = stats.credited_bits_in - stats.blocks_out * 320
        assert 0 <= wasted < 320 * len(source.limits)
    finally:
        await supervisor.stop()


async def test_loop_runs_between_reads(clock: FakeClock) -> None:
    """
    Between two reads of a source that never waits, other tasks get a turn.
    """
    pool = EntropyPool(1 << 20)
    supervisor, source = await start(pool, clock)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        await until_full(pool)
        assert ticks >= len(source.limits) - 1
    finally:
        task.cancel()
        await supervisor.stop()


async def test_first_read_asks_for_a_startup_test_and_the_room(
    clock: FakeClock,
) -> None:
    """
    A source yet to pass its start-up test asks for that test's 1,024 bytes
    plus the input the room backs, so the bytes credited once it passes
    within the read never overshoot the room.
    """
    pool = EntropyPool(64 * 1024)
    supervisor, source = await start(pool, clock)
    try:
        await until_full(pool)
        assert 1024 + pool.capacity // BLOCK_BYTES * 40 == source.limits[0]
        stats = pool.stats()
        assert stats.credited_bits_in - stats.blocks_out * 320 < 320 * len(
            source.limits
        )
    finally:
        await supervisor.stop()
