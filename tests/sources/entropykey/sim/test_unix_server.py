"""
The ekey-ulusbd-style Unix socket in front of a simulated key.
"""

import asyncio
import os
import stat
from pathlib import Path

import pytest

from sources.entropykey.sim.unix_server import UnixKeyServer, serve_unix
from sources.entropykey.wire import (
    FrameType,
    parse_packet,
)
from tests.helpers import eventually
from tests.sources.entropykey.sim.support import slow_key


async def read_frame(reader: asyncio.StreamReader) -> FrameType:
    """
    Read one 64-byte frame and return its type.
    """
    async with asyncio.timeout(10):
        return parse_packet(await reader.readexactly(64)).type


async def test_unix_server_relays_one_client_at_a_time(tmp_path: Path) -> None:
    """
    The socket is private; a client's ^C gets an S! frame; a second client is
    closed at once while the first is connected; the slot frees on hang-up and
    the socket file is removed on close.
    """
    key = slow_key()
    path = tmp_path / "key.sock"
    server = UnixKeyServer(key, path)
    await server.start()
    try:
        assert 0o600 == stat.S_IMODE(os.lstat(path).st_mode)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"\x03")
        assert FrameType.SERIAL == await read_frame(reader)
        reader2, writer2 = await asyncio.open_unix_connection(path)
        async with asyncio.timeout(10):
            assert b"" == await reader2.read()
        writer2.close()
        writer.close()
        await eventually(lambda: not server.busy)
        reader3, writer3 = await asyncio.open_unix_connection(path)
        writer3.write(b"\x03")
        assert FrameType.SERIAL == await read_frame(reader3)
        writer3.close()
    finally:
        await server.close()
    assert not path.exists()


async def test_unix_client_is_closed_when_key_is_unplugged(tmp_path: Path) -> None:
    """
    Unplugging the key ends the client's connection (EOF), as ekey-ulusbd's
    exit would.
    """
    key = slow_key()
    path = tmp_path / "key.sock"
    async with UnixKeyServer(key, path):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"\x03")
        assert FrameType.SERIAL == await read_frame(reader)
        key.unplug()
        async with asyncio.timeout(10):
            assert b"" == await reader.read()
        writer.close()
    assert not path.exists()


async def test_serve_unix_runs_until_stopped(tmp_path: Path) -> None:
    """
    ``serve_unix`` replaces a stale socket file, serves until ``stop`` is set
    and removes its socket; a non-socket at the path is refused.
    """
    path = tmp_path / "key.sock"
    stale = UnixKeyServer(slow_key(), path)
    await stale.start()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_unix(slow_key(), path, stop=stop))

    def replaced() -> bool:
        try:
            return os.lstat(path).st_ino != stale.inode
        except FileNotFoundError:
            return False

    await eventually(replaced)
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"\x03")
    assert FrameType.SERIAL == await read_frame(reader)
    stop.set()
    async with asyncio.timeout(10):
        await task
    writer.close()
    assert not path.exists()
    await stale.close()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await serve_unix(slow_key(), path, stop=stop)
