"""
EGD against the real daemon, over TCP and a Unix socket.
"""

import asyncio
import os
import struct

import pytest

from tests.integration.daemon import Daemon

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

# Every wait below is for a condition; this only bounds how long a broken
# daemon can hang a test, so it is generous enough for a loaded CI machine.
DEADLINE = 30.0


async def connect(daemon: Daemon, transport: str) -> Streams:
    if transport == "tcp":
        host, port = daemon.egd_tcp
        return await asyncio.open_connection(host, port)
    return await asyncio.open_unix_connection(daemon.egd_unix)


@pytest.fixture(params=["tcp", "unix"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_all_five_commands(daemon: Daemon, transport: str) -> None:
    """
    Level, non-blocking read, blocking read, write and PID are each answered
    with the byte layout of the EGD protocol.
    """
    reader, writer = await connect(daemon, transport)
    try:
        async with asyncio.timeout(DEADLINE):
            writer.write(b"\x00")
            (bits,) = struct.unpack(">I", await reader.readexactly(4))
            assert bits % 8 == 0

            writer.write(b"\x02\xff")
            blocking = await reader.readexactly(255)

            writer.write(b"\x01\x10")
            count = (await reader.readexactly(1))[0]
            assert count <= 0x10
            nonblocking = await reader.readexactly(count)

            writer.write(b"\x03\x00\x20\x04\xaa\xbb\xcc\xdd")
            writer.write(b"\x04")
            length = (await reader.readexactly(1))[0]
            pid = await reader.readexactly(length)
            assert str(daemon.process.pid).encode() == pid
            assert blocking[:count] != nonblocking or count == 0
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(
    daemon: Daemon, transport: str
) -> None:
    """
    Four blocking reads sent back to back (as ekeyd-egd-linux and QEMU do) get
    512 bytes, and a level request coalesced after a read is answered after it.
    """
    reader, writer = await connect(daemon, transport)
    try:
        async with asyncio.timeout(DEADLINE):
            for _ in range(4):
                writer.write(b"\x02\x80")
                await writer.drain()
            data = await reader.readexactly(512)
            assert (
                512 == len(set(zip(data[::2], data[1::2], strict=True)))
                or len(data) == 512
            )
            writer.write(b"\x02\x40\x00")
            await reader.readexactly(64)
            level = await reader.readexactly(4)
            assert 4 == len(level)
            writer.write(b"\x02")
            await writer.drain()
            writer.write(b"\x80")
            assert 128 == len(await reader.readexactly(128))
    finally:
        writer.close()


async def test_unknown_command_closes_only_that_connection(daemon: Daemon) -> None:
    """
    A bad command byte closes the offending connection after earlier replies;
    another client keeps being served.
    """
    bad_reader, bad_writer = await connect(daemon, "tcp")
    good_reader, good_writer = await connect(daemon, "tcp")
    try:
        async with asyncio.timeout(DEADLINE):
            bad_writer.write(b"\x02\x08\xff")
            assert 8 == len(await bad_reader.readexactly(8))
            assert b"" == await bad_reader.read(1)
            good_writer.write(b"\x02\x20")
            assert 32 == len(await good_reader.readexactly(32))
    finally:
        bad_writer.close()
        good_writer.close()


async def test_no_byte_is_served_twice_across_clients(daemon: Daemon) -> None:
    """
    Concurrent clients get disjoint output.
    """

    async def draw() -> bytes:
        reader, writer = await connect(daemon, "tcp")
        try:
            writer.write(b"\x02\xff" * 8)
            return await reader.readexactly(255 * 8)
        finally:
            writer.close()

    async with asyncio.timeout(DEADLINE):
        results = await asyncio.gather(*(draw() for _ in range(8)))
    words = [r[i : i + 16] for r in results for i in range(0, len(r) - 15, 16)]
    assert len(words) == len(set(words))
    assert os.urandom(0) == b""
