"""
Quota counts that survive what kills them: the real daemon SIGKILLed right
after a customer spent (memory backend), and a real redis-server restarted
empty under the brokers (Redis backend).
"""

import asyncio
import re
import time
from pathlib import Path

import redis.asyncio as aioredis

from broker.accounts import period_key
from broker.accounts.reservations import reservation
from tests.integration.clients import BrokerHttp, poll_until
from tests.integration.daemon import Daemon, default_config, start_daemon
from tests.integration.test_customers_daemon import egd_from, nonblocking_total
from tests.redis_server import RedisServer, redis_accounts

FAST_SOURCE = """
    [[sources]]
    name = "getrandom"
    kind = "getrandom"
    """
QUOTA = 32 * 1024
SPENT = 12_000


async def wait_pool(daemon: Daemon, level: int) -> None:
    """
    Wait until the pool holds ``level`` bytes, so a non-blocking draw ends
    on the quota, not on an empty pool.
    """
    async with BrokerHttp(daemon) as broker:
        await poll_until(broker.status, lambda s: s["pool"]["level"] >= level)


async def quota_seen(daemon: Daemon, customer: str) -> tuple[int, float]:
    """
    ``used`` from /v1/status and the remaining-bytes metric for ``customer``.
    """
    async with BrokerHttp(daemon) as broker:
        status = await broker.status()
        metrics = await broker.metrics()
    used = int(status["accounts"]["customers"][customer]["quota"]["used"])
    pattern = (
        r'^ebroker_customer_quota_remaining_bytes\{[^}]*customer="'
        + re.escape(customer)
        + r'"[^}]*\} (\S+)$'
    )
    found = re.search(pattern, metrics, re.MULTILINE)
    assert found is not None, metrics
    return used, float(found.group(1))


def test_sigkill_after_spending_does_not_hand_quota_out_again(
    tmp_path: Path,
) -> None:
    """
    A broker killed with SIGKILL right after a customer spent part of its
    quota (well within persist_interval) restarts counting that spending:
    status and metrics show it from the first answer, and the customer gets
    at most the rest, losing at most one reservation.
    """
    customers = f"""
        [accounts]
        persist_interval = "1 h"

        [[customers]]
        id = "metered"
        networks = ["127.0.0.30/32"]
        quota = "{QUOTA} B/day"
        """
    config = default_config(tmp_path / "state", FAST_SOURCE, customers)
    daemon = start_daemon(tmp_path, config)
    try:
        first = asyncio.run(nonblocking_total(daemon, "127.0.0.30", limit=SPENT))
    finally:
        daemon.process.kill()
        daemon.process.wait()
    # A killed broker leaves its runtime files; start_daemon would read the
    # dead one's ports from this one.
    (daemon.state_dir / "listeners.json").unlink()
    daemon = start_daemon(tmp_path, config)

    async def after_restart() -> tuple[int, float, int]:
        used, remaining = await quota_seen(daemon, "metered")
        await wait_pool(daemon, QUOTA)
        second = await nonblocking_total(daemon, "127.0.0.30")
        return used, remaining, second

    try:
        used, remaining, second = asyncio.run(after_restart())
    finally:
        daemon.stop()
    bound = reservation(QUOTA)
    print(f"sigkill: {first} B before, {second} B after, {used} B counted")
    assert first >= SPENT
    assert first <= used <= first + bound
    assert QUOTA - used == remaining
    assert first + second <= QUOTA
    assert second >= QUOTA - first - bound


def redis_config(tmp: Path, url: str, policy: str) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    customers = (
        redis_accounts(url, policy)
        + """

        [[customers]]
        id = "drawn"
        networks = ["127.0.0.31/32"]
        quota = "16 KiB/day"

        [[customers]]
        id = "idle"
        networks = ["127.0.0.32/32"]
        quota = "16 KiB/day"

        [[customers]]
        id = "steady"
        networks = ["127.0.0.33/32"]
        rate = "64 KiB/s"
        """
    )
    return default_config(tmp / "state", FAST_SOURCE, customers)


async def backend_healthy(daemon: Daemon, healthy: bool) -> None:
    """
    Wait until the daemon reports its Redis backend (un)healthy.
    """
    async with BrokerHttp(daemon) as broker:
        await poll_until(
            broker.status,
            lambda s: s["accounts"]["backend"]["healthy"] == healthy,
        )


async def redis_counts(server: RedisServer, customers: list[str]) -> list[int]:
    """
    Today's quota counters as Redis holds them.
    """
    today = period_key("day", time.time())
    client = aioredis.Redis(port=server.port)
    try:
        values = [
            await client.get(f"ebroker:{{{customer}}}:quota:{today}")
            for customer in customers
        ]
    finally:
        await client.aclose()
    return [int(value or 0) for value in values]


def test_redis_restarted_empty_gets_every_count_back_fail_closed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """
    Under fail_closed, Redis killed and restarted empty: the broker writes
    back every customer's count, including one that did not draw since
    (nobody can draw during a fail_closed outage), the quota is not handed
    out again, and once recovered the broker stays connected while it
    serves several seconds of rate-limited reads.
    """
    daemon = start_daemon(
        tmp_path / "a", redis_config(tmp_path / "a", redis_server.url, "fail_closed")
    )

    async def blocking_read(ip: str, count: int) -> int:
        reader, writer = await egd_from(daemon, ip)
        try:
            writer.write(b"\x02\xff" * (count // 255))
            async with asyncio.timeout(120):
                return len(await reader.readexactly(255 * (count // 255)))
        finally:
            writer.close()

    async def run() -> tuple[list[int], list[int], int, int]:
        await backend_healthy(daemon, True)
        drawn = await nonblocking_total(daemon, "127.0.0.31", limit=6000)
        idle = await nonblocking_total(daemon, "127.0.0.32", limit=4000)
        before = await redis_counts(redis_server, ["drawn", "idle"])
        redis_server.kill()
        await backend_healthy(daemon, False)
        redis_server.start()
        await backend_healthy(daemon, True)
        restored = await redis_counts(redis_server, ["drawn", "idle"])
        # 160 KiB at 64 KiB/s: dozens of probe rounds and retry intervals.
        steady = await blocking_read("127.0.0.33", 160 * 1024)
        more = await nonblocking_total(daemon, "127.0.0.31")
        assert [drawn, idle] == before
        return before, restored, steady, more

    try:
        before, restored, steady, more = asyncio.run(run())
    finally:
        daemon.stop()
    assert before == restored
    assert 255 * (160 * 1024 // 255) == steady
    assert 16 * 1024 == before[0] + more
    events = [entry.get("event") for entry in daemon.logs()]
    assert 1 == events.count("redis_unavailable")
    assert "redis_restored" in events
