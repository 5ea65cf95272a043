"""
``redis_min_replicas`` against real redis-servers on loopback: a quota write
returns only once a replica holds it, and a primary without enough replicas is
a Redis failure (the configured policy applies) rather than a silent risk.
"""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from broker.accounts import RedisBackend
from broker.accounts.backend import QuotaLimit
from broker.accounts.redis_link import RedisTarget
from tests.helpers import wait_until
from tests.redis_server import RedisServer

NOW = 1_714_564_800.0
QUOTA = QuotaLimit("day:2024-05-01", 10_000, NOW + 43_200)
# Outages here are refusals, which fail at once; a reply slowed by a busy
# machine must not count as one.
PATIENT = 10.0


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A redis-server with no replica, killed at teardown.
    """
    # Without this a replica's first sync waits 5 s for company.
    server = RedisServer(tmp_path / "primary", ["--repl-diskless-sync-delay", "0"])
    (tmp_path / "primary").mkdir()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def replica(tmp_path: Path, primary: RedisServer) -> Iterator[RedisServer]:
    """
    A replica of ``primary``, in sync when the test starts.
    """
    (tmp_path / "replica").mkdir()
    server = RedisServer(
        tmp_path / "replica",
        ["--replicaof", "127.0.0.1", str(primary.port)],
    )
    server.start()
    wait_until(lambda: _in_sync(server))
    yield server
    server.kill()


def _in_sync(server: RedisServer) -> bool:
    client = redis.Redis(port=server.port)
    try:
        info = client.info("replication")
        return info.get("master_link_status") == "up"
    finally:
        client.close()


def backend(
    server: RedisServer, policy: str, min_replicas: int, replica_timeout: float = 2.0
) -> RedisBackend:
    return RedisBackend(
        RedisTarget(
            url=server.url, min_replicas=min_replicas, replica_timeout=replica_timeout
        ),
        prefix="test:",
        policy=policy,  # type: ignore[arg-type]
        timeout=PATIENT,
        retry_interval=2.0,
    )


async def test_a_counted_byte_is_on_the_replica_when_take_returns(
    primary: RedisServer, replica: RedisServer
) -> None:
    """
    With redis_min_replicas = 1, the replica already holds the count the
    moment a grant returns: a failover right then would keep it.
    """
    broker = backend(primary, "fail_closed", 1)
    copy = aioredis.Redis(port=replica.port)
    try:
        await broker.start(NOW)
        charge = await broker.take("acme", 700, NOW, None, QUOTA)
        stored = await copy.get("test:{acme}:quota:" + QUOTA.period_key)
    finally:
        await broker.close()
        await copy.aclose()
    assert 700 == charge.granted
    assert b"700" == stored
    assert broker.healthy


async def test_too_few_replicas_is_a_redis_failure(primary: RedisServer) -> None:
    """
    A primary without the replicas redis_min_replicas asks for fails every
    quota write: fail_closed then grants nothing, and status says why.
    """
    broker = backend(primary, "fail_closed", 1, replica_timeout=0.2)
    try:
        await broker.start(NOW)
        charge = await broker.take("acme", 700, NOW, None, QUOTA)
        status = broker.status()
    finally:
        await broker.close()
    assert 0 == charge.granted
    assert not broker.healthy
    assert "ReplicasLagging" in str(status["last_error"])
    assert {"mode": "single"} == status["redis"]


async def test_recovery_waits_for_the_replicas(
    primary: RedisServer, tmp_path: Path
) -> None:
    """
    A broker that lost its replicas recovers only once enough are attached
    again, and then counts in Redis as before.
    """
    # Long enough for a busy machine's replica to answer; each wait without
    # a replica costs this much.
    broker = backend(primary, "fail_closed", 1, replica_timeout=1.0)
    try:
        await broker.start(NOW)
        assert 0 == (await broker.take("acme", 700, NOW, None, QUOTA)).granted
        assert not await broker.probe(NOW + 5)
        (tmp_path / "late").mkdir()
        late = RedisServer(
            tmp_path / "late", ["--replicaof", "127.0.0.1", str(primary.port)]
        )
        await asyncio.to_thread(late.start)
        try:
            await asyncio.to_thread(wait_until, lambda: _in_sync(late))
            assert await broker.probe(NOW + 10)
            charge = await broker.take("acme", 300, NOW + 10, None, QUOTA)
        finally:
            late.kill()
    finally:
        await broker.close()
    assert 300 == charge.granted
