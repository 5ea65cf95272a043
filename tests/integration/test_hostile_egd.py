"""
Hostile EGD clients against the real daemon, judged by what everyone else
sees: a pipelining flood, a client that never reads, a burst of connects.

Each client binds its own loopback source address (127.0.0.2, .3, ...) so the
broker sees distinct clients.
"""

import asyncio
import contextlib
import select
import socket
from typing import Any

from tests.helpers import DEADLINE, eventually
from tests.integration.clients import BrokerHttp, EgdReader, metric_value, poll_until
from tests.integration.daemon import Daemon

# One pipelined batch of the requests that complete at once: a level query,
# a zero-length blocking read and a zero-length non-blocking read. Replies:
# 4 bytes + nothing + 1 byte.
FLOOD_BATCH = b"\x00\x02\x00\x01\x00"
FLOOD_REPLY = 5
MAX_BUFFERED_OUTPUT = 65536
"""The EGD sink's default ``max_buffered_output``."""
LARGEST_REPLY = 256


async def open_from(
    source: str, daemon: Daemon, *, rcvbuf: int | None = None
) -> socket.socket:
    """
    A non-blocking TCP socket to the EGD listener from loopback ``source``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, daemon.egd_tcp)
    return sock


def egd_sink(status: dict[str, Any]) -> dict[str, Any]:
    """
    The EGD sink's entry in /v1/status.
    """
    sinks: list[dict[str, Any]] = status["sinks"]
    [sink] = [sink for sink in sinks if sink["name"] == "egd"]
    return sink


def served_to(status: dict[str, Any], source: str) -> int:
    """
    Bytes the broker withdrew for the client at ``source``, per /v1/status.
    """
    for customer in status["accounts"]["customers"].values():
        client = customer["clients"].get(f"ip:{source}")
        if client is not None:
            return int(client["bytes_served"])
    return 0


async def test_flood_of_instant_requests_does_not_starve_others(
    daemon: Daemon,
) -> None:
    """
    While one connection pipelines level, zero-length blocking and zero-length
    non-blocking requests without pause, another client's blocking reads are
    answered and /healthz answers, with the flood still far from answered.
    """
    flooder_reader, flooder = await asyncio.open_connection(
        *daemon.egd_tcp, local_addr=("127.0.0.2", 0)
    )
    sent = 0
    received = 0

    async def flood() -> None:
        nonlocal sent
        block = FLOOD_BATCH * 8192
        while True:
            flooder.write(block)
            sent += 8192
            await flooder.drain()

    async def swallow() -> None:
        nonlocal received
        while chunk := await flooder_reader.read(1 << 16):
            received += len(chunk)

    flooding = asyncio.create_task(flood())
    swallowing = asyncio.create_task(swallow())
    victim_reader, victim = await asyncio.open_connection(
        *daemon.egd_tcp, local_addr=("127.0.0.3", 0)
    )
    try:
        await eventually(lambda: received >= 1000 * FLOOD_REPLY)
        async with BrokerHttp(daemon) as http, asyncio.timeout(DEADLINE):
            for _ in range(5):
                victim.write(b"\x02\x40")
                assert 64 == len(await victim_reader.readexactly(64))
            health, _body = await http.healthz()
            unanswered = sent - received // FLOOD_REPLY
            assert not flooding.done()
            assert unanswered > 1000, f"flood nearly answered: {unanswered}"
        assert health in (200, 503)
    finally:
        flooding.cancel()
        swallowing.cancel()
        for task in (flooding, swallowing):
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        # The flooder has megabytes queued: abort rather than flush them.
        flooder.transport.abort()
        victim.close()
        for writer in (flooder, victim):
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_client_that_never_reads_gets_at_most_the_bound(daemon: Daemon) -> None:
    """
    A client that asks for half a megabyte and never reads is handed at most
    max_buffered_output plus one reply (plus what its own small receive buffer
    holds); a normal reader keeps being served meanwhile, and what the broker
    withdrew for the silent client all arrives once it reads.
    """
    loop = asyncio.get_running_loop()
    silent = await open_from("127.0.0.3", daemon, rcvbuf=4096)
    own_buffer = silent.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    try:
        await loop.sock_sendall(silent, b"\x02\xff" * 2000)
        async with BrokerHttp(daemon) as http, EgdReader(daemon) as reader:
            await poll_until(
                http.status, lambda status: served_to(status, "127.0.0.3") > 0
            )
            # Many times the bound goes to the reader: the silent client had
            # every chance to take more, had the broker let it.
            await reader.answered(4 * MAX_BUFFERED_OUTPUT // 64)
            withdrawn = served_to(await http.status(), "127.0.0.3")
            await reader.answered(MAX_BUFFERED_OUTPUT // 64)
            withdrawn_later = served_to(await http.status(), "127.0.0.3")
        bound = MAX_BUFFERED_OUTPUT + LARGEST_REPLY + own_buffer
        assert withdrawn <= bound
        assert withdrawn_later <= bound
        arrived = 0
        async with asyncio.timeout(DEADLINE):
            while arrived < withdrawn_later:
                chunk = await loop.sock_recv(silent, 1 << 16)
                assert chunk, "connection closed before the output arrived"
                arrived += len(chunk)
    finally:
        silent.close()


def _connect_all(address: tuple[str, int], source: str, count: int) -> list[Any]:
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.bind((source, 0))
        sock.settimeout(DEADLINE)
        sock.connect(address)
    return sockets


def _readable(sockets: list[socket.socket]) -> list[socket.socket]:
    # poll, not select: these descriptors go past FD_SETSIZE.
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in sockets}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _event in poller.poll(0)]


def _check_held(held: list[socket.socket]) -> int:
    answered = 0
    for sock in held:
        sock.sendall(b"\x00")
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            assert chunk, "a held connection was closed"
            reply += chunk
        answered += 1
    return answered


async def test_burst_of_connects_is_accepted_or_cleanly_refused(
    daemon: Daemon,
) -> None:
    """
    1,000 back-to-back connects from one address with the default backlog: the
    per-client cap holds 64, every other one is closed cleanly (EOF, no reset),
    the refused counter counts each, and the log has a handful of lines.
    """
    sockets = await asyncio.to_thread(_connect_all, daemon.egd_tcp, "127.0.0.2", 1000)
    try:
        async with BrokerHttp(daemon) as http:
            status = await poll_until(
                http.status,
                lambda status: (
                    egd_sink(status)["connections_total"]
                    + sum(egd_sink(status)["refused"].values())
                    >= 1000
                ),
            )
            sink = egd_sink(status)
            metrics = await http.metrics()
        assert {"max_connections_per_client": 936} == sink["refused"]
        assert 64 == sink["connections_total"]
        assert 936 == metric_value(
            metrics,
            "ebroker_sink_refused_total",
            sink="egd",
            reason="max_connections_per_client",
        )
        await eventually(lambda: len(_readable(sockets)) >= 936)
        refused = _readable(sockets)
        assert 936 == len(refused)
        for sock in refused:
            assert b"" == await asyncio.to_thread(sock.recv, 1)
        held = [sock for sock in sockets if sock not in refused]
        assert 64 == await asyncio.to_thread(_check_held, held)
    finally:
        for sock in sockets:
            sock.close()
    lines = [entry for entry in daemon.logs() if entry["event"] == "connection_refused"]
    assert 1 <= len(lines) <= 10
