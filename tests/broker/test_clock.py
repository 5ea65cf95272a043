"""
The injected clock: the real one waits in real time, the fake one on command.
"""

import asyncio

import pytest

from broker.clock import SYSTEM_CLOCK
from tests.fakeclock import START_WALL, FakeClock


async def test_system_clock_reads_the_system_time() -> None:
    """
    The real clock's readings move forward and its zero sleep returns at once.
    """
    first = SYSTEM_CLOCK.monotonic()
    await SYSTEM_CLOCK.sleep(0)
    assert SYSTEM_CLOCK.monotonic() >= first
    assert SYSTEM_CLOCK.time() > START_WALL - 365 * 86400


async def test_system_clock_timeout_raises_timeout_error() -> None:
    """
    A wait longer than its timeout ends in TimeoutError, as asyncio.timeout does.
    """
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        async with SYSTEM_CLOCK.timeout(0):
            await never


async def test_fake_sleep_ends_only_when_time_is_advanced() -> None:
    """
    A sleep on the fake clock ends when, and only when, its time has come.
    """
    clock = FakeClock()
    task = asyncio.create_task(clock.sleep(10))
    await clock.advance(9.999)
    assert not task.done()
    await clock.advance(0.001)
    assert task.done()
    assert 10.0 == clock.monotonic()
    assert START_WALL + 10.0 == clock.time()


async def test_fake_timeout_expires_at_its_deadline() -> None:
    """
    A fake timeout cancels the wait inside it with TimeoutError at its deadline,
    and a wait that finishes first leaves nothing pending.
    """
    clock = FakeClock()
    event = asyncio.Event()

    async def wait(seconds: float) -> bool:
        try:
            async with clock.timeout(seconds):
                await event.wait()
        except TimeoutError:
            return False
        return True

    late = asyncio.create_task(wait(5))
    await clock.advance(4.9)
    assert not late.done()
    await clock.advance(0.1)
    assert late.done()
    assert late.result() is False

    early = asyncio.create_task(wait(5))
    await clock.advance(1)
    event.set()
    await clock.advance(0)
    assert early.result() is True
    assert 0 == clock.pending


async def test_timers_fire_in_deadline_order() -> None:
    """
    Advancing over several timers fires them in order, each at its own time.
    """
    clock = FakeClock()
    seen: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        seen.append((name, clock.monotonic()))

    tasks = [
        asyncio.create_task(sleeper("b", 2)),
        asyncio.create_task(sleeper("a", 1)),
    ]
    await clock.advance(3)
    await asyncio.gather(*tasks)
    assert [("a", 1.0), ("b", 2.0)] == seen


async def test_set_wall_moves_wall_time_only() -> None:
    """
    Setting the wall clock (an operator fixing the system time) leaves
    monotonic durations alone.
    """
    clock = FakeClock()
    await clock.advance(5)
    clock.set_wall(START_WALL + 86400)
    assert START_WALL + 86400 == clock.time()
    assert 5.0 == clock.monotonic()
