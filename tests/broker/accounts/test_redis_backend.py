"""
Redis backend against a real redis-server on loopback: brokers share one quota
and one customer bucket atomically, an outage follows the configured policy,
and usage counted locally during it is pushed back when Redis returns.
"""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker.accounts import (
    Accounts,
    AccountsConfig,
    Client,
    CustomerConfig,
    Peer,
    RedisBackend,
)
from broker.accounts.backend import BucketLimit, QuotaLimit
from tests.fakeclock import FakeClock
from tests.helpers import free_port
from tests.redis_server import RedisServer

NOW = 1_714_564_800.0
QUOTA = QuotaLimit("day:2024-05-01", 10_000, NOW + 43_200)
# Outages in these tests are a killed server or a cut connection, which fail at
# once; a reply merely slowed by a busy machine must not count as one.
PATIENT = 10.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A running redis-server, killed at teardown.
    """
    instance = RedisServer(tmp_path)
    instance.start()
    yield instance
    instance.kill()


async def flush(server: RedisServer) -> None:
    """
    Empty Redis behind the brokers' backs, leaving their connections open.
    """
    client = aioredis.Redis(port=server.port)
    await client.flushall()
    await client.aclose()


def healthy(backend: RedisBackend) -> bool:
    """
    Read the health flag afresh (mypy would keep an earlier narrowing of it).
    """
    return backend.healthy


def backend(server: RedisServer, policy: str = "fail_open") -> RedisBackend:
    """
    One broker's view of the shared Redis.
    """
    return RedisBackend(
        server.url,
        prefix="test:",
        policy=policy,  # type: ignore[arg-type]
        timeout=PATIENT,
        retry_interval=2.0,
    )


async def test_two_brokers_share_one_quota(server: RedisServer) -> None:
    """
    Concurrent takes from two brokers never exceed the quota together.
    """
    brokers = [backend(server), backend(server)]
    charges = await asyncio.gather(
        *(
            brokers[i % 2].take("acme", 700, NOW + i * 0.001, None, QUOTA)
            for i in range(40)
        )
    )
    assert 10_000 == sum(charge.granted for charge in charges)
    assert 10_000 == await brokers[1].usage("acme", QUOTA.period_key)
    assert 0 == await brokers[0].usage("other", QUOTA.period_key)
    for each in brokers:
        await each.close()


async def test_two_brokers_share_one_customer_bucket(server: RedisServer) -> None:
    """
    The customer-wide bucket is one bucket, whichever broker draws from it, and
    it refills from the time the caller passes in.
    """
    a, b = backend(server), backend(server)
    limit = BucketLimit(100.0, 1000)
    assert 600 == (await a.take("acme", 600, NOW, limit, None)).granted
    second = await b.take("acme", 600, NOW, limit, None)
    assert (400, 0.0) == (second.granted, second.bucket_tokens)
    assert 50 == (await a.take("acme", 600, NOW + 0.5, limit, None)).granted
    # A broker whose clock lags behind mints nothing.
    assert 0 == (await b.take("acme", 600, NOW - 10, limit, None)).granted
    await a.close()
    await b.close()


async def test_charge_refund_usage(server: RedisServer) -> None:
    """
    The quota-only operations keep one counter and never go below zero.
    """
    broker = backend(server)
    assert (600, 600) == await broker.charge("a", "day:x", 600, 1000, NOW + 60)
    assert (400, 1000) == await broker.charge("a", "day:x", 600, 1000, NOW + 60)
    assert 700 == await broker.refund("a", "day:x", 300)
    assert 0 == await broker.refund("a", "day:x", 5000)
    assert 0 == await broker.usage("a", "day:x")
    await broker.close()


async def test_fail_open_serves_locally_then_resyncs(server: RedisServer) -> None:
    """
    With Redis killed, fail_open serves within the quota left as last seen,
    reports unhealthy, and after a restart (empty Redis) pushes the local
    usage so the quota stays spent for every broker.
    """
    broker, other = backend(server), backend(server)
    assert 4000 == (await broker.take("acme", 4000, NOW, None, QUOTA)).granted
    server.kill()
    during = await broker.take("acme", 5000, NOW + 1, None, QUOTA)
    assert 5000 == during.granted
    assert not broker.healthy
    status = broker.status()
    assert (False, "fail_open", 1) == (
        status["healthy"],
        status["policy"],
        status["pending_resync"],
    )
    # Local limits still apply: only 1000 bytes of the quota are left.
    assert 1000 == (await broker.take("acme", 5000, NOW + 1.5, None, QUOTA)).granted
    server.start()
    assert not await broker.probe(NOW + 1.9)  # retry interval not yet passed
    assert await broker.probe(NOW + 3.1)
    assert healthy(broker)
    assert 0 == broker.status()["pending_resync"]
    assert 10_000 == await other.usage("acme", QUOTA.period_key)
    assert 0 == (await other.take("acme", 1, NOW + 4, None, QUOTA)).granted
    await broker.close()
    await other.close()


class Partition:
    """
    A TCP forwarder to Redis that can be cut, like a network partition that
    isolates one broker while Redis keeps running.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port or 0
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass  # the other side went away: the partition was cut
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()


