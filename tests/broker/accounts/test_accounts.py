"""
The Accounts facade: identification, grants under client/customer rates and
quotas, refunds, live reload, persistence and the status snapshot.

Waits run on a `FakeClock`, so each test states exactly how long a wait lasts.
"""

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
import structlog

from broker.accounts import (
    AccessDenied,
    Accounts,
    AccountsConfig,
    BucketLimit,
    Client,
    CustomerConfig,
    Denied,
    MemoryBackend,
    Peer,
    WeightedWaitQueue,
    hash_token,
    period_bounds,
    period_key,
)
from broker.errors import ConfigError
from broker.pool import Waiter
from tests.fakeclock import START_WALL, FakeClock
from tests.helpers import eventually

NOW = 1_714_564_800.0  # 2024-05-01 12:00:00 UTC
# A made-up bearer token, the point of these tests, not a leaked secret.
ACME_TOKEN = "acme-secret-token"  # noqa: S105


def customer(**fields: Any) -> CustomerConfig:
    """
    A validated customer entry.
    """
    return CustomerConfig.model_validate(fields)


def acme(**overrides: Any) -> CustomerConfig:
    """
    The documented example customer, with tweaks.
    """
    fields: dict[str, Any] = {
        "id": "acme",
        "networks": ["127.0.0.2/32", "10.1.0.0/16"],
        "uids": [1001],
        "tokens": [hash_token(ACME_TOKEN)],
        "weight": 3,
        "client_rate": "512 B/s",
        "client_burst": "4 KiB",
        "rate": "2 KiB/s",
        "burst": "16 KiB",
        "quota": "200 MiB/day",
    }
    fields.update(overrides)
    return customer(**fields)


def accounts(
    *customers: CustomerConfig, clock: FakeClock | None = None, **settings: Any
) -> Accounts:
    """
    Accounts on the memory backend, on a fake clock.
    """
    config = AccountsConfig.model_validate(settings)
    return Accounts(config, customers, clock=clock or FakeClock())


def client_of(acc: Accounts, peer: Peer) -> Client:
    """
    Identify a peer that must be accepted.
    """
    found = acc.identify(peer)
    assert isinstance(found, Client), found
    return found


def test_identify_by_network_uid_and_token() -> None:
    """
    IP, uid and token each find the owning customer; one identity is one object.
    """
    acc = accounts(acme())
    by_ip = client_of(acc, Peer("tcp", ip="10.1.2.3"))
    assert "acme" == by_ip.customer_id
    assert by_ip is client_of(acc, Peer("http", ip="::ffff:10.1.2.3"))
    assert "uid:1001" == client_of(acc, Peer("unix", uid=1001)).key
    by_token = client_of(acc, Peer("http", ip="192.0.2.9", token=ACME_TOKEN))
    assert "acme" == by_token.customer_id
    assert ACME_TOKEN not in by_token.key
    assert 3.0 == by_token.weight


def test_unknown_token_is_denied() -> None:
    """
    A bearer token nobody owns is refused rather than served as default.
    """
    guess = Peer("http", ip="10.1.2.3", token="guess")  # noqa: S106 - made up
    denied = accounts(acme()).identify(guess)
    assert isinstance(denied, Denied)
    assert None is denied.customer_id


def test_default_deny() -> None:
    """
    With ``default`` denied, unmatched peers are refused and counted.
    """
    acc = accounts(acme(), customer(id="default", deny=True))
    denied = acc.identify(Peer("tcp", ip="192.0.2.1"))
    assert isinstance(denied, Denied)
    assert "default" == denied.customer_id
    assert 1 == acc.snapshot(NOW)["customers"]["default"]["denied"]


async def test_implicit_default_is_unlimited() -> None:
    """
    Without a ``default`` entry, unmatched clients get everything they ask.
    """
    acc = accounts(acme())
    stranger = client_of(acc, Peer("tcp", ip="192.0.2.1"))
    grant = await acc.grant(stranger, 50_000_000, NOW)
    assert (50_000_000, None, 0) == (grant.granted, grant.limit, grant.rate_limit)
    assert acc.snapshot(NOW)["customers"]["default"]["implicit"]


