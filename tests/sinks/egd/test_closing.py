"""
A closed EGD connection is served no more: queued reads withdraw nothing
from the pool, and what a cut-short read was granted goes back to the
client's accounts.
"""

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.pool import EntropyPool
from sinks.egd.config import EgdSinkConfig
from sinks.egd.server import EgdSink
from tests.helpers import DEADLINE, eventually
from tests.sinks.egd.doubles import View


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[EgdSink]:
    config = EgdSinkConfig(kind="egd", listen=["tcp://127.0.0.1:0"])
    served = EgdSink(config, View(tmp_path, EntropyPool(1 << 20)))
    await served.start()
    try:
        yield served
    finally:
        await served.shutdown(0)


def bytes_served(sink: EgdSink) -> int:
    """
    Bytes the accounts charged to any client of ``sink``.
    """
    customers = sink.accounts.snapshot()["customers"]
    clients: list[dict[str, Any]] = [
        client
        for customer in customers.values()
        for client in customer["clients"].values()
    ]
    return sum(int(client["bytes_served"]) for client in clients)


async def connect(sink: EgdSink) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = sink.bound_addresses()[0].removeprefix("tcp://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_closed_connection_withdraws_nothing_for_queued_reads(
    sink: EgdSink,
) -> None:
    """
    Blocking reads queued on an empty pool, then the connection is closed by
    the sink in the same turn as the pool fills: the 64 bytes the pending
    read had taken go back to the pool, nothing is written, and the client's
    accounts are refunded in full.
    """
    reader, writer = await connect(sink)
    writer.write(b"\x02\x40" * 8)
    await eventually(lambda: 1 == len(sink.connections()))
    [connection] = sink.connections()
    await eventually(lambda: not connection.idle and not connection.reading_paused)
    # Wait until the first read is waiting on the pool (charged, then pending).
    await eventually(lambda: 64 == bytes_served(sink))
    sink.pool.add(os.urandom(4096), 8)
    level = sink.pool.level
    connection.close()
    await eventually(lambda: connection.idle)
    async with asyncio.timeout(DEADLINE):
        assert b"" == await reader.read()
    await eventually(lambda: not sink.connections())
    assert level + 64 == sink.pool.level
    assert 0 == sink.bytes_out
    assert 0 == bytes_served(sink)
    writer.close()


async def test_shutdown_drops_queued_reads_and_refunds_them(sink: EgdSink) -> None:
    """
    A shutdown that cannot wait closes a connection with reads queued on an
    empty pool; refilling the pool afterwards serves nobody and the client
    is charged nothing.
    """
    reader, writer = await connect(sink)
    writer.write(b"\x02\xff" * 4 + b"\x01\x10")
    await eventually(lambda: bytes_served(sink) > 0)
    await sink.shutdown(0)
    sink.pool.add(os.urandom(4096), 8)
    level = sink.pool.level
    async with asyncio.timeout(DEADLINE):
        assert b"" == await reader.read()
    await eventually(lambda: not sink.connections())
    assert level == sink.pool.level
    assert 0 == sink.bytes_out
    assert 0 == bytes_served(sink)
    writer.close()


async def test_bytes_out_matches_what_was_charged_after_close(sink: EgdSink) -> None:
    """
    Reads answered before the close are written and charged; the ones still
    queued when the sink closes the connection are neither.
    """
    sink.pool.add(os.urandom(200), 8)
    reader, writer = await connect(sink)
    writer.write(b"\x02\x10" + b"\x02\xff" * 8)
    async with asyncio.timeout(DEADLINE):
        first = await reader.readexactly(16)
    assert 16 == len(first)
    [connection] = sink.connections()
    connection.close()
    async with asyncio.timeout(DEADLINE):
        rest = await reader.read()
    await eventually(lambda: not sink.connections())
    assert sink.bytes_out == bytes_served(sink)
    assert 16 + len(rest) == sink.bytes_out
    writer.close()
