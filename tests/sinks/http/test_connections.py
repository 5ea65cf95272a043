"""
The HTTP sink's connection guard on loopback: connection caps at accept, the
header and keep-alive deadlines, malformed requests answered 4xx without a
traceback, and the PROXY gate.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog

from broker.accounts import Accounts, AccountsConfig, CustomerConfig
from broker.ratelog import CountedLog
from sinks.http.config import HttpSinkConfig
from sinks.http.connections import ConnectionGuard, Limits
from sinks.http.server import HttpSink
from tests.helpers import DEADLINE, eventually
from tests.sinks.http.test_api import FakeBroker, fill

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def make_config(**overrides: Any) -> HttpSinkConfig:
    """
    A tenant sink on an ephemeral loopback port.
    """
    return HttpSinkConfig.model_validate(
        {"kind": "http", "listen": ["tcp://127.0.0.1:0"], **overrides}
    )


@asynccontextmanager
async def running(
    config: HttpSinkConfig, broker: FakeBroker | None = None
) -> AsyncIterator[HttpSink]:
    """
    A started sink, shut down afterwards.
    """
    sink = HttpSink(config, broker if broker is not None else FakeBroker())
    await sink.start()
    try:
        yield sink
    finally:
        await sink.shutdown(1.0)


def port_of(sink: HttpSink) -> int:
    return int(sink.bound_addresses()[0].rsplit(":", 1)[1])


async def connect(sink: HttpSink, source: str = "127.0.0.1") -> Streams:
    """
    A connection from ``source`` (any 127.0.0.0/8 address works on loopback).
    """
    return await asyncio.open_connection(
        "127.0.0.1", port_of(sink), local_addr=(source, 0)
    )


async def exchange(sink: HttpSink, data: bytes, source: str = "127.0.0.1") -> bytes:
    """
    Send ``data``, read until the server closes, return what it sent.
    """
    reader, writer = await connect(sink, source)
    try:
        writer.write(data)
        async with asyncio.timeout(DEADLINE):
            return await reader.read()
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """
    Everything the server sent before closing (EOF or reset).
    """
    try:
        async with asyncio.timeout(DEADLINE):
            return await reader.read()
    except ConnectionResetError:
        return b""


def status_code(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


HEALTHZ = b"GET /healthz HTTP/1.0\r\n\r\n"


async def until_refused(sink: HttpSink, reason: str, count: int = 1) -> None:
    await eventually(lambda: sink.status().refused.get(reason, 0) >= count)


# ---- caps -----------------------------------------------------------------------


async def test_connections_over_the_cap_are_closed_at_accept() -> None:
    """
    With ``max_connections`` held by half-sent requests, the next connection
    is closed at once and counted; once one closes, a new client is served.
    """
    async with running(make_config(max_connections=3)) as sink:
        held = [await connect(sink, f"127.0.0.{n}") for n in (2, 3, 4)]
        for _, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x")
        await eventually(lambda: 3 == sink.status().connections)
        reader, writer = await connect(sink, "127.0.0.5")
        assert b"" == await closed_by_server(reader)
        writer.close()
        assert 1 == sink.status().refused["max_connections"]
        assert 3 == sink.status().connections
        held[0][1].close()
        await eventually(lambda: 2 == sink.status().connections)
        assert 200 == status_code(await exchange(sink, HEALTHZ, "127.0.0.5"))
        for _, writer in held[1:]:
            writer.close()


async def test_one_client_cannot_take_every_slot() -> None:
    """
    A source address at ``max_connections_per_client`` is refused another
    connection while a different address is still served.
    """
    async with running(make_config(max_connections_per_client=2)) as sink:
        held = [await connect(sink, "127.0.0.2") for _ in range(2)]
        for _, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x")
        assert b"" == await exchange(sink, HEALTHZ, "127.0.0.2")
        assert 1 == sink.status().refused["max_connections_per_client"]
        assert 200 == status_code(await exchange(sink, HEALTHZ, "127.0.0.3"))
        for _, writer in held:
            writer.close()


# ---- deadlines ------------------------------------------------------------------


async def test_slow_headers_are_cut_at_the_header_timeout() -> None:
    """
    A client still trickling its first request's headers at ``header_timeout``
    is answered 408 and closed; the refusal is counted.
    """
    async with running(make_config(header_timeout=0.2)) as sink:
        reader, writer = await connect(sink)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = await closed_by_server(reader)
        writer.close()
        assert 408 == status_code(answer)
        assert 1 == sink.status().refused["header_timeout"]


async def test_blank_lines_before_the_request_do_not_end_the_header_timeout() -> None:
    """
    Empty lines ahead of the request line (which aiohttp skips) do not count
    as the end of the headers: trickled headers after them are still cut.
    """
    async with running(make_config(header_timeout=0.2, idle_timeout=DEADLINE)) as sink:
        reader, writer = await connect(sink)
        writer.write(b"\r\n\r\n\n\nGET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = await closed_by_server(reader)
        writer.close()
        assert 408 == status_code(answer)
        assert 1 == sink.status().refused["header_timeout"]


async def test_blank_lines_before_a_request_are_skipped() -> None:
    """
    A complete request after leading empty lines is answered.
    """
    async with running(make_config()) as sink:
        answer = await exchange(sink, b"\r\n\r\n" + HEALTHZ)
        assert 200 == status_code(answer)


async def test_a_silent_connection_is_cut_at_the_header_timeout() -> None:
    """
    A connection that sends nothing at all is closed at ``header_timeout``.
    """
    async with running(make_config(header_timeout=0.2)) as sink:
        reader, writer = await connect(sink)
        assert b"" == await closed_by_server(reader)
        writer.close()
        await until_refused(sink, "header_timeout")


async def test_a_long_wait_outlives_the_header_timeout() -> None:
    """
    The header deadline ends with the headers: a ``?wait=`` request blocked
    well past it is still answered once entropy arrives.
    """
    broker = FakeBroker()
    async with running(make_config(header_timeout=0.2), broker) as sink:
        waiting = asyncio.create_task(
            exchange(sink, b"GET /v1/entropy?bytes=16&wait=25 HTTP/1.0\r\n\r\n")
        )
        # A connection opened after the waiting one has hit the deadline, so
        # the waiting one's has passed too.
        await eventually(lambda: sink.status().requests >= 1)
        reader, writer = await connect(sink)
        await closed_by_server(reader)
        writer.close()
        await until_refused(sink, "header_timeout")
        fill(broker.pool, 16)
        answer = await waiting
        assert 200 == status_code(answer)
        assert 16 == len(answer.split(b"\r\n\r\n", 1)[1])


async def test_an_idle_keep_alive_connection_is_closed() -> None:
    """
    After its answer, a keep-alive connection that sends nothing more is
    closed at ``idle_timeout``.
    """
    async with running(make_config(idle_timeout=0.2)) as sink:
        reader, writer = await connect(sink)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await closed_by_server(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.endswith(b"ok\n")


async def test_keep_alive_serves_several_requests() -> None:
    """
    A well-behaved keep-alive client gets every answer on one connection.
    """
    async with running(make_config()) as sink:
        reader, writer = await connect(sink)
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(DEADLINE):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert b"ok\n" == await reader.readexactly(3)
        writer.close()
        assert {} == dict(sink.status().refused)


async def test_trickled_headers_of_a_later_request_are_cut_when_idle() -> None:
    """
    On a keep-alive connection, a second request whose headers trickle in
    is cut at ``idle_timeout`` after the first answer.
    """
    async with running(make_config(idle_timeout=0.3)) as sink:
        reader, writer = await connect(sink)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n"
        )
        trickle = asyncio.create_task(trickle_until_closed(writer, reader))
        answer = await closed_by_server(reader)
        await trickle
        writer.close()
        assert 1 == answer.count(b"HTTP/1.1 200")


async def trickle_until_closed(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader
) -> None:
    """
    Send a header byte now and then until the server hangs up.
    """
    while not reader.at_eof() and not writer.is_closing():
        writer.write(b"X")
        # Load, not synchronisation: the slow client's pace.
        await asyncio.sleep(0.05)


class FakeTransport(asyncio.Transport):
    """
    Records writes, and whether the guard closed or aborted the connection;
    ``buffered`` is what the test says still waits in the buffer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.aborted = asyncio.Event()
        self.closed = False
        self.buffered = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.7", 5000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted.set()

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted.is_set()