async def test_fail_open_resync_adds_to_what_redis_kept(server: RedisServer) -> None:
    """
    If Redis kept its data and another broker charged meanwhile, the cut-off
    broker's local charges are added on top, not written over them.
    """
    partition = Partition(server.port)
    await partition.open()
    cut_off = RedisBackend(
        f"redis://127.0.0.1:{partition.port}/0",
        prefix="test:",
        timeout=PATIENT,
        retry_interval=2.0,
    )
    other = backend(server)
    await cut_off.take("acme", 1000, NOW, None, QUOTA)
    await partition.cut()
    assert 500 == (await cut_off.take("acme", 500, NOW + 1, None, QUOTA)).granted
    assert not cut_off.healthy
    assert 2000 == (await other.take("acme", 2000, NOW + 1, None, QUOTA)).granted
    await partition.open()
    charge = await cut_off.take("acme", 1, NOW + 5, None, QUOTA)
    assert healthy(cut_off)
    assert 3501 == charge.quota_used
    await cut_off.close()
    await other.close()
    await partition.cut()


async def test_fail_closed_grants_nothing_until_redis_returns(
    server: RedisServer,
) -> None:
    """
    fail_closed refuses while Redis is away and serves again once it is back.
    """
    broker = backend(server, "fail_closed")
    server.kill()
    refused = await broker.take("acme", 100, NOW, None, QUOTA)
    assert (0, False) == (refused.granted, refused.available)
    assert not broker.healthy
    server.start()
    back = await broker.take("acme", 100, NOW + 2.5, None, QUOTA)
    assert (100, True) == (back.granted, back.available)
    assert healthy(broker)
    await broker.close()


async def test_unreachable_at_start_is_not_fatal(tmp_path: Path) -> None:
    """
    A broker started while Redis is down comes up unhealthy and keeps serving.
    """
    broker = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", retry_interval=1)
    await broker.start(NOW)
    assert not broker.healthy
    assert 10 == (await broker.take("acme", 10, NOW, None, QUOTA)).granted
    await broker.close()


def redis_accounts(server: RedisServer, policy: str) -> Accounts:
    """
    An Accounts facade on the shared Redis backend.
    """
    config = AccountsConfig(
        backend="redis",
        redis_url=server.url,
        redis_prefix="acc:",
        on_redis_failure=policy,
        redis_timeout=PATIENT,
        redis_retry_interval=1.0,
    )
    customers = [CustomerConfig(id="default", quota="10 KiB/day")]
    return Accounts(config, customers, clock=FakeClock(NOW))


async def test_accounts_share_quota_and_report_outage(server: RedisServer) -> None:
    """
    Two brokers' facades share the quota; under fail_closed an outage shows as
    limit "unavailable" and an unhealthy backend in the snapshot.
    """
    first, second = (
        redis_accounts(server, "fail_closed"),
        redis_accounts(server, "fail_closed"),
    )
    await first.start()
    await second.start()
    vm1 = first.identify(Peer("tcp", ip="192.0.2.1"))
    vm2 = second.identify(Peer("tcp", ip="192.0.2.2"))
    assert isinstance(vm1, Client)
    assert isinstance(vm2, Client)
    assert 8192 == (await first.grant(vm1, 8192, NOW)).granted
    late = await second.grant(vm2, 8192, NOW)
    assert (2048, "quota") == (late.granted, late.limit)
    server.kill()
    refused = await first.grant(vm1, 10, NOW + 86_400)
    assert (0, "unavailable") == (refused.granted, refused.limit)
    assert 1.0 == refused.retry_after
    assert not first.snapshot(NOW)["backend"]["healthy"]
    await first.close()
    await second.close()


