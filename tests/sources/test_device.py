"""
The device source reads FIFOs, files and character devices without blocking the
event loop, and reports EOF, errors and stalls as SourceError.
"""

import asyncio
import os
from pathlib import Path

import pytest

from broker.errors import SourceError
from sources.device import DeviceSource, DeviceSourceConfig
from sources.getrandom import GetrandomSource, GetrandomSourceConfig


def device(path: Path, **extra: object) -> DeviceSource:
    config = DeviceSourceConfig.model_validate(
        {"name": "dev", "kind": "device", "path": str(path), **extra}
    )
    return DeviceSource(config)


async def test_fifo_bytes_arrive_as_written(tmp_path: Path) -> None:
    """
    A program writing into a named pipe feeds the source byte for byte.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    async with device(fifo) as source:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"\x01\x02\x03")
            async with asyncio.timeout(5):
                assert b"\x01\x02\x03" == await source.read()
        finally:
            os.close(writer)


async def test_fifo_waits_for_a_writer_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    """
    With no writer yet, a read waits while the event loop keeps running.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    async with device(fifo) as source:
        reader = asyncio.create_task(source.read())
        await asyncio.sleep(0)
        assert not reader.done()
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"late")
            async with asyncio.timeout(5):
                assert b"late" == await reader
        finally:
            os.close(writer)


async def test_fifo_feeder_restart_is_a_stall_not_eof(tmp_path: Path) -> None:
    """
    When the feeding program exits the source neither spins on EOF nor fails at
    once: it reports a stall after stall_timeout, and a new feeder resumes it.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    async with device(fifo, stall_timeout=0.05) as source:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"x")
        os.close(writer)
        assert b"x" == await source.read()
        with pytest.raises(SourceError, match="delivered nothing"):
            await source.read()
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"y")
            async with asyncio.timeout(5):
                assert b"y" == await source.read()
        finally:
            os.close(writer)


async def test_regular_file_is_read_then_eof(tmp_path: Path) -> None:
    """
    A regular file (not pollable) is read in a thread, then reports EOF.
    """
    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * 10_000)
    async with device(path, read_size=4096) as source:
        sizes = [len(await source.read()) for _ in range(3)]
        with pytest.raises(SourceError, match="end of file"):
            await source.read()
    assert [4096, 4096, 1808] == sizes


async def test_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    """
    An absent path fails at open with the path and the reason.
    """
    with pytest.raises(SourceError, match=r"cannot open .*absent.*No such file"):
        async with device(tmp_path / "absent"):
            pass


async def test_stall_is_reported(tmp_path: Path) -> None:
    """
    A device that delivers nothing within stall_timeout is reported as stalled.
    """
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    async with device(fifo, stall_timeout=0.05) as source:
        with pytest.raises(SourceError, match="delivered nothing"):
            await source.read()


async def test_char_device_reads(tmp_path: Path) -> None:
    """
    A real character device (/dev/urandom stands in for /dev/hwrng) is read.
    """
    async with device(Path("/dev/urandom"), read_size=512) as source:
        assert 512 == len(await source.read())


async def test_getrandom_delivers_requested_size() -> None:
    """
    The getrandom source returns read_size bytes per read.
    """
    config = GetrandomSourceConfig(name="g", kind="getrandom", read_size=1000)
    async with GetrandomSource(config) as source:
        first, second = await source.read(), await source.read()
    assert 1000 == len(first) == len(second)
    assert first != second
