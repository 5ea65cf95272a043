"""
The getrandom source: read on the event loop once the kernel is seeded, in a
thread before, never more than asked for, and no faster than its rate.
"""

import asyncio
import os
from typing import Any

import pytest

from sources.getrandom import GetrandomSource, GetrandomSourceConfig


def make(**settings: Any) -> GetrandomSource:
    return GetrandomSource(
        GetrandomSourceConfig.model_validate(
            {"name": "g", "kind": "getrandom", **settings}
        )
    )


async def test_reads_64_kib_without_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A seeded kernel is read on the loop: 64 KiB per read by default, and no
    worker thread is involved.
    """

    async def no_thread(*args: Any) -> bytes:
        raise AssertionError("read in a thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    async with make() as source:
        first, second = await source.read(), await source.read()
    assert 64 * 1024 == len(first) == len(second)
    assert first != second


async def test_waits_in_a_thread_while_the_kernel_is_not_seeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    At early boot the non-blocking read fails; the read then waits for the
    kernel in a worker thread instead of failing the source.
    """
    real = os.getrandom
    blocking_reads: list[int] = []

    def unseeded(size: int, flags: int = 0) -> bytes:
        if flags & os.GRND_NONBLOCK:
            raise BlockingIOError("not seeded yet")
        blocking_reads.append(size)
        return real(size)

    monkeypatch.setattr(os, "getrandom", unseeded)
    async with make(read_size=1000) as source:
        assert 1000 == len(await source.read())
    assert [1000] == blocking_reads


async def test_reads_no_more_than_asked() -> None:
    """
    `read_up_to` returns at most the limit, and never more than read_size.
    """
    async with make(read_size=1000) as source:
        assert 100 == len(await source.read_up_to(100))
        assert 1000 == len(await source.read_up_to(5000))
        assert 1 == len(await source.read_up_to(0))


async def test_rate_caps_what_is_drawn() -> None:
    """
    With a rate, each read is at most a quarter second's worth and reads are
    paced: drawing N bytes takes at least (N - first read) / rate seconds.
    """
    rate = 256 * 1024
    async with make(rate=rate) as source:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sizes = [len(await source.read()) for _ in range(3)]
        elapsed = loop.time() - start
    assert [rate // 4] * 3 == sizes
    # Timers may fire a clock tick early.
    assert elapsed >= 2 * (rate // 4) / rate - 0.01
