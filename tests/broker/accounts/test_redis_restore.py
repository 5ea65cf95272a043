"""
Redis that loses its data while brokers run (here FLUSHALL on a real
redis-server): every take checks the customer's epoch atomically, and restores
are additive and idempotent per epoch. What may still be over-granted is only
what the granting broker never saw and the broker that saw it has not yet
restored; the counter then holds every byte granted, so nothing is hidden and
no more is granted past the quota.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from broker.accounts import RedisBackend
from broker.accounts.backend import QuotaLimit
from tests.broker.accounts.test_redis_backend import backend, flush
from tests.redis_server import RedisServer

NOW = 1_714_564_800.0
QUOTA = QuotaLimit("day:2024-05-01", 10_000, NOW + 43_200)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A running redis-server, killed at teardown.
    """
    instance = RedisServer(tmp_path)
    instance.start()
    yield instance
    instance.kill()


async def started(server: RedisServer) -> RedisBackend:
    """
    One broker, started (it has read the fleet epoch).
    """
    broker = backend(server)
    await broker.start(NOW)
    return broker


async def test_unseen_charges_are_the_only_over_grant(server: RedisServer) -> None:
    """
    A spends the whole quota, Redis is emptied, and B, which never saw the
    customer, grants it again: B cannot know A's charges. A's restore adds its
    count on top of B's, so the counter holds all 20,000 granted bytes and
    neither broker grants more.
    """
    a, b = await started(server), await started(server)
    assert 10_000 == (await a.take("c", 10_000, NOW, None, QUOTA)).granted
    await flush(server)
    unseen = 10_000  # A's charges, which B never saw
    assert unseen == (await b.take("c", 10_000, NOW + 1, None, QUOTA)).granted
    assert await a.probe(NOW + 2)
    assert 1 == a.restores
    assert QUOTA.limit + unseen == await b.usage("c", QUOTA.period_key)
    assert 0 == (await a.take("c", 10_000, NOW + 3, None, QUOTA)).granted
    assert 0 == (await b.take("c", 10_000, NOW + 3, None, QUOTA)).granted
    for each in (a, b):
        await each.close()


async def test_a_broker_that_restores_first_closes_the_gap(
    server: RedisServer,
) -> None:
    """
    When the broker that saw the charges notices the loss first (its probe),
    the other broker, which never saw them, grants nothing past the quota.
    """
    a, b = await started(server), await started(server)
    assert 10_000 == (await a.take("c", 10_000, NOW, None, QUOTA)).granted
    await flush(server)
    assert await a.probe(NOW + 1)
    assert 0 == (await b.take("c", 10_000, NOW + 2, None, QUOTA)).granted
    assert 10_000 == await b.usage("c", QUOTA.period_key)
    for each in (a, b):
        await each.close()


async def test_stale_restore_is_topped_up_by_the_broker_that_knew_more(
    server: RedisServer,
) -> None:
    """
    A knows 1,000, B knows 9,000; after the loss A restores 1,000 and grants
    9,000 (B's 8,000 it never saw are the over-grant). B's restore adds the
    8,000 it knew beyond A's, so the counter holds all 18,000 granted bytes
    (``max`` would have left 10,000 and hidden 8,000) and B grants nothing.
    """
    quota = QuotaLimit("day:x", 10_000, NOW + 43_200)
    a, b = await started(server), await started(server)
    assert 1000 == (await a.take("d", 1000, NOW, None, quota)).granted
    assert 9000 == (await b.take("d", 8000, NOW, None, quota)).quota_used
    await flush(server)
    assert 9000 == (await a.take("d", 10_000, NOW + 1, None, quota)).granted
    assert 1 == a.restores
    unseen = 8000  # B's charges, which A never saw
    late = await b.take("d", 10_000, NOW + 1, None, quota)
    assert (0, quota.limit + unseen) == (late.granted, late.quota_used)
    assert 1 == b.restores
    assert 1000 + 8000 + 9000 == await a.usage("d", quota.period_key)
    for each in (a, b):
        await each.close()


async def test_charges_since_the_loss_stay_on_top_of_a_restore(
    server: RedisServer,
) -> None:
    """
    Charges made after the loss add to the restored count: A knows 3,000 and
    charges 1,000 after the loss; B, which knew 5,000, then brings the
    counter to 6,000, not ``max(4000, 5000)``.
    """
    a, b = await started(server), await started(server)
    await a.take("c", 3000, NOW, None, QUOTA)
    await b.take("c", 2000, NOW, None, QUOTA)
    await flush(server)
    assert 4000 == (await a.take("c", 1000, NOW + 1, None, QUOTA)).quota_used
    assert await b.probe(NOW + 2)
    assert 6000 == await a.usage("c", QUOTA.period_key)
    for each in (a, b):
        await each.close()


async def test_restore_is_idempotent_per_epoch(server: RedisServer) -> None:
    """
    Two brokers that know the same count restore it once between them, and a
    broker's later probes and reads in the same epoch add nothing.
    """
    a, b = await started(server), await started(server)
    await a.take("c", 4000, NOW, None, QUOTA)
    assert 4000 == await b.usage("c", QUOTA.period_key, QUOTA.expires_at)
    await flush(server)
    for step in range(3):
        assert await a.probe(NOW + 1 + step)
        assert await b.probe(NOW + 1 + step)
        assert 4000 == await a.usage("c", QUOTA.period_key)
        assert 4000 == await b.usage("c", QUOTA.period_key)
    assert (1, 1) == (a.restores, b.restores)
    for each in (a, b):
        await each.close()


async def test_a_new_customer_or_period_starts_at_zero_without_a_restore(
    server: RedisServer,
) -> None:
    """
    A counter missing while the customer's epoch matches is a new period; a
    customer new to a broker is no loss either: both count from zero and
    nothing is logged as restored.
    """
    a, b = await started(server), await started(server)
    next_day = QuotaLimit("day:2024-05-02", 10_000, NOW + 86_400 + 43_200)
    with capture_logs() as logs:
        await a.take("c", 10_000, NOW, None, QUOTA)
        assert 10_000 == (await a.take("c", 10_000, NOW, None, next_day)).granted
        assert 10_000 == await b.usage("c", QUOTA.period_key)
        assert 0 == await b.usage("new", QUOTA.period_key)
    assert [] == [entry for entry in logs if entry["event"] == "redis_restored"]
    assert (0, 0) == (a.restores, b.restores)
    for each in (a, b):
        await each.close()


async def test_every_customer_key_shares_the_customer_hash_tag(
    server: RedisServer,
) -> None:
    """
    Each script touches one customer's keys only, all in one Cluster slot:
    every key but the fleet epoch carries the ``{customer}`` hash tag.
    """
    a = await started(server)
    await a.take("c", 3000, NOW, None, QUOTA)
    await flush(server)
    await a.take("c", 1000, NOW + 1, None, QUOTA)
    await a.give_back("c", 500, None, QUOTA)
    client = aioredis.Redis(port=server.port, decode_responses=True)
    keys = sorted(await client.keys("test:*"))
    await client.aclose()
    assert [
        "test:{c}:epoch",
        "test:{c}:quota:day:2024-05-01",
        "test:{c}:restored:day:2024-05-01",
    ] == keys
    assert 3500 == await a.usage("c", QUOTA.period_key)
    await a.close()