def fake_guard(write_timeout: float) -> tuple[ConnectionGuard, CountedLog]:
    refusals = CountedLog(structlog.get_logger(), "http_refused")
    limits = Limits(
        max_connections=10,
        max_connections_per_client=10,
        header_timeout=DEADLINE,
        write_timeout=write_timeout,
    )
    return ConnectionGuard(limits, asyncio.Protocol, refusals), refusals


async def test_a_client_that_stops_reading_is_dropped() -> None:
    """
    A connection whose buffered bytes make no progress for ``write_timeout``
    is aborted and counted, whether or not writing was paused; one whose
    buffer drains in time is kept.
    """
    guard, refusals = fake_guard(write_timeout=0.05)
    kept, paused, stalled = guard(), guard(), guard()
    transports = [FakeTransport() for _ in range(3)]
    for connection, transport in zip((kept, paused, stalled), transports, strict=True):
        connection.connection_made(transport)
        connection.write(b"x" * 120)
    transports[0].buffered = 0
    paused.pause_writing()
    async with asyncio.timeout(DEADLINE):
        await transports[1].aborted.wait()
        await transports[2].aborted.wait()
    assert {"write_timeout": 2} == dict(refusals.counts())
    assert not transports[0].is_closing()
    for connection in (kept, paused, stalled):
        connection.connection_lost(None)
    assert 0 == len(guard)


