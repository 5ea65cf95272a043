"""
Per-connection flow control with a fake transport: the work one connection does
per turn of the event loop, and the output a client may hold unread.
"""

import asyncio
import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.pool import EntropyPool
from sinks.egd.config import EgdSinkConfig
from sinks.egd.connection import EgdConnection
from sinks.egd.flow import TURN_BYTES, TURN_REQUESTS, OutputBound, TurnBudget
from sinks.egd.server import EgdSink
from tests.helpers import eventually
from tests.sinks.egd.doubles import View


class FakeTransport:
    """
    Records writes; sends them into ``sock`` (if given) so the kernel's send
    queue is real, keeping in user space what the socket does not take.
    """

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock
        self.writes: list[bytes] = []
        self.buffer = bytearray()
        self.closing = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": self.sock}.get(name, default)

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        self.high = high

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        sent = 0
        if self.sock is not None and not self.buffer:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
        self.buffer += data[sent:]

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def fill(pool: EntropyPool, nbytes: int) -> None:
    """
    Release about ``nbytes`` of output (40 credited input bytes per 32 out).
    """
    pool.add(os.urandom(nbytes * 40 // 32 + 40), 8)


@pytest.fixture
def sink(tmp_path: Path) -> EgdSink:
    config = EgdSinkConfig(kind="egd", listen=["unix:egd.sock"])
    return EgdSink(config, View(tmp_path, EntropyPool(1 << 22)))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.setblocking(False)
    client.setblocking(False)
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def serve(sink: EgdSink, transport: FakeTransport) -> EgdConnection:
    """
    A connection on ``transport``, as the sink's listener would make it.
    """
    connection = EgdConnection(sink)
    connection.connection_made(transport)  # type: ignore[arg-type]
    return connection


async def progress_between_turns(observe: Any, done: Any) -> list[int]:
    """
    What ``observe()`` returns each time another callback gets a turn, until
    ``done()``: the work one connection did between two of them.
    """
    seen: list[int] = []
    finished = asyncio.get_running_loop().create_future()

    def probe() -> None:
        seen.append(observe())
        if done():
            finished.set_result(None)
        else:
            asyncio.get_running_loop().call_soon(probe)

    asyncio.get_running_loop().call_soon(probe)
    await asyncio.wait_for(finished, 30)
    return seen


def test_turn_budget_counts_requests_and_bytes() -> None:
    """
    A turn is spent after TURN_REQUESTS requests or TURN_BYTES bytes of
    output, whichever comes first; a request without output still counts.
    """
    budget = TurnBudget()
    for _ in range(TURN_REQUESTS - 1):
        budget.answered()
    short = budget.spent
    budget.answered()
    assert (False, True) == (short, budget.spent)
    by_bytes = TurnBudget()
    by_bytes.wrote(TURN_BYTES - 1)
    short = by_bytes.spent
    by_bytes.wrote(1)
    assert (False, True) == (short, by_bytes.spent)


async def test_yielding_resets_the_budget() -> None:
    """
    After yielding the connection has a whole new turn.
    """
    budget = TurnBudget(requests=2)
    budget.answered()
    budget.answered()
    await budget.yield_if_spent()
    assert not budget.spent


async def test_pipelined_level_requests_share_the_loop(sink: EgdSink) -> None:
    """
    1,000 pipelined 0x00 requests are all answered, but another callback runs
    after every TURN_REQUESTS of them at most; the replies of one turn go out
    in one write.
    """
    transport = FakeTransport()
    connection = serve(sink, transport)
    connection.data_received(b"\x00" * 1000)

    def answered() -> int:
        return sum(map(len, transport.writes)) // 4

    seen = await progress_between_turns(answered, lambda: answered() == 1000)
    steps = [after - before for before, after in itertools.pairwise(seen)]
    assert 1000 == answered()
    assert max(steps) <= TURN_REQUESTS
    assert len(transport.writes) <= -(-1000 // TURN_REQUESTS)


async def test_zero_length_reads_count_as_work(sink: EgdSink) -> None:
    """
    1,000 pipelined ``02 00`` (which send nothing) then one ``00``: other
    callbacks get many turns before the ``00`` is answered.
    """
    transport = FakeTransport()
    connection = serve(sink, transport)
    connection.data_received(b"\x02\x00" * 1000 + b"\x00")
    seen = await progress_between_turns(lambda: 0, lambda: len(transport.writes) == 1)
    assert len(seen) >= 1000 // TURN_REQUESTS - 1


async def test_ready_blocking_reads_share_the_loop(sink: EgdSink) -> None:
    """
    Blocking reads that the pool can answer at once are answered a turn at a
    time: at most TURN_BYTES (plus one chunk) between two other callbacks.
    """
    fill(sink.pool, 1 << 20)
    transport = FakeTransport()
    connection = serve(sink, transport)
    connection.data_received(b"\x02\xff" * 200)

    def written() -> int:
        return sum(map(len, transport.writes))

    seen = await progress_between_turns(written, lambda: written() == 255 * 200)
    steps = [after - before for before, after in itertools.pairwise(seen)]
    assert max(steps) <= TURN_BYTES + sink.config.chunk_size


async def test_output_bound_waits_while_the_client_holds_the_limit() -> None:
    """
    `room` returns at once below the limit and waits while user-space plus
    kernel-queued bytes reach it, until the client reads.
    """
    bound = OutputBound(1000)
    kernel = [0]
    bound.attach(lambda: 400, lambda: kernel[0])
    await bound.room()
    kernel[0] = 600
    waiting = asyncio.create_task(bound.room())
    await asyncio.sleep(0)
    assert not waiting.done()
    assert 1000 == bound.unread()
    kernel[0] = 599
    await asyncio.wait_for(waiting, 30)


async def test_output_bound_wakes_on_resume_writing() -> None:
    """
    While the transport itself is paused the wait is for resume_writing.
    """
    bound = OutputBound(10)
    size = [10]
    bound.attach(lambda: size[0], lambda: 0)
    bound.pause_writing()
    waiting = asyncio.create_task(bound.room())
    await asyncio.sleep(0)
    assert not waiting.done()
    size[0] = 2
    bound.resume_writing()
    await asyncio.wait_for(waiting, 30)


async def test_non_reader_gets_at_most_the_bound_plus_one_chunk(
    sink: EgdSink, pair: tuple[socket.socket, socket.socket]
) -> None:
    """
    A client that asks for far more than it reads is handed at most
    max_buffered_output plus one chunk, counted in the kernel's send queue; once
    it reads, it is served again.
    """
    server, client = pair
    pool = sink.pool
    fill(pool, 1 << 21)
    transport = FakeTransport(server)
    connection = serve(sink, transport)
    connection.data_received(b"\x02\xff" * 1000)
    limit = sink.config.max_buffered_output

    def withdrawn() -> int:
        return sum(map(len, transport.writes))

    await eventually(lambda: connection.writing_paused and connection.reading_paused)
    assert withdrawn() <= limit + sink.config.chunk_size
    assert connection.unread_output() >= limit
    assert 0 == transport.get_write_buffer_size()
    before = withdrawn()
    received = 0
    while True:
        try:
            chunk = client.recv(1 << 16)
        except BlockingIOError:
            break
        received += len(chunk)
    assert before == received
    await eventually(lambda: withdrawn() > before)
    transport.closing = True
    connection.connection_lost(None)