async def test_client_rate_limits_and_refills() -> None:
    """
    A client gets its burst, then is cut off with limit client_rate and a
    retry_after that matches the refill; later it gets the refilled bytes.
    """
    acc = accounts(acme())
    vm = client_of(acc, Peer("tcp", ip="10.1.0.5"))
    first = await acc.grant(vm, 5000, NOW)
    assert (4096, "client_rate") == (first.granted, first.limit)
    assert math.isclose((5000 - 4096) / 512, first.retry_after)
    assert (4096, 0) == (first.rate_limit, first.rate_remaining)
    assert math.isclose(NOW + 8.0, first.reset_at or 0)
    assert 0 == (await acc.grant(vm, 100, NOW)).granted
    assert 256 == (await acc.grant(vm, 1000, NOW + 0.5)).granted


async def test_customer_rate_is_shared_by_clients() -> None:
    """
    Clients of one customer together stay within the customer's burst and rate.
    """
    acc = accounts(acme(client_rate="1 MiB/s", client_burst="1 MiB"))
    vms = [client_of(acc, Peer("tcp", ip=f"10.1.0.{i}")) for i in range(1, 4)]
    grants = [await acc.grant(vm, 10_000, NOW) for vm in vms]
    assert [10_000, 6384, 0] == [g.granted for g in grants]
    assert "customer_rate" == grants[2].limit
    assert math.isclose(10_000 / 2048, grants[2].retry_after)


async def test_quota_exhaustion_resets_next_period() -> None:
    """
    A spent quota answers limit "quota" with reset_at the next period's start,
    and the next day brings a fresh quota.
    """
    acc = accounts(
        acme(
            client_rate=None,
            client_burst=None,
            rate=None,
            burst=None,
            quota="10 KiB/day",
        )
    )
    vm = client_of(acc, Peer("tcp", ip="10.1.0.5"))
    first = await acc.grant(vm, 8192, NOW)
    assert (8192, 2048) == (first.granted, first.remaining_quota)
    assert (10240, 2048) == (first.rate_limit, first.rate_remaining)
    second = await acc.grant(vm, 8192, NOW + 1)
    _, midnight = period_bounds("day", NOW)
    assert (2048, "quota", midnight, 0) == (
        second.granted,
        second.limit,
        second.reset_at,
        second.remaining_quota,
    )
    assert math.isclose(midnight - NOW - 1, second.retry_after)
    assert 0 == (await acc.grant(vm, 1, NOW + 2)).granted
    assert 8192 == (await acc.grant(vm, 8192, midnight)).granted


async def test_refund_returns_bytes() -> None:
    """
    Refunded bytes go back to the client bucket and the quota.
    """
    acc = accounts(acme(quota="10 KiB/day"))
    vm = client_of(acc, Peer("tcp", ip="10.1.0.5"))
    await acc.grant(vm, 4096, NOW)
    acc.refund(vm, 1000, NOW)
    await acc.flush()
    again = await acc.grant(vm, 4096, NOW)
    assert 1000 == again.granted
    assert 10240 - 4096 == again.remaining_quota
    assert 4096 == acc.snapshot(NOW)["customers"]["acme"]["bytes_served"]


async def test_reload_keeps_clients_working_with_new_limits() -> None:
    """
    After a reload, existing Client objects obey the new limits, move to the
    customer that now owns them, and are refused if that customer is denied.
    """
    acc = accounts(acme(), customer(id="other", networks=["192.0.2.0/24"]))
    vm = client_of(acc, Peer("tcp", ip="10.1.0.5"))
    stray = client_of(acc, Peer("tcp", ip="192.0.2.7"))
    assert 4096 == (await acc.grant(vm, 100_000, NOW)).granted
    acc.reload(
        [
            acme(client_rate="8 KiB/s", client_burst="8 KiB", weight=5),
            customer(id="other", networks=["192.0.2.0/24"], deny=True),
        ]
    )
    assert 5.0 == vm.weight
    assert 8192 == (await acc.grant(vm, 100_000, NOW + 1)).granted
    assert "denied" == (await acc.grant(stray, 10, NOW)).limit
    with pytest.raises(AccessDenied):
        await acc.wait_grant(stray, 10)
    acc.reload([acme(networks=["127.0.0.2/32"])])
    assert "default" == vm.customer_id
    assert 100_000 == (await acc.grant(vm, 100_000, NOW + 2)).granted