class PeerTransport(FakeTransport):
    """
    A fake transport whose peer address the test chooses.
    """

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.host, 5000) if name == "peername" else default


async def test_an_ipv4_mapped_peer_is_the_same_client_for_the_cap() -> None:
    """
    ``::ffff:127.0.0.9`` (a dual-stack listener's spelling) and ``127.0.0.9``
    are one client: with a cap of one, the second connection is refused.
    """
    refusals = CountedLog(structlog.get_logger(), "http_refused")
    limits = Limits(
        max_connections=10,
        max_connections_per_client=1,
        header_timeout=DEADLINE,
        write_timeout=DEADLINE,
    )
    guard = ConnectionGuard(limits, asyncio.Protocol, refusals)
    first, second = guard(), guard()
    first.connection_made(PeerTransport("::ffff:127.0.0.9"))
    refused = PeerTransport("127.0.0.9")
    second.connection_made(refused)
    assert {"max_connections_per_client": 1} == dict(refusals.counts())
    assert refused.is_closing()
    first.connection_lost(None)
    second.connection_lost(None)
    assert 0 == len(guard)


async def test_a_close_that_never_drains_becomes_an_abort() -> None:
    """
    A close with a few bytes still unsent (below any high-water mark, so no
    ``pause_writing``) that the client never reads is turned into an abort
    after ``write_timeout``, and the slot is released.
    """
    guard, refusals = fake_guard(write_timeout=0.05)
    connection, transport = guard(), FakeTransport()
    connection.connection_made(transport)
    # Header deadline first: a 408 goes out, then the close waits on the client.
    connection._headers_expired()
    assert transport.closed
    async with asyncio.timeout(DEADLINE):
        await transport.aborted.wait()
    assert 1 == refusals.counts()["header_timeout"]
    assert 1 == refusals.counts()["close_timeout"]
    connection.connection_lost(None)
    assert 0 == len(guard)


# ---- malformed requests ---------------------------------------------------------

