"""
The bare EGD server: the honest floor the daemon's EGD figures are compared to.

Its own process, uvloop, one `asyncio.Protocol`: ``02 N`` is answered with
``os.urandom(N)``, ``01 N`` with a count byte and as many random bytes, ``00``
with a fixed 4-byte level and ``04`` with a PID; ``03`` is read and dropped.
No pool, accounts or limits beyond the minimum a server needs to stay fair
under hostile load: each turn answers at most `TURN_REQUESTS` requests or
`TURN_BYTES` of replies in one write and then lets the loop serve everyone else
(``call_soon``), and a connection is not read while it has a turn's worth queued
or its write buffer is over the transport's high-water mark. Without the turn
bound one 256 KiB read of ``02 FF`` from a client that never reads would owe
32 MiB in a single callback, and the floor itself would freeze.

Run ``python -m tests.bench.bare_egd``: it prints its port on the first line of
stdout and serves 127.0.0.1 until SIGTERM or SIGINT. Like the daemon it raises
its soft open-file limit to the hard limit and listens with ebroker's default
backlog, so 10,000 connections are not refused by the floor alone.
"""

import asyncio
import os
import resource
import signal
import sys
from typing import cast

import uvloop

_LEVEL = (9999 * 8).to_bytes(4, "big")
_PID = str(os.getpid()).encode()
TURN_REQUESTS = 1024
TURN_BYTES = 65536
BACKLOG = 10240


class BareEgd(asyncio.Protocol):
    """
    One connection: parse what arrived, answer one turn's worth in one write.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._at = 0
        self._write_paused = False
        self._backlog = False
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._turn()

    def data_received(self, data: bytes) -> None:
        self._buffer = self._buffer[self._at :] + data if self._buffer else data
        self._at = 0
        if not self._backlog:
            self._turn()

    def _turn(self) -> None:
        # One turn: at most TURN_REQUESTS requests or TURN_BYTES of replies,
        # then the loop serves everyone else before this connection's rest.
        transport = self._transport
        if transport is None or self._write_paused:
            self._flow()
            return
        buffer, at, end = self._buffer, self._at, len(self._buffer)
        replies: list[bytes] = []
        size = handled = 0
        while at < end and handled < TURN_REQUESTS and size < TURN_BYTES:
            command = buffer[at]
            if command == 0:
                reply = _LEVEL
                at += 1
            elif command in (1, 2):
                if at + 2 > end:
                    break
                count = buffer[at + 1]
                reply = os.urandom(count)
                if command == 1:
                    reply = bytes((count,)) + reply
                at += 2
            elif command == 3:
                if at + 4 > end or at + 4 + buffer[at + 3] > end:
                    break
                reply = b""
                at += 4 + buffer[at + 3]
            elif command == 4:
                reply = bytes((len(_PID),)) + _PID
                at += 1
            else:
                transport.close()
                return
            replies.append(reply)
            size += len(reply)
            handled += 1
        self._at = at
        self._backlog = handled == TURN_REQUESTS or size >= TURN_BYTES
        if size:
            transport.write(b"".join(replies))
        if self._backlog and not self._write_paused:
            asyncio.get_running_loop().call_soon(self._turn)
        self._flow()

    def _flow(self) -> None:
        # Stop reading while a turn's worth is still queued or the client does
        # not read its replies: input then waits in the socket, bounded by TCP.
        transport = self._transport
        if transport is None:
            return
        paused = self._backlog or self._write_paused
        if paused and not self._reading_paused:
            transport.pause_reading()
        elif not paused and self._reading_paused:
            transport.resume_reading()
        self._reading_paused = paused


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(BareEgd, "127.0.0.1", 0, backlog=BACKLOG)
    print(server.sockets[0].getsockname()[1], flush=True)
    await stop.wait()
    server.close()


def raise_open_files() -> None:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit, as the daemon does.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    raise_open_files()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