def test_reload_refuses_ambiguous_config() -> None:
    """
    A bad reload raises ConfigError with key paths and changes nothing.
    """
    acc = accounts(acme())
    with pytest.raises(ConfigError, match=r"customers\[1\]\.networks\[0\]"):
        acc.reload([acme(), customer(id="b", networks=["10.1.0.0/16"])])
    assert "acme" == client_of(acc, Peer("tcp", ip="10.1.0.5")).customer_id


async def test_wait_grant_streams_at_the_client_rate() -> None:
    """
    A blocking reader past its burst waits exactly the refill time of one
    piece (a quarter second of its rate), then gets the piece.
    """
    clock = FakeClock()
    acc = accounts(
        customer(id="default", client_rate="256 B/s", client_burst=64), clock=clock
    )
    vm = client_of(acc, Peer("tcp", ip="192.0.2.1"))
    assert 64 == await acc.wait_grant(vm, 100)
    # The bucket is empty: the next piece (64 B at 256 B/s) takes 0.25 s.
    waiting = asyncio.create_task(acc.wait_grant(vm, 100))
    await clock.advance(0.2421875)
    assert not waiting.done()
    await clock.advance(0.0078125)
    assert 64 == await waiting
    assert 0.25 == acc.snapshot()["customers"]["default"]["throttled_seconds"]
    assert 0.25 == vm.throttled_seconds


async def test_wait_grant_waits_for_the_customer_rate() -> None:
    """
    A reader held back by its customer's shared bucket waits exactly until
    that bucket holds a piece (a quarter second of its rate) again.
    """
    clock = FakeClock()
    shared = customer(id="default", rate="1 KiB/s", burst="1 KiB")
    acc = accounts(shared, clock=clock)
    vm = client_of(acc, Peer("tcp", ip="192.0.2.1"))
    assert 1024 == await acc.wait_grant(vm, 4096)  # the whole burst at once
    waiting = asyncio.create_task(acc.wait_grant(vm, 4096))
    await clock.advance(0.2421875)
    assert not waiting.done()
    await clock.advance(0.0078125)
    assert 256 == await waiting
    assert 0.25 == vm.throttled_seconds


async def test_wait_grant_waits_for_the_next_quota_period() -> None:
    """
    A reader whose daily quota is spent waits until midnight UTC, not longer.
    """
    clock = FakeClock()  # starts at midnight
    acc = accounts(customer(id="default", quota="10 B/day"), clock=clock)
    vm = client_of(acc, Peer("tcp", ip="192.0.2.1"))
    assert 10 == await acc.wait_grant(vm, 10)
    waiting = asyncio.create_task(acc.wait_grant(vm, 10))
    await clock.advance(86_399.5)
    assert not waiting.done()
    await clock.advance(0.5)
    assert 10 == await waiting
    assert 86_400 == acc.snapshot()["customers"]["default"]["throttled_seconds"]


async def test_wait_grant_wakes_on_reload() -> None:
    """
    A reader waiting for tomorrow's quota is served as soon as a reload raises
    it, without any time passing.
    """
    clock = FakeClock()
    acc = accounts(customer(id="default", quota="10 B/day"), clock=clock)
    vm = client_of(acc, Peer("tcp", ip="192.0.2.1"))
    assert 10 == await acc.wait_grant(vm, 10)
    waiting = asyncio.create_task(acc.wait_grant(vm, 10))
    await clock.advance(0)
    assert not waiting.done()
    acc.reload([customer(id="default", quota="1 KiB/day")])
    await clock.advance(0)
    assert 10 == await waiting
    assert 0.0 == clock.monotonic()


