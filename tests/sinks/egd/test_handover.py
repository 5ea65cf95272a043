"""
Handing an EGD sink's listeners and connections to a successor sink, on
loopback with real pools: no client sees its connection close, every request
is answered once, in order, by whichever sink holds the connection.
"""

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.accounts import Peer
from broker.inherited import InheritedListeners
from broker.pool import EntropyPool
from sinks.egd.config import EgdSinkConfig
from sinks.egd.handoff import Carried
from sinks.egd.server import EgdSink, HandoverFailed
from tests.helpers import DEADLINE, eventually
from tests.sinks.egd.doubles import View
from tests.sinks.egd.test_server import connect, fill

CONFIG = EgdSinkConfig(kind="egd", listen=["tcp://127.0.0.1:0", "unix:egd.sock"])


@dataclass
class Successor:
    """
    What the successor got: copies of the fds (the sender closes its own).
    """

    accept: bool = True
    connections: list[tuple[socket.socket, Carried]] = field(default_factory=list)

    async def send(self, items: list[tuple[int, Carried]]) -> bool:
        if not self.accept:
            return False
        for fd, carried in items:
            self.connections.append((socket.socket(fileno=os.dup(fd)), carried))
        return True


@pytest.fixture
async def old(tmp_path: Path) -> AsyncIterator[tuple[EgdSink, EntropyPool]]:
    pool = EntropyPool(1 << 20)
    sink = EgdSink(CONFIG, View(tmp_path, pool))
    await sink.start()
    try:
        yield sink, pool
    finally:
        await sink.shutdown(0)


def inherit(sink: EgdSink) -> InheritedListeners:
    """
    The listeners of ``sink`` as a successor process receives them.
    """
    bank = InheritedListeners()
    for entry in sink.listening():
        copy = socket.socket(fileno=os.dup(entry.sock.fileno()))
        bank.add(copy, tag=(entry.sink, entry.address), owned=entry.owned)
    return bank


async def test_listeners_and_connections_move_to_the_successor(
    old: tuple[EgdSink, EntropyPool], tmp_path: Path
) -> None:
    """
    The successor serves on the very same addresses, and the clients of the
    old sink (TCP and Unix, one with half a request sent) go on as if nothing
    happened; the Unix socket file stays for the successor.
    """
    sink, pool = old
    fill(pool, 1000)
    tcp_reader, tcp_writer = await connect(sink, "tcp")
    unix_reader, unix_writer = await connect(sink, "unix")
    tcp_writer.write(b"\x02\x10")
    unix_writer.write(b"\x01\x08")
    async with asyncio.timeout(DEADLINE):
        assert 16 == len(await tcp_reader.readexactly(16))
        assert 8 == (await unix_reader.readexactly(9))[0]
    tcp_writer.write(b"\x02")
    await tcp_writer.drain()
    await eventually(lambda: sink.status().requests == 2)
    addresses = sink.bound_addresses()

    bank = inherit(sink)
    sink.release_listeners()
    new_pool = EntropyPool(1 << 20)
    new = EgdSink(CONFIG, View(tmp_path, new_pool), inherited=bank)
    await new.start()
    try:
        assert addresses == new.bound_addresses()
        assert 0 == len(bank)
        successor = Successor()
        assert 2 == await sink.hand_over(successor.send, wait=1.0)
        await eventually(lambda: sink.status().connections == 0)
        by_transport = {
            carried.peer.transport if carried.peer else "": carried
            for _, carried in successor.connections
        }
        assert b"\x02" == by_transport["tcp"].pending
        assert b"" == by_transport["unix"].pending
        for copy, carried in successor.connections:
            await new.adopt(copy, carried)
        fill(new_pool, 1000)
        tcp_writer.write(b"\x20")
        unix_writer.write(b"\x02\x30")
        async with asyncio.timeout(DEADLINE):
            assert 32 == len(await tcp_reader.readexactly(32))
            assert 48 == len(await unix_reader.readexactly(48))
        fresh_reader, fresh_writer = await connect(new, "unix")
        fresh_writer.write(b"\x02\x04")
        async with asyncio.timeout(DEADLINE):
            assert 4 == len(await fresh_reader.readexactly(4))
        await sink.shutdown(0)
        assert (tmp_path / "egd.sock").exists()
        assert 3 == new.status().connections
        for writer in (tcp_writer, unix_writer, fresh_writer):
            writer.close()
    finally:
        await new.shutdown(0)
    assert not (tmp_path / "egd.sock").exists()


async def test_a_read_blocked_on_an_empty_pool_goes_over_with_what_is_left(
    old: tuple[EgdSink, EntropyPool], tmp_path: Path
) -> None:
    """
    A blocking read the pool could only half serve is carried as a read of
    what is left, behind which the requests queued after it follow; the
    client gets exactly what it asked for, in order.
    """
    sink, pool = old
    fill(pool, 100)
    served = pool.level
    assert 0 < served < 255
    reader, writer = await connect(sink)
    writer.write(b"\x02\xff\x04")
    await eventually(lambda: pool.waiters == 1)
    async with asyncio.timeout(DEADLINE):
        first = await reader.readexactly(served)
    successor = Successor()
    assert 1 == await sink.hand_over(successor.send, wait=0.0)
    [(copy, carried)] = successor.connections
    assert bytes([0x02, 255 - served, 0x04]) == carried.pending
    assert 0 == pool.waiters

    new_pool = EntropyPool(1 << 20)
    new = EgdSink(CONFIG, View(tmp_path / "new", new_pool))
    await new.start()
    try:
        await new.adopt(copy, carried)
        fill(new_pool, 1000)
        async with asyncio.timeout(DEADLINE):
            rest = await reader.readexactly(255 - served)
            length = (await reader.readexactly(1))[0]
            assert str(os.getpid()).encode() == await reader.readexactly(length)
        assert 255 == len(first + rest)
        writer.close()
    finally:
        await new.shutdown(0)


