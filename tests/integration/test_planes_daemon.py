"""
The two HTTP planes through the real daemon: a guest on the tenant port reads
its own customer's figures and nothing else, while the operator port serves
status, metrics and the status page.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from broker.accounts import hash_token
from tests.helpers import DEADLINE
from tests.integration.clients import BrokerHttp, poll_until, running_daemon
from tests.integration.daemon import Daemon, default_config

ADMIN = "operator-secret"
ACME_IP = "127.0.0.2"
GLOBEX_IP = "127.0.0.3"

CUSTOMERS = f"""
    [[customers]]
    id = "acme"
    networks = ["{ACME_IP}/32"]
    quota = "1 MiB/day"

    [[customers]]
    id = "globex"
    networks = ["{GLOBEX_IP}/32"]
    """


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """
    A broker with two customers known by address and an admin token on its
    tenant-plane sink.
    """
    config = default_config(tmp_path / "state", extra=CUSTOMERS).replace(
        'plane = "tenant"\n',
        f'plane = "tenant"\nadmin_token = "{hash_token(ADMIN)}"\n',
        1,
    )
    with running_daemon(tmp_path, config) as running:
        yield running


@pytest.fixture
async def acme(daemon: Daemon) -> AsyncIterator[aiohttp.ClientSession]:
    """
    A guest of customer acme on the tenant port.
    """
    connector = aiohttp.TCPConnector(local_addr=(ACME_IP, 0))
    async with aiohttp.ClientSession(
        daemon.http_url,
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=DEADLINE),
    ) as session:
        yield session


async def draw(daemon: Daemon, source_ip: str, count: int) -> None:
    """
    Draw ``count`` bytes over HTTP from ``source_ip``, waiting for the pool.
    """
    connector = aiohttp.TCPConnector(local_addr=(source_ip, 0))
    async with (
        aiohttp.ClientSession(daemon.http_url, connector=connector) as session,
        session.get("/v1/entropy", params={"bytes": str(count), "wait": "20"}) as got,
    ):
        assert 200 == got.status, await got.text()
        assert count == len(await got.read())


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/metrics"),
        ("GET", "/"),
        ("POST", "/v1/admin/reload"),
        ("GET", "/v1/simulator/x/unplug"),
    ],
)
async def test_tenant_cannot_reach_operator_endpoints(
    acme: aiohttp.ClientSession, method: str, path: str
) -> None:
    """
    A guest on the tenant port gets 404 for metrics, the status page and the
    admin endpoints, the same answer as for a path that does not exist.
    """
    async with acme.request(method, path) as response:
        assert 404 == response.status
        assert {"error": f"no such path: {path!r}"} == await response.json()


async def test_tenant_status_shows_only_its_own_customer(
    daemon: Daemon, acme: aiohttp.ClientSession
) -> None:
    """
    After both customers drew entropy, acme's guest reads acme's usage and
    quota from /v1/status, and nothing of globex, its address or the broker's
    sources and sinks.
    """
    await draw(daemon, ACME_IP, 32)
    await draw(daemon, GLOBEX_IP, 48)
    async with acme.get("/v1/status") as response:
        assert 200 == response.status
        document = await response.json()
    assert {"health", "customer", "client"} == set(document)
    customer = document["customer"]
    assert ("acme", 32, 32) == (
        customer["id"],
        customer["bytes_served"],
        customer["quota"]["used"],
    )
    assert f"ip:{ACME_IP}" == document["client"]["key"]
    text = json.dumps(document)
    assert "globex" not in text
    assert GLOBEX_IP not in text


async def test_admin_token_opens_the_tenant_port(
    acme: aiohttp.ClientSession,
) -> None:
    """
    With the admin token the tenant port serves the full status and metrics.
    """
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with acme.get("/v1/status", headers=headers) as response:
        document = await response.json()
    assert {"acme", "globex"} <= set(document["accounts"]["customers"])
    async with acme.get("/metrics", headers=headers) as response:
        assert 200 == response.status


async def test_operator_port_serves_status_metrics_and_page(daemon: Daemon) -> None:
    """
    The operator port serves every customer's usage in status and metrics, and
    the status page.
    """
    await draw(daemon, GLOBEX_IP, 16)
    async with BrokerHttp(daemon) as http:
        status = await poll_until(
            http.status,
            lambda s: s["accounts"]["customers"]["globex"]["bytes_served"] == 16,
        )
        assert {"acme", "globex"} <= set(status["accounts"]["customers"])
        metrics = await http.metrics()
        assert 'customer="globex"' in metrics
    async with (
        aiohttp.ClientSession(daemon.operator_url) as session,
        session.get("/") as page,
    ):
        assert 200 == page.status
        assert "<html" in await page.text()


def test_tenant_plane_answers_haproxy_probe(daemon: Daemon) -> None:
    """
    haproxy's ``GET /healthz HTTP/1.0`` without Host is answered on the tenant
    port.
    """

    async def probe() -> bytes:
        host, port = daemon.http_url.removeprefix("http://").rsplit(":", 1)
        async with asyncio.timeout(DEADLINE):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            answer = await reader.read()
            writer.close()
            return answer

    answer = asyncio.run(probe())
    assert answer.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), answer[:40]