async def test_usage_survives_restart(tmp_path: Path) -> None:
    """
    Counters saved at shutdown are loaded at start: no fresh daily quota.
    """
    path = tmp_path / "accounts.json"
    config = AccountsConfig()
    clock = FakeClock()
    first = Accounts(config, [acme(quota="1 MiB/day")], state_path=path, clock=clock)
    await first.start()
    vm = client_of(first, Peer("tcp", ip="10.1.0.5"))
    assert 4096 == (await first.grant(vm, 4096, clock.time())).granted
    await first.close()
    assert json.loads(path.read_text())["quotas"]
    await clock.advance(1)
    second = Accounts(config, [acme(quota="1 MiB/day")], state_path=path, clock=clock)
    await second.start()
    vm = client_of(second, Peer("tcp", ip="10.1.0.5"))
    grant = await second.grant(vm, 100, clock.time())
    assert 1024 * 1024 - 4096 - 100 == grant.remaining_quota
    await second.close()


async def test_unreadable_state_file_is_logged_not_fatal(tmp_path: Path) -> None:
    """
    A corrupt counter file does not stop the broker; it starts fresh counters.
    """
    path = tmp_path / "accounts.json"
    path.write_text("garbage")
    acc = Accounts(AccountsConfig(), [acme()], state_path=path, clock=FakeClock())
    await acc.start()
    await acc.close()
    assert 1 == json.loads(path.read_text())["version"]


async def test_tick_forgets_idle_clients_and_saves(tmp_path: Path) -> None:
    """
    Housekeeping drops clients idle for an hour and writes the counters.
    """
    path = tmp_path / "accounts.json"
    acc = Accounts(AccountsConfig(), [acme()], state_path=path, clock=FakeClock())
    vm = client_of(acc, Peer("tcp", ip="10.1.0.5"))
    await acc.grant(vm, 10, NOW)
    await acc.tick(NOW + 7200)
    assert 0 == acc.snapshot(NOW)["customers"]["acme"]["client_count"]
    assert path.exists()


async def test_snapshot_shows_usage_never_tokens() -> None:
    """
    Status lists per-customer and per-client usage without any token or hash.
    """
    acc = accounts(acme())
    vm = client_of(acc, Peer("http", ip="10.1.0.5", token=ACME_TOKEN))
    await acc.grant(vm, 5000, NOW)
    view = acc.snapshot(NOW)
    entry = view["customers"]["acme"]
    assert 4096 == entry["bytes_served"]
    assert 1 == entry["throttled_requests"]
    assert 1 == entry["client_count"]
    assert 200 * 1024**2 - 4096 == entry["quota"]["remaining"]
    assert {"bytes_served": 4096}.items() <= next(
        iter(entry["clients"].values())
    ).items()
    text = json.dumps(view)
    assert ACME_TOKEN not in text
    assert hash_token(ACME_TOKEN) not in text
    assert {"kind": "memory", "healthy": True} == view["backend"]


async def test_background_housekeeping_saves(tmp_path: Path) -> None:
    """
    Once started, a refund reaches the state file after persist_interval on
    the accounts' clock, without a shutdown, and not before (the grant itself
    was made durable at once).
    """
    path = tmp_path / "accounts.json"
    clock = FakeClock()
    config = AccountsConfig(persist_interval=30)
    acc = Accounts(config, [acme(quota="1 MiB/day")], state_path=path, clock=clock)
    await acc.start()
    vm = client_of(acc, Peer("tcp", ip="10.1.0.5"))
    grant = await acc.grant(vm, 100, clock.time())
    reserve = 16384  # 1 MiB / 64

    def saved() -> int:
        quotas = json.loads(path.read_text())["quotas"]
        return int(quotas[0]["used"]) if quotas else -1

    assert 100 + reserve == saved()
    acc.refund(vm, 100, grant.charged_at)
    await acc.flush()
    await clock.advance(29.5)
    assert 100 + reserve == saved()
    await clock.advance(0.5)
    # The file is written in a worker thread: wait for it, not for time.
    await eventually(lambda: reserve == saved())
    await acc.close()
    assert 0 == saved()


