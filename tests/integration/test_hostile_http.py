"""
Hostile HTTP clients against the real daemon, judged by what a well-behaved
client sharing the broker still gets: slowloris connections are cut at the
header deadline and held to their per-client share, half-sent requests over
the cap are refused at accept, garbage gets a 4xx and no traceback, and a PROXY
header from an untrusted address is refused.
"""

import asyncio
import contextlib
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import DEADLINE
from tests.integration.clients import poll_until, running_daemon
from tests.integration.daemon import Daemon

# Attackers come from these addresses; victims from 127.0.0.2 and up.
ATTACKERS = [f"127.0.1.{n}" for n in range(1, 8)]
PER_CLIENT = 40


def hostile_config(state_dir: Path, http: str) -> str:
    """
    A broker with a tenant HTTP sink ``http`` (its extra keys in ``http``) and
    an operator sink ``ops`` to read its status from.
    """
    return (
        textwrap.dedent(
            f"""
        [broker]
        state_dir = "{state_dir}"
        pool_size = "64 KiB"
        low_watermark = "1 KiB"
        drain = "0 s"
        shutdown_grace = "2 s"

        [logging]
        level = "info"
        format = "json"

        [[sources]]
        name = "getrandom"
        kind = "getrandom"

        [[sinks]]
        name = "http"
        kind = "http"
        listen = ["tcp://127.0.0.1:0"]
        """
        )
        + textwrap.dedent(http)
        + textwrap.dedent(
            """
        [[sinks]]
        name = "ops"
        kind = "http"
        plane = "operator"
        listen = ["tcp://127.0.0.1:0"]
        """
        )
    )


def tcp_port(daemon: Daemon, sink: str) -> int:
    return int(daemon.address(sink, "tcp://").rsplit(":", 1)[1])


async def http_status(daemon: Daemon) -> dict[str, Any]:
    """
    The tenant sink's entry in the operator sink's /v1/status.
    """
    url = f"http://127.0.0.1:{tcp_port(daemon, 'ops')}/v1/status"
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url) as resp,
    ):
        document: dict[str, Any] = await resp.json()
    for sink in document["sinks"]:
        if sink["name"] == "http":
            found: dict[str, Any] = sink
            return found
    raise KeyError("no http sink in status")


async def connect(
    daemon: Daemon, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", tcp_port(daemon, "http"), local_addr=(source, 0)
    )


async def closed_by_daemon(reader: asyncio.StreamReader) -> bytes:
    """
    Everything the daemon sent before it closed the connection (or reset it).
    """
    try:
        async with asyncio.timeout(DEADLINE):
            return await reader.read()
    except ConnectionResetError:
        return b""


async def hang_up(writer: asyncio.StreamWriter) -> None:
    """
    Close our end and wait until the socket is really closed.
    """
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def exchange(daemon: Daemon, data: bytes, source: str) -> bytes:
    """
    Send ``data`` from ``source``; everything the daemon sent before closing.
    """
    reader, writer = await connect(daemon, source)
    try:
        writer.write(data)
        return await closed_by_daemon(reader)
    finally:
        await hang_up(writer)


def status_code(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@contextlib.contextmanager
def broker(tmp_path: Path, http: str) -> Iterator[Daemon]:
    with running_daemon(tmp_path, hostile_config(tmp_path / "state", http)) as d:
        yield d


async def victim_is_served(daemon: Daemon, source: str) -> None:
    """
    A normal client from ``source`` gets its health check and its entropy.
    """
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    base = f"http://127.0.0.1:{tcp_port(daemon, 'http')}"
    async with aiohttp.ClientSession(
        base, connector=connector, timeout=timeout
    ) as session:
        async with session.get("/healthz") as resp:
            assert 200 == resp.status
        async with session.get(
            "/v1/entropy", params={"bytes": "32", "wait": "10"}
        ) as resp:
            assert 200 == resp.status
            assert 32 == len(await resp.read())


@contextlib.asynccontextmanager
async def slowloris(daemon: Daemon, per_source: int) -> AsyncIterator[list[int]]:
    """
    ``per_source`` connections from every attacker address, each trickling a
    header byte every half second and reconnecting once cut. Yields the
    count of connections the daemon cut.
    """
    cut = [0]

    async def attacker(source: str) -> None:
        while True:
            reader, writer = await connect(daemon, source)
            closed = asyncio.ensure_future(reader.read())
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                while not closed.done():
                    writer.write(b"X")
                    # Load, not synchronisation: the attack's trickle rate,
                    # and how soon a cut attacker comes back.
                    await asyncio.sleep(0.5)
            finally:
                closed.cancel()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await closed
                await hang_up(writer)
            cut[0] += 1

    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(attacker(source))
            for source in ATTACKERS
            for _ in range(per_source)
        ]
        try:
            yield cut
        finally:
            for task in tasks:
                task.cancel()


