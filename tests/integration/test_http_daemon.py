"""
HTTP against the real daemon: every endpoint, bad parameters, haproxy's probe.
"""

import asyncio
import base64
import binascii

import aiohttp
import pytest

from tests.integration.clients import poll_until
from tests.integration.daemon import Daemon

# Every wait below is for a condition; this only bounds how long a broken
# daemon can hang a test, so it is generous enough for a loaded CI machine.
DEADLINE = 30.0
# Three waits of this must fit in the per-test timeout (60 s) if all expire.
MAX_WAIT = "15"


async def test_entropy_formats(daemon: Daemon) -> None:
    """
    Raw, hex and base64 responses carry exactly the bytes asked for.
    """
    async with aiohttp.ClientSession(daemon.http_url) as session:
        async with session.get(
            "/v1/entropy", params={"bytes": "64", "wait": MAX_WAIT}
        ) as resp:
            assert 200 == resp.status
            assert "application/octet-stream" == resp.content_type
            assert 64 == len(await resp.read())
        async with session.get(
            "/v1/entropy", params={"bytes": "32", "format": "hex", "wait": MAX_WAIT}
        ) as resp:
            assert 200 == resp.status
            assert 32 == len(binascii.unhexlify((await resp.text()).strip()))
        async with session.get(
            "/v1/entropy",
            params={"bytes": "48", "format": "base64", "wait": MAX_WAIT},
        ) as resp:
            assert 200 == resp.status
            assert 48 == len(base64.b64decode((await resp.text()).strip()))


@pytest.mark.parametrize(
    ("query", "word"),
    [
        ({"bytes": "0"}, "bytes"),
        ({"bytes": "65537"}, "bytes"),
        ({"bytes": "many"}, "bytes"),
        ({}, "bytes"),
        ({"bytes": "8", "format": "octal"}, "format"),
        ({"bytes": "8", "wait": "-1"}, "wait"),
    ],
)
async def test_bad_parameters_get_400_with_a_reason(
    daemon: Daemon, query: dict[str, str], word: str
) -> None:
    """
    A bad query is refused with 400 and a JSON reason naming the parameter.
    """
    async with (
        aiohttp.ClientSession(daemon.http_url) as session,
        session.get("/v1/entropy", params=query) as resp,
    ):
        assert 400 == resp.status
        body = await resp.json()
        assert word in body["error"]


async def test_status_metrics_and_readiness(daemon: Daemon) -> None:
    """
    Status JSON, Prometheus metrics and readiness describe the running broker;
    status, metrics and the page are served by the operator-plane sink.
    """
    async with (
        aiohttp.ClientSession(daemon.http_url) as session,
        session.get("/readyz") as resp,
    ):
        assert 200 == resp.status
    async with aiohttp.ClientSession(daemon.operator_url) as session:
        async with session.get("/v1/status") as resp:
            status = await resp.json()
        assert {"getrandom"} == {source["name"] for source in status["sources"]}
        assert status["pool"]["capacity"] == 64 * 1024
        assert {"egd", "http", "operator"} == {s["name"] for s in status["sinks"]}
        async with session.get("/metrics") as resp:
            assert 200 == resp.status
            text = await resp.text()
        assert "ebroker_pool_level_bytes" in text
        async with session.get("/") as resp:
            assert 200 == resp.status
            assert "text/html" == resp.content_type


async def test_healthz_answers_haproxy_http10_probe(daemon: Daemon) -> None:
    """
    haproxy's `GET /healthz HTTP/1.0` without a Host header gets a 200.
    """
    host, port = daemon.http_url.removeprefix("http://").rsplit(":", 1)

    async def healthz(session: aiohttp.ClientSession) -> int:
        async with session.get("/healthz") as resp:
            return resp.status

    async with aiohttp.ClientSession(daemon.http_url) as session:
        # Wait for the pool to have filled, as a load balancer would.
        await poll_until(
            lambda: healthz(session), lambda status: status == 200, timeout=DEADLINE
        )
    async with asyncio.timeout(DEADLINE):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert response.startswith(b"HTTP/1.0 200") or response.startswith(b"HTTP/1.1 200")