async def test_clients_carry_customer_weight_into_fair_queue() -> None:
    """
    Client objects are valid fair-queue keys: their weight is the customer's,
    and follows a reload.
    """
    acc = accounts(acme(), customer(id="small", networks=["192.0.2.0/24"]))
    big = client_of(acc, Peer("tcp", ip="10.1.0.5"))
    small = client_of(acc, Peer("tcp", ip="192.0.2.5"))
    queue = WeightedWaitQueue()
    loop = asyncio.get_running_loop()
    for key in (big, small):
        queue.push(Waiter(1 << 30, False, loop.create_future(), key))
    served = {"acme": 0, "small": 0}
    for _ in range(400):
        waiter = queue.pop()
        queue.charge(waiter, 256)
        served[waiter.key.customer_id] += 256  # type: ignore[attr-defined]
        queue.requeue(waiter)
    assert 3.0 == served["acme"] / served["small"]
    acc.reload([acme(weight=1), customer(id="small", networks=["192.0.2.0/24"])])
    assert 1.0 == big.weight


async def test_reload_reaches_clients_forgotten_while_connected() -> None:
    """
    A long-lived connection's client outlives housekeeping's idle sweep, and a
    reload still moves it to the customer its identity now maps to.
    """
    acc = accounts(acme(), customer(id="default", deny=True))
    vm = client_of(acc, Peer("tcp", ip="10.1.0.5"))
    vm.last_seen = NOW
    await acc.tick(NOW + 7200)  # idle for two hours, no connection marked open
    acc.reload([customer(id="default", deny=True)])
    grant = await acc.grant(vm, 100, NOW + 7201)
    assert (0, "denied") == (grant.granted, grant.limit)


async def test_open_connections_keep_a_client_indexed() -> None:
    """
    A client with an open connection is not forgotten however quiet it is, so
    the same host never gets a second, full bucket.
    """
    acc = accounts(acme(client_rate="1 KiB/s", client_burst="1 KiB"))
    vm = client_of(acc, Peer("tcp", ip="10.1.0.5"))
    vm.connections = 1
    vm.last_seen = NOW
    await acc.tick(NOW + 7200)
    assert vm is client_of(acc, Peer("tcp", ip="10.1.0.5"))


class SlowBackend(MemoryBackend):
    """
    A memory backend whose charges complete only when the test says so.
    """

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    def take_nowait(self, *args: Any, **kwargs: Any) -> Any:
        return None  # like Redis: every charge is a round trip

    async def take(self, *args: Any, **kwargs: Any) -> Any:
        # Like a Redis script that already ran when the caller gave up.
        charge = await super().take(*args, **kwargs)
        await self.release.wait()
        return charge


async def test_charge_of_a_cancelled_grant_is_undone() -> None:
    """
    A grant cancelled while its charge is in flight (a client went away) does
    not leave the customer charged once the charge lands.
    """
    backend = SlowBackend()
    metered = customer(id="metered", networks=["10.9.0.0/16"], quota="1 MiB/day")
    acc = Accounts(AccountsConfig(), [metered], backend=backend, clock=FakeClock())
    vm = client_of(acc, Peer("tcp", ip="10.9.0.1"))
    now = NOW
    pending = asyncio.create_task(acc.grant(vm, 4096, now))
    for _ in range(3):
        await asyncio.sleep(0)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    backend.release.set()
    period = vm._customer.quota_limit(now)
    assert period is not None
    await eventually(lambda: backend.usage_now("metered", period.period_key) == 0)
    await acc.flush()
    assert 0 == backend.usage_now("metered", period.period_key)


