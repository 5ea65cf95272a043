"""
Who the EGD server lets in, on loopback: refusals counted by reason and logged
a few times whatever their number, PROXY headers from trusted proxies only, and
per-client caps on the real (proxied) address.
"""

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.pool import EntropyPool
from sinks.egd import connection as egd_connection
from sinks.egd.config import EgdSinkConfig
from sinks.egd.server import EgdSink
from tests.helpers import DEADLINE, eventually
from tests.sinks.egd.doubles import View

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Start = Callable[..., AsyncIterator[EgdSink]]


def proxy_v1(client: str, port: int = 40000) -> bytes:
    """
    A PROXY v1 header naming ``client`` as the source.
    """
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 8888\r\n".encode()


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    sinks: list[EgdSink] = []

    async def start(**settings: Any) -> EgdSink:
        pool = EntropyPool(1 << 20)
        pool.add(os.urandom(1 << 16), 8)
        config = EgdSinkConfig(kind="egd", listen=["tcp://127.0.0.1:0"], **settings)
        sink = EgdSink(config, View(tmp_path, pool))
        await sink.start()
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        await sink.shutdown(0)


def client_keys(sink: EgdSink) -> set[str]:
    """
    The accounts' client keys (``ip:ADDRESS``) seen so far.
    """
    customers = sink.accounts.snapshot()["customers"]
    return {key for customer in customers.values() for key in customer["clients"]}


async def connect(sink: EgdSink) -> Streams:
    host, port = sink.bound_addresses()[0].removeprefix("tcp://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_refusals_are_counted_all_and_logged_once(started: Any) -> None:
    """
    Twenty connections past the per-client cap are all counted under their
    reason, and logged as one line.
    """
    sink = await started(max_connections_per_client=1)
    held = await connect(sink)
    await eventually(lambda: 1 == sink.status().connections_total)
    with capture_logs() as logs:
        for _ in range(20):
            reader, writer = await connect(sink)
            async with asyncio.timeout(DEADLINE):
                assert b"" == await reader.read(1)
            writer.close()
    assert {"max_connections_per_client": 20} == sink.status().refused
    lines = [entry for entry in logs if entry["event"] == "connection_refused"]
    assert 1 == len(lines)
    held[1].close()


async def test_malformed_request_is_counted_as_closed_not_refused(
    started: Any,
) -> None:
    """
    An unknown command closes the connection after earlier replies; the
    connection was served, so it counts in connections_total and in
    ``closed["malformed_request"]``, not as a refusal.
    """
    sink = await started()
    reader, writer = await connect(sink)
    writer.write(b"\x02\x08\xff")
    async with asyncio.timeout(DEADLINE):
        assert 8 == len(await reader.readexactly(8))
        assert b"" == await reader.read(1)
    await eventually(lambda: not sink.connections())
    assert {} == sink.status().refused
    assert {"malformed_request": 1} == sink.closed
    assert 1 == sink.status().connections_total
    writer.close()


async def test_untrusted_proxy_header_closes_the_connection(started: Any) -> None:
    """
    A PROXY header from an address not in trusted_proxies closes the
    connection unanswered. The peer was identified (and counted) on connect,
    so the close counts in ``closed["proxy_untrusted"]``, not as a refusal.
    """
    sink = await started()
    reader, writer = await connect(sink)
    writer.write(proxy_v1("10.1.2.3") + b"\x02\x10")
    async with asyncio.timeout(DEADLINE):
        assert b"" == await reader.read(1)
    await eventually(lambda: not sink.connections())
    assert {} == sink.status().refused
    assert {"proxy_untrusted": 1} == sink.closed
    assert 1 == sink.status().connections_total
    writer.close()


async def test_trusted_proxy_names_the_client(started: Any) -> None:
    """
    Behind a trusted proxy each client is identified by the header's address,
    and the per-client cap applies to that address, not the proxy's.
    """
    sink = await started(trusted_proxies=["127.0.0.0/8"], max_connections_per_client=1)
    first = await connect(sink)
    first[1].write(proxy_v1("10.1.2.3") + b"\x02\x10")
    second = await connect(sink)
    second[1].write(proxy_v1("10.1.2.4") + b"\x02\x10")
    async with asyncio.timeout(DEADLINE):
        assert 16 == len(await first[0].readexactly(16))
        assert 16 == len(await second[0].readexactly(16))
    same = await connect(sink)
    same[1].write(proxy_v1("10.1.2.3", 40001))
    async with asyncio.timeout(DEADLINE):
        assert b"" == await same[0].read(1)
    assert {"max_connections_per_client": 1} == sink.status().refused
    assert {"ip:10.1.2.3", "ip:10.1.2.4"} <= client_keys(sink)
    for _, writer in (first, second, same):
        writer.close()


async def test_trusted_proxy_speaking_for_itself_is_served_as_itself(
    started: Any,
) -> None:
    """
    A trusted proxy's own connection (a health check) with a header naming
    no client is served under the proxy's address.
    """
    sink = await started(trusted_proxies=["127.0.0.0/8"])
    reader, writer = await connect(sink)
    writer.write(b"PROXY UNKNOWN\r\n\x02\x10")
    async with asyncio.timeout(DEADLINE):
        assert 16 == len(await reader.readexactly(16))
    assert "ip:127.0.0.1" in client_keys(sink)
    writer.close()


async def test_silent_trusted_proxy_is_closed_after_the_header_timeout(
    started: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A trusted proxy that sends nothing does not hold a slot past the header
    timeout; the refusal is counted as ``header_timeout``.
    """
    monkeypatch.setattr(egd_connection, "HEADER_TIMEOUT", 0.01)
    sink = await started(trusted_proxies=["127.0.0.0/8"])
    reader, writer = await connect(sink)
    async with asyncio.timeout(DEADLINE):
        assert b"" == await reader.read(1)
    assert {"header_timeout": 1} == sink.status().refused
    assert 0 == sink.status().connections_total
    writer.close()


async def test_silent_untrusted_client_is_never_timed_out(
    started: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A client that is not a proxy is identified at once, so it may stay silent
    (ekeyd-egd-linux does for life) and still be served later.
    """
    monkeypatch.setattr(egd_connection, "HEADER_TIMEOUT", 0.01)
    sink = await started()
    reader, writer = await connect(sink)
    await eventually(lambda: 1 == sink.status().connections_total)
    loop = asyncio.get_running_loop()
    passed = loop.create_future()
    loop.call_later(0.05, passed.set_result, None)
    await passed
    writer.write(b"\x02\x10")
    async with asyncio.timeout(DEADLINE):
        assert 16 == len(await reader.readexactly(16))
    assert {} == sink.status().refused
    writer.close()


async def test_refusals_while_shutting_down_have_their_own_reason(
    started: Any,
) -> None:
    """
    Once the sink stops admitting, a connection is refused as
    ``shutting_down``, not as ``max_connections``.
    """
    sink = await started()
    sink.pre_shutdown()
    connection = egd_connection.EgdConnection(sink)
    assert "shutting_down" == sink.admit(connection)
    assert [] == sink.connections()