async def test_redis_restarted_empty_gets_every_known_count_back(
    server: RedisServer,
) -> None:
    """
    After Redis restarts empty, the next probe writes back every count the
    broker knows, including a customer it only read (never charged) and one
    that did not draw during the outage; counts another broker raised since
    are kept.
    """
    broker, other = backend(server), backend(server)
    await broker.start(NOW)
    await other.start(NOW)
    await broker.take("drawn", 3000, NOW, None, QUOTA)
    await other.take("idle", 2000, NOW, None, QUOTA)
    await other.take("raised", 100, NOW, None, QUOTA)
    # Housekeeping reads every customer's use; that is how `broker` knows
    # "idle", which it never served.
    assert 2000 == await broker.usage("idle", QUOTA.period_key, QUOTA.expires_at)
    assert 100 == await broker.usage("raised", QUOTA.period_key, QUOTA.expires_at)
    server.kill()
    server.start()
    # Each broker's first probe finds its connection gone; the next one, a
    # retry interval later, reconnects and finds the epoch marker changed.
    assert not await other.probe(NOW + 1)
    assert await other.probe(NOW + 4)
    # A broker that noticed first raised one counter past what `broker` knows.
    assert 600 == (await other.take("raised", 500, NOW + 4, None, QUOTA)).quota_used
    assert not await broker.probe(NOW + 4)
    assert await broker.probe(NOW + 7)
    assert 1 == broker.restores
    fresh = backend(server)
    assert 3000 == await fresh.usage("drawn", QUOTA.period_key)
    assert 2000 == await fresh.usage("idle", QUOTA.period_key)
    assert 600 == await fresh.usage("raised", QUOTA.period_key)
    for each in (broker, other, fresh):
        await each.close()


async def test_take_never_grants_against_an_emptied_counter(
    server: RedisServer,
) -> None:
    """
    Data lost with no outage to notice (here FLUSHALL; a restart between
    two commands on a fresh connection looks the same) is caught by the take
    itself: the counter is restored before the charge, so the quota is not
    handed out again.
    """
    broker = backend(server)
    await broker.start(NOW)
    assert 9000 == (await broker.take("acme", 9000, NOW, None, QUOTA)).granted
    await flush(server)
    charge = await broker.take("acme", 5000, NOW + 1, None, QUOTA)
    assert (1000, 10_000) == (charge.granted, charge.quota_used)
    assert healthy(broker)
    await broker.close()


async def test_usage_after_an_unnoticed_restart_reports_the_known_count(
    server: RedisServer,
) -> None:
    """
    Status read from an emptied Redis shows the restored count, not zero.
    """
    broker = backend(server)
    await broker.start(NOW)
    await broker.take("acme", 4000, NOW, None, QUOTA)
    await flush(server)
    assert 4000 == await broker.usage("acme", QUOTA.period_key, QUOTA.expires_at)
    await broker.close()


async def test_fail_closed_stays_up_after_recovery(server: RedisServer) -> None:
    """
    Under fail_closed, once Redis is back the broker keeps serving through
    several retry intervals of probes and takes: no second outage.
    """
    broker = backend(server, "fail_closed")
    await broker.start(NOW)
    await broker.take("acme", 100, NOW, None, QUOTA)
    server.kill()
    assert not (await broker.take("acme", 100, NOW + 0.5, None, QUOTA)).available
    server.start()
    for step in range(1, 40):
        now = NOW + 2.5 + step * 0.25
        assert await broker.probe(now)
        charge = await broker.take("acme", 10, now, None, QUOTA)
        assert (10, True) == (charge.granted, charge.available)
    assert 1 == broker.outages
    assert 100 + 390 == await broker.usage("acme", QUOTA.period_key)
    await broker.close()