async def test_refund_goes_to_the_period_that_was_charged() -> None:
    """
    Bytes granted a second before midnight and handed back after it return to
    yesterday's quota, not today's.
    """
    backend = MemoryBackend()
    metered = customer(id="metered", networks=["10.9.0.0/16"], quota="1 KiB/day")
    acc = Accounts(AccountsConfig(), [metered], backend=backend, clock=FakeClock())
    vm = client_of(acc, Peer("tcp", ip="10.9.0.1"))
    _, midnight = period_bounds("day", NOW)
    before = midnight - 1
    assert 512 == (await acc.grant(vm, 512, before)).granted
    acc.refund(vm, 512, before)
    await acc.flush()
    yesterday = vm._customer.quota_limit(before)
    today = vm._customer.quota_limit(midnight + 1)
    assert yesterday is not None
    assert today is not None
    assert 0 == backend.usage_now("metered", yesterday.period_key)
    assert 0 == backend.usage_now("metered", today.period_key)


def quotas_of(acc: Accounts, backend: MemoryBackend, now: float) -> dict[str, int]:
    """
    Quota used per customer at ``now``, as the backend counts it and as the
    status shows it (which must agree).
    """
    view = acc.snapshot(now)["customers"]
    used = {}
    for name, entry in view.items():
        if entry["quota"] is None:
            continue
        key = period_key("day", now)
        used[name] = backend.usage_now(name, key)
        assert used[name] == entry["quota"]["used"], name
    return used


def moving_customers(a_ips: list[str]) -> list[CustomerConfig]:
    """
    Customers A and B with daily quotas; A owns ``a_ips``, B owns 10.7.0.0/16.
    """
    return [
        customer(
            id="a", networks=a_ips, quota="10 KiB/day", rate="1 KiB/s", burst=4096
        ),
        customer(id="b", networks=["10.7.0.0/16"], quota="10 KiB/day"),
    ]


async def test_refund_after_reload_credits_the_customer_charged() -> None:
    """
    Bytes granted under customer A and handed back after a reload moved the
    client to customer B go back to A's quota and bucket; B is untouched.
    """
    backend = MemoryBackend()
    clock = FakeClock()
    acc = Accounts(
        AccountsConfig(),
        moving_customers(["10.7.1.0/24"]),
        backend=backend,
        clock=clock,
    )
    vm = client_of(acc, Peer("tcp", ip="10.7.1.5"))
    now = clock.time()
    assert 4096 == (await acc.grant(vm, 4096, now)).granted
    assert {"a": 4096, "b": 0} == quotas_of(acc, backend, now)
    acc.reload(moving_customers(["10.9.0.0/16"]))
    assert "b" == vm.customer_id
    acc.refund(vm, 1000, now)
    await acc.flush()
    assert {"a": 3096, "b": 0} == quotas_of(acc, backend, now)
    customers = acc.snapshot(now)["customers"]
    assert (3096, 0) == (
        customers["a"]["bytes_served"],
        customers["b"]["bytes_served"],
    )
    # A's shared bucket got the 1000 bytes back as well.
    again = await backend.take("a", 4096, now, BucketLimit(1024.0, 4096), None)
    assert 1000 == again.granted


async def test_refund_after_wait_grant_and_reload_credits_the_customer_charged() -> (
    None
):
    """
    A blocking reader refunds with the grant's time (``client.last_seen``, as
    the EGD sink does); after a reload in between, the bytes still reach the
    customer charged.
    """
    backend = MemoryBackend()
    clock = FakeClock()
    acc = Accounts(
        AccountsConfig(),
        moving_customers(["10.7.1.0/24"]),
        backend=backend,
        clock=clock,
    )
    vm = client_of(acc, Peer("tcp", ip="10.7.1.5"))
    granted = await acc.wait_grant(vm, 200)
    granted_at = vm.last_seen
    await clock.advance(5)
    acc.reload(moving_customers(["10.9.0.0/16"]))
    acc.refund(vm, granted, granted_at)
    await acc.flush()
    assert {"a": 0, "b": 0} == quotas_of(acc, backend, clock.time())


async def test_refund_follows_a_customer_whose_state_a_reload_replaced() -> None:
    """
    An implicit default that a reload makes explicit gets a new state carrying
    its counters; a refund of a grant made before goes to that new state.
    """
    clock = FakeClock()
    acc = accounts(acme(), clock=clock)
    stranger = client_of(acc, Peer("tcp", ip="192.0.2.1"))
    now = clock.time()
    assert 500 == (await acc.grant(stranger, 500, now)).granted
    acc.reload([acme(), customer(id="default", quota="1 MiB/day")])
    acc.refund(stranger, 200, now)
    await acc.flush()
    assert 300 == acc.snapshot(now)["customers"]["default"]["bytes_served"]