MALFORMED = {
    "non-utf8 bearer token": b"GET /v1/entropy?bytes=8 HTTP/1.1\r\nHost: x\r\n"
    b"Authorization: Bearer \xff\xfe\x80\xc3(\r\nConnection: close\r\n\r\n",
    "control character in token": b"GET /v1/entropy?bytes=8 HTTP/1.1\r\nHost: x\r\n"
    b"Authorization: Bearer ab\x01cd\r\nConnection: close\r\n\r\n",
    "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "bad method": b"G\xffT / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad version": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "request line too long": b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n",
    "header too long": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    + b"a" * 10000
    + b"\r\n\r\n",
    "too many headers": b"GET /healthz HTTP/1.1\r\n"
    + b"".join(b"X-%d: y\r\n" % n for n in range(200))
    + b"\r\n",
    "header without colon": b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n",
    "bad content-length": b"POST /healthz HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: lots\r\n\r\n",
    "body too large": b"POST /healthz HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 1000000\r\n\r\n",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_requests_get_a_4xx_without_a_traceback(
    data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """
    Every malformed request is answered 4xx with a short reason, is counted,
    and logs nothing with a traceback, through structlog or through aiohttp's
    stdlib loggers.
    """
    async with running(make_config()) as sink:
        with structlog.testing.capture_logs() as logs:
            answer = await exchange(sink, data)
        assert 400 <= status_code(answer) < 500, answer[:200]
        assert b'"error"' in answer
        assert [] == [entry for entry in logs if "exc_info" in entry]
        assert [] == [entry for entry in logs if entry["log_level"] == "error"]
        assert [] == aiohttp_errors(caplog)


def aiohttp_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """
    What aiohttp logged at ERROR or with a traceback through stdlib logging,
    which structlog's ``capture_logs`` does not see.
    """
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("aiohttp")
        and (record.levelno >= logging.ERROR or record.exc_info)
    ]


ANY_BYTES = bytes(range(0x80, 0x100)) + b"\x01\x7f"


@pytest.mark.parametrize(
    "header",
    [b"Host", b"Authorization", b"Accept", b"Content-Type", b"Cookie", b"Origin"],
)
async def test_any_bytes_in_any_header_are_not_a_server_error(
    header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """
    High and control bytes in a common header value never give a 500, nor a
    logged traceback.
    """
    async with running(make_config(plane="operator")) as sink:
        for path in (b"/healthz", b"/v1/entropy?bytes=8", b"/", b"/v1/status"):
            with structlog.testing.capture_logs() as logs:
                answer = await exchange(
                    sink,
                    b"GET %s HTTP/1.1\r\nHost: x\r\n%s: Bearer %s\r\n"
                    b"Connection: close\r\n\r\n" % (path, header, ANY_BYTES),
                )
            assert status_code(answer) < 500, (path, answer[:300])
            assert [] == [entry for entry in logs if "exc_info" in entry]
    assert [] == aiohttp_errors(caplog)


# ---- PROXY protocol -------------------------------------------------------------


async def test_proxy_header_from_an_untrusted_peer_is_refused() -> None:
    """
    A PROXY header from an address that is not a trusted proxy closes the
    connection unanswered; a plain request from that address is served.
    """
    async with running(make_config()) as sink:
        header = b"PROXY TCP4 10.9.8.7 10.0.0.1 40000 80\r\n"
        assert b"" == await exchange(sink, header + HEALTHZ, "127.0.0.2")
        assert 1 == sink.status().refused["proxy_untrusted"]
        assert 200 == status_code(await exchange(sink, HEALTHZ, "127.0.0.2"))


async def test_a_trusted_proxy_names_the_client() -> None:
    """
    Behind a trusted proxy, the client named in the PROXY header is the one
    identified (here a denied network, so 403) and capped per client.
    """
    accounts = Accounts(
        AccountsConfig(),
        [CustomerConfig(id="blocked", networks=["10.9.8.0/24"], deny=True)],
    )
    broker = FakeBroker(accounts=accounts)
    config = make_config(trusted_proxies=["127.0.0.2/32"], max_connections_per_client=1)
    request = b"GET /v1/entropy?bytes=8 HTTP/1.0\r\n\r\n"
    async with running(config, broker) as sink:
        blocked = b"PROXY TCP4 10.9.8.7 10.0.0.1 40000 80\r\n"
        assert 403 == status_code(await exchange(sink, blocked + request, "127.0.0.2"))
        fill(broker.pool, 8)
        allowed = b"PROXY TCP4 10.1.1.1 10.0.0.1 40000 80\r\n"
        assert 200 == status_code(await exchange(sink, allowed + request, "127.0.0.2"))
        # Two clients behind one proxy each get their own per-client slot.
        held = await connect(sink, "127.0.0.2")
        held[1].write(b"PROXY TCP4 10.1.1.2 10.0.0.1 40000 80\r\nGET /h")
        await eventually(lambda: 1 == sink.status().connections)
        other = b"PROXY TCP4 10.1.1.3 10.0.0.1 40000 80\r\n"
        assert 200 == status_code(await exchange(sink, other + HEALTHZ, "127.0.0.2"))
        again = b"PROXY TCP4 10.1.1.2 10.0.0.1 40001 80\r\n"
        assert b"" == await exchange(sink, again + HEALTHZ, "127.0.0.2")
        assert 1 == sink.status().refused["max_connections_per_client"]
        held[1].close()


# ---- refusals and shutdown ------------------------------------------------------


async def test_a_flood_of_refusals_logs_one_line_per_reason() -> None:
    """
    Many refusals for one reason are all counted but logged once (the rest
    are held back by the rate-limited log).
    """
    async with running(make_config()) as sink:
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):
                await exchange(sink, b"\xff\r\n\r\n")
        assert 5 == sink.status().refused["malformed"]
        refused = [entry for entry in logs if entry["event"] == "http_refused"]
        assert ["malformed"] == [entry["reason"] for entry in refused]


async def test_shutdown_closes_connections_that_never_sent_a_request() -> None:
    """
    Connections still sending their first headers do not hold up shutdown.
    """
    sink = HttpSink(make_config(), FakeBroker())
    await sink.start()
    reader, writer = await connect(sink)
    writer.write(b"GET /hea")
    await eventually(lambda: 1 == sink.status().connections)
    await sink.shutdown(1.0)
    assert b"" == await closed_by_server(reader)
    writer.close()
