"""
Two brokers sharing one real redis-server: one customer-wide quota across
both, the configured fallback while Redis is down, recovery when it returns.
"""

import asyncio
from pathlib import Path

import aiohttp

from tests.integration.daemon import Daemon, default_config, start_daemon
from tests.integration.test_customers_daemon import egd_from, nonblocking_total
from tests.redis_server import RedisServer, redis_accounts

FAST_SOURCE = """
    [[sources]]
    name = "getrandom"
    kind = "getrandom"
    """


def redis_config(tmp: Path, url: str, policy: str) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    customers = (
        redis_accounts(url, policy)
        + """

        [[customers]]
        id = "shared"
        networks = ["127.0.0.20/32"]
        quota = "16 KiB/day"

        [[customers]]
        id = "steady"
        networks = ["127.0.0.21/32"]
        rate = "64 KiB/s"
        """
    )
    return default_config(tmp / "state", FAST_SOURCE, customers)


async def backend_healthy(daemon: Daemon) -> tuple[bool, int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(daemon.operator_url + "/v1/status") as response:
            status = await response.json()
        async with session.get(daemon.http_url + "/healthz") as response:
            body = await response.text()
            code = response.status
    return bool(status["accounts"]["backend"]["healthy"]), code, body


async def wait_backend(daemon: Daemon, healthy: bool) -> tuple[int, str]:
    async with asyncio.timeout(60):
        while True:
            state, code, body = await backend_healthy(daemon)
            if state == healthy:
                return code, body
            await asyncio.sleep(0.05)


def test_two_brokers_enforce_one_quota(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """
    A customer drawing from both brokers gets its 16 KiB quota once, not twice.
    """
    first = start_daemon(
        tmp_path / "a", redis_config(tmp_path / "a", redis_server.url, "fail_open")
    )
    second = start_daemon(
        tmp_path / "b", redis_config(tmp_path / "b", redis_server.url, "fail_open")
    )

    async def run() -> list[int]:
        totals = []
        for _ in range(3):
            for daemon in (first, second):
                totals.append(await nonblocking_total(daemon, "127.0.0.20", limit=6000))
        return totals

    try:
        totals = asyncio.run(run())
    finally:
        first.stop()
        second.stop()
    print(f"shared quota: {totals} -> {sum(totals)} of 16384")
    assert 16384 == sum(totals)
    assert all(total > 0 for total in totals[:2])
    assert 0 == totals[-1]


def test_redis_outage_fail_open_then_recovers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """
    With fail_open, killing Redis keeps clients served under local limits,
    the broker reports it in status and /healthz, and it recovers when Redis
    comes back.
    """
    daemon = start_daemon(
        tmp_path / "a", redis_config(tmp_path / "a", redis_server.url, "fail_open")
    )

    async def blocking_read(ip: str, count: int) -> int:
        reader, writer = await egd_from(daemon, ip)
        try:
            writer.write(b"\x02\xff" * (count // 255))
            async with asyncio.timeout(60):
                return len(await reader.readexactly(255 * (count // 255)))
        finally:
            writer.close()

    async def run() -> tuple[int, int, str, int, int]:
        await wait_backend(daemon, True)
        before = await blocking_read("127.0.0.21", 2550)
        redis_server.kill()
        await blocking_read("127.0.0.21", 255)  # the call that notices
        code, body = await wait_backend(daemon, False)
        during = await blocking_read("127.0.0.21", 2550)
        redis_server.start()
        await wait_backend(daemon, True)
        after = await blocking_read("127.0.0.21", 2550)
        return before, during, body, code, after

    try:
        before, during, body, code, after = asyncio.run(run())
    finally:
        daemon.stop()
    assert 2550 == before == during == after
    assert 200 == code
    assert "degraded" in body
    assert "redis" in body
    events = [entry.get("event") for entry in daemon.logs()]
    assert "redis_unavailable" in events
    assert "redis_recovered" in events


def test_redis_outage_fail_closed_grants_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """
    With fail_closed, nothing is granted while Redis is down; service resumes
    when it returns.
    """
    daemon = start_daemon(
        tmp_path / "a", redis_config(tmp_path / "a", redis_server.url, "fail_closed")
    )

    async def run() -> tuple[int, int, int]:
        await wait_backend(daemon, True)
        before = await nonblocking_total(daemon, "127.0.0.21", limit=2000)
        redis_server.kill()
        await nonblocking_total(daemon, "127.0.0.21", limit=255)  # notices
        await wait_backend(daemon, False)
        during = await nonblocking_total(daemon, "127.0.0.21", limit=2000)
        redis_server.start()
        await wait_backend(daemon, True)
        after = await nonblocking_total(daemon, "127.0.0.21", limit=2000)
        return before, during, after

    try:
        before, during, after = asyncio.run(run())
    finally:
        daemon.stop()
    assert before >= 2000
    assert 0 == during
    assert after >= 2000