async def test_snapshot_and_refund_default_to_the_accounts_clock() -> None:
    """
    Without a ``now``, snapshot and refund read the injected clock: the quota
    shown is the clock's day, and a refund lands in it.
    """
    clock = FakeClock(START_WALL + 86_400 * 3 + 5)
    backend = MemoryBackend()
    metered = customer(id="metered", networks=["10.9.0.0/16"], quota="1 KiB/day")
    acc = Accounts(AccountsConfig(), [metered], backend=backend, clock=clock)
    vm = client_of(acc, Peer("tcp", ip="10.9.0.1"))
    assert 1024 == (await acc.grant(vm, 1024, clock.time())).granted
    acc.refund(vm, 24)
    await acc.flush()
    quota = acc.snapshot()["customers"]["metered"]["quota"]
    _, midnight = period_bounds("day", clock.time())
    assert (1000, midnight) == (quota["used"], quota["resets_at"])


def test_reload_summary_names_added_removed_and_changed() -> None:
    """
    A reload returns which customer ids were added, removed and changed, and
    warns naming the removed ones.
    """
    acc = accounts(acme(), customer(id="beta", networks=["10.2.0.0/16"]))
    with structlog.testing.capture_logs() as logs:
        summary = acc.reload(
            [acme(weight=5), customer(id="gamma", networks=["10.3.0.0/16"])]
        )
    assert (("gamma",), ("beta",), ("acme",)) == (
        summary.added,
        summary.removed,
        summary.changed,
    )
    assert (False, False) == (summary.removes_all, summary.opens_default)
    removes = [e for e in logs if e["event"] == "reload_removes_customers"]
    assert [["beta"]] == [e["removed"] for e in removes]
    assert "warning" == removes[0]["log_level"]


def test_reload_that_empties_the_list_warns_and_opens_default() -> None:
    """
    A file that still parses but lost its customers (truncated) removes
    every customer and the deny-by-default entry: both are warned about.
    """
    acc = accounts(acme(), customer(id="default", deny=True))
    with structlog.testing.capture_logs() as logs:
        summary = acc.reload([])
    assert (("acme", "default"), True, True) == (
        summary.removed,
        summary.removes_all,
        summary.opens_default,
    )
    events = {e["event"]: e for e in logs if e["log_level"] == "warning"}
    assert events["reload_removes_customers"]["all_customers"] is True
    assert "reload_opens_default" in events
    stranger = acc.identify(Peer("tcp", ip="192.0.2.77"))
    assert isinstance(stranger, Client)


def test_reload_lifting_deny_on_default_opens_it() -> None:
    """
    Turning ``deny`` off on the default entry is reported as opening it;
    a reload that changes nothing warns about nothing.
    """
    acc = accounts(acme(), customer(id="default", deny=True))
    with structlog.testing.capture_logs() as logs:
        same = acc.reload([acme(), customer(id="default", deny=True)])
        opened = acc.reload([acme(), customer(id="default")])
    assert (False, (), (), ()) == (
        same.opens_default,
        same.added,
        same.removed,
        same.changed,
    )
    assert (True, ("default",)) == (opened.opens_default, opened.changed)
    assert ["reload_opens_default"] == [
        e["event"] for e in logs if e["log_level"] == "warning"
    ]


def test_an_address_is_matched_again_after_a_reload() -> None:
    """
    Who an address belongs to is remembered between requests, and a reload
    that gives its network to a customer applies to its next request.
    """
    acc = accounts()
    peer = Peer("tcp", ip="10.1.0.5")
    before = [client_of(acc, peer).customer_id for _ in range(2)]
    acc.reload([acme()])
    assert (["default", "default"], "acme") == (
        before,
        client_of(acc, peer).customer_id,
    )