async def test_a_failed_hand_over_leaves_the_connections_served(
    old: tuple[EgdSink, EntropyPool],
) -> None:
    """
    When the successor does not take the connections, the sink reads and
    answers them again as before.
    """
    sink, pool = old
    fill(pool, 1000)
    reader, writer = await connect(sink)
    writer.write(b"\x02\x08")
    async with asyncio.timeout(DEADLINE):
        assert 8 == len(await reader.readexactly(8))
    with pytest.raises(HandoverFailed):
        await sink.hand_over(Successor(accept=False).send, wait=1.0)
    writer.write(b"\x02\x08")
    async with asyncio.timeout(DEADLINE):
        assert 8 == len(await reader.readexactly(8))
    assert 1 == sink.status().connections
    assert sink.accepting
    writer.close()


async def test_a_client_behind_a_proxy_stays_who_the_header_said(
    tmp_path: Path,
) -> None:
    """
    The client address from a trusted proxy's PROXY header goes over with
    the connection: the successor serves it as that client without a second
    header. A proxied connection that has sent nothing yet goes over
    unidentified and passes the successor's own gate.
    """
    config = EgdSinkConfig(
        kind="egd", listen=["tcp://127.0.0.1:0"], trusted_proxies=["127.0.0.0/8"]
    )
    pool, new_pool = EntropyPool(1 << 20), EntropyPool(1 << 20)
    sink = EgdSink(config, View(tmp_path, pool))
    new = EgdSink(config, View(tmp_path / "new", new_pool))
    await sink.start()
    await new.start()
    try:
        fill(pool, 100)
        reader, writer = await connect(sink)
        writer.write(b"PROXY TCP4 10.1.2.3 127.0.0.1 4711 8888\r\n\x02\x08")
        async with asyncio.timeout(DEADLINE):
            assert 8 == len(await reader.readexactly(8))
        silent_reader, silent_writer = await connect(sink)
        await eventually(lambda: sink.status().connections == 2)
        successor = Successor()
        assert 2 == await sink.hand_over(successor.send, wait=1.0)
        carried = sorted(
            (c for _, c in successor.connections), key=lambda c: c.peer is None
        )
        assert Peer("tcp", ip="10.1.2.3") == carried[0].peer
        assert "10.1.2.3:4711" == carried[0].shown
        assert carried[1].peer is None
        for copy, state in successor.connections:
            await new.adopt(copy, state)
        fill(new_pool, 1000)
        writer.write(b"\x02\x10")
        silent_writer.write(b"PROXY TCP4 10.9.9.9 127.0.0.1 5000 8888\r\n\x02\x04")
        async with asyncio.timeout(DEADLINE):
            assert 16 == len(await reader.readexactly(16))
            assert 4 == len(await silent_reader.readexactly(4))
        assert {} == dict(new.refused)
        assert {} == dict(new.closed)
        writer.close()
        silent_writer.close()
    finally:
        await sink.shutdown(0)
        await new.shutdown(0)


async def test_a_client_with_too_much_unanswered_input_is_closed(
    old: tuple[EgdSink, EntropyPool],
) -> None:
    """
    A client that flooded requests behind a read the pool could not serve
    is closed rather than carried: a hand-over message stays small.
    """
    sink, pool = old
    reader, writer = await connect(sink)
    flood = b"\x02\xff" + b"\x03\x00\x00\xff" + bytes(255)
    writer.write(flood[:2] + flood[2:] * 100)
    await writer.drain()
    await eventually(lambda: pool.waiters == 1)
    successor = Successor()
    assert 0 == await sink.hand_over(successor.send, wait=0.0)
    assert [] == successor.connections
    async with asyncio.timeout(DEADLINE):
        assert b"" == await reader.read()
    writer.close()


async def test_many_connections_go_in_batches_of_at_most_250(
    tmp_path: Path,
) -> None:
    """
    SCM_RIGHTS carries a bounded number of fds: 260 connections go over in
    two messages, every one of them once.
    """
    config = CONFIG.model_copy(update={"max_connections_per_client": 1000})
    sink = EgdSink(config, View(tmp_path))
    await sink.start()
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    batches: list[int] = []
    successor = Successor()

    async def send(items: list[tuple[int, Carried]]) -> bool:
        batches.append(len(items))
        return await successor.send(items)

    try:
        clients += [await connect(sink, "unix") for _ in range(260)]
        await eventually(lambda: sink.status().connections == 260)
        assert 260 == await sink.hand_over(send, wait=1.0)
        assert [250, 10] == batches
    finally:
        for copy, _ in successor.connections:
            copy.close()
        for _, writer in clients:
            writer.close()
        await sink.shutdown(0)
