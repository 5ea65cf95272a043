"""
Hostile clients of an HTTPS sink on the real daemon (uvloop), judged by what a
well-behaved guest still gets: TCP connections that never send a ClientHello
count against ``max_connections_per_client`` from accept, the ones over it are
refused at once, the rest are cut at ``header_timeout``; failed handshakes are
counted in the sink's status.
"""

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import DEADLINE
from tests.integration.clients import poll_until
from tests.integration.daemon import Daemon
from tests.integration.test_hostile_http import (
    broker,
    closed_by_daemon,
    connect,
    hang_up,
    http_status,
    tcp_port,
    tracebacks,
)
from tests.tls_ca import CertFiles, TestCA

ATTACKER = "127.0.1.1"
PER_CLIENT = 4
SILENT = 10
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    directory = tmp_path / "pki"
    directory.mkdir()
    return TestCA(directory)


@pytest.fixture
def server(ca: TestCA) -> CertFiles:
    return ca.server_cert()


def tls_keys(server: CertFiles, extra: str = "") -> str:
    return f"""
        tls_cert = "{server.cert}"
        tls_key = "{server.key}"
        {extra}
        """


async def victim_is_served(
    daemon: Daemon, source: str, context: ssl.SSLContext, requests: int = 3
) -> None:
    """
    A guest from ``source`` completes ``requests`` HTTPS requests, each on a
    new connection (a new handshake).
    """
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    base = f"https://127.0.0.1:{tcp_port(daemon, 'http')}"
    for _ in range(requests):
        connector = aiohttp.TCPConnector(
            local_addr=(source, 0), ssl=context, force_close=True
        )
        async with (
            aiohttp.ClientSession(base, connector=connector, timeout=timeout) as s,
            s.get("/v1/entropy", params={"bytes": "32", "wait": "10"}) as resp,
        ):
            assert 200 == resp.status
            assert 32 == len(await resp.read())


async def test_silent_tls_connections_count_from_accept_while_a_guest_is_served(
    tmp_path: Path, ca: TestCA, server: CertFiles
) -> None:
    """
    A client opens more TCP connections to the HTTPS port than its share and
    never sends a ClientHello: the ones over the share are refused at once
    and counted, another guest's HTTPS requests are answered while the rest
    are still held, and those are closed at ``header_timeout``.
    """
    http = f"""
        header_timeout = "3 s"
        max_connections_per_client = {PER_CLIENT}
        """ + tls_keys(server)
    with broker(tmp_path, http) as daemon:
        held = [await connect(daemon, ATTACKER) for _ in range(SILENT)]
        status = await poll_until(
            lambda: http_status(daemon),
            lambda s: (
                s["refused"].get("max_connections_per_client", 0) >= SILENT - PER_CLIENT
            ),
        )
        assert SILENT - PER_CLIENT == status["refused"]["max_connections_per_client"]
        assert PER_CLIENT == status["connections"]
        for reader, _ in held[PER_CLIENT:]:
            assert b"" == await closed_by_daemon(reader)

        await victim_is_served(daemon, "127.0.0.2", ca.client_context())
        # Served before the silent ones' deadline: they are all still open.
        assert all(not reader.at_eof() for reader, _ in held[:PER_CLIENT])
        assert "header_timeout" not in (await http_status(daemon))["refused"]

        status = await poll_until(
            lambda: http_status(daemon),
            lambda s: s["refused"].get("header_timeout", 0) >= PER_CLIENT,
        )
        assert PER_CLIENT == status["refused"]["header_timeout"]
        for reader, _ in held[:PER_CLIENT]:
            assert b"" == await closed_by_daemon(reader)
        await poll_until(lambda: http_status(daemon), lambda s: 0 == s["connections"])
        for _, writer in held:
            await hang_up(writer)
        await victim_is_served(daemon, ATTACKER, ca.client_context(), requests=1)
    assert [] == tracebacks(daemon)


async def test_silent_tls_connections_fill_max_connections_and_no_more(
    tmp_path: Path, server: CertFiles
) -> None:
    """
    Silent TLS connections from many addresses count against
    ``max_connections`` at accept too; the ones over it are aborted.
    """
    http = """
        max_connections = 6
        header_timeout = "60 s"
        """ + tls_keys(server)
    with broker(tmp_path, http) as daemon:
        held = [await connect(daemon, f"127.0.1.{n}") for n in range(1, 10)]
        status = await poll_until(
            lambda: http_status(daemon),
            lambda s: s["refused"].get("max_connections", 0) >= 3,
        )
        assert (6, 3) == (status["connections"], status["refused"]["max_connections"])
        for reader, _ in held[6:]:
            assert b"" == await closed_by_daemon(reader)
        assert all(not reader.at_eof() for reader, _ in held[:6])
        for _, writer in held:
            await hang_up(writer)


async def handshake_fails(daemon: Daemon, context: ssl.SSLContext) -> bool:
    """
    Whether a TLS connection with ``context`` is refused, at the handshake or
    at the first read (TLS 1.3 reports a refused client certificate late).
    """
    try:
        async with asyncio.timeout(DEADLINE):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                tcp_port(daemon, "http"),
                ssl=context,
                server_hostname="127.0.0.1",
            )
    except (ssl.SSLError, ConnectionResetError):
        return True
    try:
        writer.write(HEALTHZ)
        async with asyncio.timeout(DEADLINE):
            answer = await reader.read()
    except (ssl.SSLError, ConnectionResetError):
        return True
    finally:
        writer.transport.abort()
    return not answer.startswith(b"HTTP/1.1 200")


async def test_failed_handshakes_are_counted(
    tmp_path: Path, ca: TestCA, server: CertFiles
) -> None:
    """
    Cleartext HTTP, no client certificate under ``required``, and a
    certificate from an unknown CA each fail the handshake and are counted as
    ``tls_handshake``; a guest with a good certificate is served.
    """
    stranger_directory = tmp_path / "stranger"
    stranger_directory.mkdir()
    stranger = TestCA(stranger_directory, "stranger")
    http = tls_keys(
        server, f'tls_client_ca = "{ca.ca_path}"\ntls_client_auth = "required"'
    )
    with broker(tmp_path, http) as daemon:
        reader, writer = await connect(daemon, ATTACKER)
        writer.write(HEALTHZ)
        assert not (await closed_by_daemon(reader)).startswith(b"HTTP/1.1 200")
        await hang_up(writer)
        assert await handshake_fails(daemon, ca.client_context())
        assert await handshake_fails(
            daemon, ca.client_context(stranger.client_cert("guest-1"))
        )
        status: dict[str, Any] = await poll_until(
            lambda: http_status(daemon),
            lambda s: s["refused"].get("tls_handshake", 0) >= 3,
        )
        assert 3 == status["refused"]["tls_handshake"]
        await victim_is_served(
            daemon, "127.0.0.2", ca.client_context(ca.client_cert("guest-7")), 1
        )
    assert [] == tracebacks(daemon)
