"""
The EGD server on loopback with a real pool: ordering, empty pools, departed
clients, written entropy, back-pressure, connection limits, shutdown.
"""

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.errors import BrokerError
from broker.pool import EntropyPool
from sinks.egd.config import EgdSinkConfig
from sinks.egd.server import EgdSink
from tests.helpers import eventually
from tests.sinks.egd.doubles import View

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

# Every wait below is for a condition; this only bounds how long a broken
# server can hang a test, so it is generous enough for a loaded CI machine.
DEADLINE = 30.0


def fill(pool: EntropyPool, nbytes: int) -> None:
    """
    Release about ``nbytes`` of output (40 credited input bytes per 32 out).
    """
    pool.add(os.urandom(nbytes * 40 // 32 + 40), 8)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[EgdSink, EntropyPool]]:
    pool = EntropyPool(1 << 20)
    config = EgdSinkConfig(
        kind="egd", listen=["tcp://127.0.0.1:0", "unix:egd.sock"], max_connections=8
    )
    sink = EgdSink(config, View(tmp_path, pool))
    await sink.start()
    try:
        yield sink, pool
    finally:
        await sink.shutdown(0)


async def connect(sink: EgdSink, scheme: str = "tcp") -> Streams:
    for address in sink.bound_addresses():
        if address.startswith("tcp://") and scheme == "tcp":
            host, port = address.removeprefix("tcp://").rsplit(":", 1)
            return await asyncio.open_connection(host, int(port))
        if address.startswith("unix:") and scheme == "unix":
            return await asyncio.open_unix_connection(address.removeprefix("unix:"))
    raise AssertionError(f"no {scheme} listener")


async def test_blocking_read_waits_through_an_empty_pool(served: Any) -> None:
    """
    02 FF on an empty pool keeps the connection open and completes with exactly
    255 bytes once the pool refills.
    """
    sink, pool = served
    reader, writer = await connect(sink)
    writer.write(b"\x02\xff")
    await eventually(lambda: pool.waiters == 1, timeout=DEADLINE)
    fill(pool, 100)
    await eventually(lambda: pool.level == 0, timeout=DEADLINE)
    fill(pool, 300)
    async with asyncio.timeout(DEADLINE):
        assert 255 == len(await reader.readexactly(255))
    writer.write(b"\x01\x00")
    async with asyncio.timeout(DEADLINE):
        assert b"\x00" == await reader.readexactly(1)
    writer.close()


async def test_replies_follow_request_order(served: Any) -> None:
    """
    A non-blocking read behind a pending blocking read is answered after it.
    """
    sink, pool = served
    reader, writer = await connect(sink, "unix")
    writer.write(b"\x02\x40\x01\x10\x04")
    await eventually(lambda: pool.waiters == 1, timeout=DEADLINE)
    fill(pool, 200)
    async with asyncio.timeout(DEADLINE):
        assert 64 == len(await reader.readexactly(64))
        count = (await reader.readexactly(1))[0]
        assert 16 == count
        await reader.readexactly(count)
        length = (await reader.readexactly(1))[0]
        assert str(os.getpid()).encode() == await reader.readexactly(length)
    writer.close()


async def test_departed_client_costs_nobody_anything(served: Any) -> None:
    """
    A client that closes with a 0x02 pending is dropped; no byte is counted as
    served to it and the next reader gets the output.
    """
    sink, pool = served
    _reader, writer = await connect(sink)
    writer.write(b"\x02\xff")
    await eventually(lambda: pool.waiters == 1, timeout=DEADLINE)
    writer.close()
    await eventually(lambda: sink.status().connections == 0, timeout=DEADLINE)
    await eventually(lambda: pool.waiters == 0, timeout=DEADLINE)
    fill(pool, 64)
    assert 0 == pool.stats().bytes_out
    reader2, writer2 = await connect(sink)
    writer2.write(b"\x02\x20")
    async with asyncio.timeout(DEADLINE):
        assert 32 == len(await reader2.readexactly(32))
    writer2.close()


async def test_written_entropy_is_not_credited_by_default(served: Any) -> None:
    """
    0x03 data is mixed in but releases no output unless writes are trusted.
    """
    sink, pool = served
    reader, writer = await connect(sink)
    payload = os.urandom(255)
    writer.write(b"\x03\x07\xf8\xff" + payload + b"\x00")
    async with asyncio.timeout(DEADLINE):
        assert b"\x00\x00\x00\x00" == await reader.readexactly(4)
    assert 0 == pool.level
    assert 255 == pool.stats().uncredited_bytes_in
    writer.close()


async def test_trusted_writes_are_credited(tmp_path: Path) -> None:
    """
    With trust_writes, written bytes are credited up to what the client claims.
    """
    pool = EntropyPool(1 << 20)
    config = EgdSinkConfig(kind="egd", listen=["tcp://127.0.0.1:0"], trust_writes=True)
    sink = EgdSink(config, View(tmp_path, pool))
    await sink.start()
    try:
        reader, writer = await connect(sink)
        writer.write(b"\x03\x07\xf8\xff" + os.urandom(255) + b"\x00")
        async with asyncio.timeout(DEADLINE):
            bits = int.from_bytes(await reader.readexactly(4), "big")
        assert bits > 0
        writer.close()
    finally:
        await sink.shutdown(0)


async def test_client_that_stops_reading_is_not_buffered_without_bound(
    served: tuple[EgdSink, EntropyPool],
) -> None:
    """
    A client that asks for far more than it reads: the server stops withdrawing
    for it once it holds max_buffered_output unread, and stops reading its
    requests.
    """
    sink, pool = served
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = sink.bound_addresses()[0].removeprefix("tcp://").rsplit(":", 1)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    _reader, writer = await asyncio.open_connection(sock=sock)
    requested = 255 * 160_000  # about 40 MB, never read
    writer.write(b"\x02\xff" * 160_000)
    await eventually(lambda: len(sink.connections()) == 1, timeout=DEADLINE)
    [connection] = sink.connections()

    def stalled() -> bool:
        # The pool is kept topped up, so only the client's back-pressure can
        # stop the server: the output bound reached and no withdrawal waiting
        # in the pool for it.
        if pool.level < 1 << 19:
            fill(pool, 1 << 19)
        return (
            connection.writing_paused
            and connection.reading_paused
            and pool.waiters == 0
        )

    await eventually(stalled, timeout=DEADLINE)
    assert connection.write_buffer_size() <= sink.config.max_buffered_output + 255
    assert pool.stats().bytes_out < requested // 4
    writer.close()


async def test_max_connections_is_enforced(served: Any) -> None:
    """
    Connections beyond max_connections are closed at accept; others carry on.
    """
    sink, pool = served
    streams = [await connect(sink) for _ in range(8)]
    await eventually(lambda: sink.status().connections == 8, timeout=DEADLINE)
    extra_reader, extra_writer = await connect(sink)
    async with asyncio.timeout(DEADLINE):
        assert b"" == await extra_reader.read(1)
    fill(pool, 64)
    reader, writer = streams[0]
    writer.write(b"\x02\x10")
    async with asyncio.timeout(DEADLINE):
        assert 16 == len(await reader.readexactly(16))
    for _, w in [*streams, (extra_reader, extra_writer)]:
        w.close()


async def test_shutdown_finishes_replies_and_removes_socket(tmp_path: Path) -> None:
    """
    Shutdown lets a pending read finish within the grace period, then closes
    connections and removes the Unix socket file.
    """
    pool = EntropyPool(1 << 20)
    config = EgdSinkConfig(kind="egd", listen=["unix:egd.sock"])
    sink = EgdSink(config, View(tmp_path, pool))
    await sink.start()
    reader, writer = await connect(sink, "unix")
    writer.write(b"\x02\x40")
    await eventually(lambda: pool.waiters == 1, timeout=DEADLINE)
    stopping = asyncio.create_task(sink.shutdown(DEADLINE))
    await eventually(lambda: not sink.accepting, timeout=DEADLINE)
    fill(pool, 64)
    async with asyncio.timeout(DEADLINE):
        assert 64 == len(await reader.readexactly(64))
        await stopping
        assert b"" == await reader.read(1)
    assert not (tmp_path / "egd.sock").exists()
    writer.close()


async def test_stale_socket_file_is_replaced_but_other_files_are_not(
    tmp_path: Path,
) -> None:
    """
    A socket left by a crashed broker is replaced; a regular file is never deleted.
    """
    (tmp_path / "egd.sock").write_text("precious")
    sink = EgdSink(
        EgdSinkConfig(kind="egd", listen=["unix:egd.sock"]),
        View(tmp_path, EntropyPool()),
    )
    with pytest.raises(BrokerError, match="exists and is not a socket"):
        await sink.start()
    assert "precious" == (tmp_path / "egd.sock").read_text()


async def test_flood_of_small_commands_is_bounded(served: Any) -> None:
    """
    A client that sends endless level requests and never reads cannot make the
    server queue replies without bound: it stops reading from that client.
    """
    sink, _pool = served
    # Over a Unix socket: the server's kernel buffer takes a few hundred of its
    # 4-byte replies, where loopback TCP grows to megabytes and the server
    # would have to answer about a million requests before it stalls.
    _reader, writer = await connect(sink, "unix")
    await eventually(lambda: len(sink.connections()) == 1, timeout=DEADLINE)
    [connection] = sink.connections()
    flood = b"\x00" * 65536
    # Keep some flood queued on our side until the server stops reading because
    # we do not read (reading alone also pauses for a moment after each big
    # chunk while the worker catches up).
    async with asyncio.timeout(DEADLINE):
        while not (connection.reading_paused and connection.writing_paused):
            if writer.transport.get_write_buffer_size() < len(flood):
                writer.write(flood)
            await asyncio.sleep(0.001)
    assert connection.write_buffer_size() <= sink.config.max_buffered_output + 4
    writer.transport.abort()


async def test_one_client_cannot_take_every_slot(tmp_path: Path) -> None:
    """
    Connections from one client beyond max_connections_per_client are closed
    at accept; the client's first connections keep working.
    """
    pool = EntropyPool(1 << 20)
    config = EgdSinkConfig(
        kind="egd", listen=["tcp://127.0.0.1:0"], max_connections_per_client=2
    )
    sink = EgdSink(config, View(tmp_path, pool))
    await sink.start()
    try:
        own = [await connect(sink) for _ in range(2)]
        await eventually(lambda: sink.status().connections == 2, timeout=DEADLINE)
        reader, writer = await connect(sink)
        async with asyncio.timeout(DEADLINE):
            assert b"" == await reader.read(1)
        writer.close()
        fill(pool, 64)
        first_reader, first_writer = own[0]
        first_writer.write(b"\x02\x10")
        async with asyncio.timeout(DEADLINE):
            assert 16 == len(await first_reader.readexactly(16))
        for _, w in own:
            w.close()
    finally:
        await sink.shutdown(0)