async def test_slowloris_is_cut_and_capped_while_a_normal_client_is_served(
    tmp_path: Path,
) -> None:
    """
    While 350 slowloris connections trickle header bytes, each attacker holds
    at most its per-client share, connections are cut at the header
    deadline, and a normal client's health check and entropy are answered.
    """
    http = f"""
        header_timeout = "2 s"
        max_connections_per_client = {PER_CLIENT}
        """
    with broker(tmp_path, http) as daemon:
        cap = len(ATTACKERS) * PER_CLIENT
        async with slowloris(daemon, per_source=50):
            status = await poll_until(
                lambda: http_status(daemon), lambda s: s["connections"] >= cap
            )
            assert status["connections"] <= cap
            assert status["refused"]["max_connections_per_client"] > 0
            await victim_is_served(daemon, "127.0.0.2")
            status = await poll_until(
                lambda: http_status(daemon),
                lambda s: s["refused"].get("header_timeout", 0) >= cap,
            )
            assert status["connections"] <= cap + 1
            await victim_is_served(daemon, "127.0.0.3")
        assert [] == tracebacks(daemon)


async def test_half_sent_requests_over_the_cap_are_refused_at_accept(
    tmp_path: Path,
) -> None:
    """
    Half-sent requests fill ``max_connections``; every connection over it is
    closed at accept and counted, and none of the held ones is dropped.
    """
    http = """
        max_connections = 60
        header_timeout = "120 s"
        """
    with broker(tmp_path, http) as daemon:
        held = []
        refused = 0
        for n in range(90):
            reader, writer = await connect(daemon, ATTACKERS[n % len(ATTACKERS)])
            writer.write(b"GET /v1/entropy?bytes=8 HTTP/1.1\r\nHost: x\r\n")
            held.append((reader, writer))
        for reader, _ in held[60:]:
            refused += b"" == await closed_by_daemon(reader)
        status = await http_status(daemon)
        assert 30 == refused
        assert 30 == status["refused"]["max_connections"]
        assert 60 == status["connections"]
        assert all(not reader.at_eof() for reader, _ in held[:60])
        for _, writer in held:
            await hang_up(writer)


GARBAGE = [
    b"GET /v1/entropy?bytes=8 HTTP/1.1\r\nHost: x\r\n"
    b"Authorization: Bearer \xff\xfe\x80\xc3(\r\nConnection: close\r\n\r\n",
    b"GET /v1/entropy?bytes=8 HTTP/1.1\r\nHost: \xff\r\n"
    b"Authorization: \x01\x02\x03\r\nConnection: close\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nX: " + b"b" * 20000 + b"\r\n\r\n",
]


def tracebacks(daemon: Daemon) -> list[dict[str, object]]:
    """
    Log entries carrying a traceback (structlog's ``exception`` field, or
    aiohttp's own through the standard library).
    """
    return [
        entry
        for entry in daemon.logs()
        if "exception" in entry or "Traceback" in str(entry)
    ]


async def test_garbage_gets_a_4xx_and_no_traceback(tmp_path: Path) -> None:
    """
    Bytes that are not a valid request (a non-UTF-8 bearer token, stray
    header bytes, TLS on the HTTP port, oversized lines) get a 4xx; the
    daemon logs no traceback and keeps serving.
    """
    with broker(tmp_path, "") as daemon:
        for data in GARBAGE:
            answer = await exchange(daemon, data, "127.0.0.4")
            assert 400 <= status_code(answer) < 500, answer[:200]
        await victim_is_served(daemon, "127.0.0.4")
        assert [] == tracebacks(daemon)


async def test_proxy_header_from_an_untrusted_address_is_refused(
    tmp_path: Path,
) -> None:
    """
    A PROXY v1 header from an address that is not a trusted proxy closes the
    connection unanswered and is counted; a normal request from the same
    address is served.
    """
    with broker(tmp_path, 'trusted_proxies = ["127.0.0.9/32"]\n') as daemon:
        header = b"PROXY TCP4 10.9.8.7 10.0.0.1 40000 80\r\n"
        request = b"GET /healthz HTTP/1.0\r\n\r\n"
        assert b"" == await exchange(daemon, header + request, "127.0.0.5")
        status = await http_status(daemon)
        assert 1 == status["refused"]["proxy_untrusted"]
        assert 200 == status_code(await exchange(daemon, request, "127.0.0.5"))
        # The trusted proxy's clients are served under their own address.
        proxied = await exchange(daemon, header + request, "127.0.0.9")
        assert 200 == status_code(proxied)
