"""
Durable quota counts on the memory backend: the state file covers every byte
granted before the grant returns, runs at most one reservation ahead, and a
"crash" (a second Accounts reading the file the first left, without a close)
never hands quota out again and loses at most the stated bound.

Time runs on a `FakeClock`; a crash is simulated by never closing the first
Accounts.
"""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from broker.accounts import Accounts, AccountsConfig, Client, CustomerConfig, Peer
from broker.accounts.backend import MemoryBackend
from broker.accounts.reservations import reservation, reserved_mark
from tests.fakeclock import FakeClock

KIB = 1024
MIB = 1024 * KIB
VM = Peer("tcp", ip="10.1.0.5")


def metered(quota: str) -> CustomerConfig:
    """
    A customer with only a quota, so grants are limited by nothing else.
    """
    return CustomerConfig.model_validate(
        {"id": "acme", "networks": ["10.1.0.0/16"], "quota": quota}
    )


def started(path: Path, quota: str, clock: FakeClock, **settings: Any) -> Accounts:
    """
    Accounts on the memory backend saving to ``path`` (call `start` next).
    """
    config = AccountsConfig.model_validate(settings)
    return Accounts(config, [metered(quota)], state_path=path, clock=clock)


def client_of(acc: Accounts) -> Client:
    """
    The metered customer's client.
    """
    client = acc.identify(VM)
    assert isinstance(client, Client)
    return client


def on_disk(path: Path) -> int:
    """
    What the state file counts for the metered customer (0 if nothing).
    """
    quotas = json.loads(path.read_text())["quotas"]
    return sum(int(entry["used"]) for entry in quotas if entry["customer"] == "acme")


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (8 * KIB, 4 * KIB),
        (MIB, 16 * KIB),
        (200 * MIB, MIB),
        (5 * 1024 * MIB, MIB),
        (0, 4 * KIB),
    ],
)
def test_reservation_table(limit: int, expected: int) -> None:
    """
    Each row of the reservations module's table: quota/64 between 4 KiB and 1 MiB.
    """
    assert expected == reservation(limit)


def test_reserved_mark_covers_use_and_stays_within_the_quota() -> None:
    """
    A mark is never below the count, never above the quota unless the count
    already is, and exact when the quota is not known.
    """
    assert 100 + 16 * KIB == reserved_mark(100, MIB)
    assert MIB == reserved_mark(MIB - 10, MIB)
    assert 5000 == reserved_mark(5000, 4096)
    assert 777 == reserved_mark(777, None)


async def test_grant_is_on_disk_before_it_returns(tmp_path: Path) -> None:
    """
    Right after a grant returns, without any housekeeping, the state file
    counts at least the bytes granted and at most one reservation more.
    """
    path = tmp_path / "accounts.json"
    clock = FakeClock()
    acc = started(path, "1 MiB/day", clock)
    await acc.start()
    vm = client_of(acc)
    granted = 0
    for _ in range(50):
        granted += (await acc.grant(vm, 3000, clock.time())).granted
        assert granted <= on_disk(path) <= granted + reservation(MIB)
    await acc.close()
    assert granted == on_disk(path)


async def test_writes_once_per_reservation(tmp_path: Path) -> None:
    """
    A customer drawing steadily costs a state-file write per half reservation
    at most (marks move ahead once half the head start is spent), not one per
    grant.
    """
    path = tmp_path / "accounts.json"
    clock = FakeClock()
    acc = started(path, "1 MiB/day", clock)
    await acc.start()
    vm = client_of(acc)
    backend = acc.backend
    assert isinstance(backend, MemoryBackend)
    for _ in range(256):
        await acc.grant(vm, KIB, clock.time())
    # 256 KiB drawn with a 16 KiB reservation: 16 to 32 writes, the first included.
    per_reservation = 256 * KIB // reservation(MIB)
    assert per_reservation <= backend.writes <= 2 * per_reservation
    await acc.close()


async def test_marks_move_ahead_while_grants_go_on(tmp_path: Path) -> None:
    """
    Once the first grant is on disk, a customer drawing steadily is never made
    to wait for the disk: the next mark is written while grants go on under
    the current one, and the file still covers every byte handed out.
    """
    path = tmp_path / "accounts.json"
    clock = FakeClock()
    acc = started(path, "1 MiB/day", clock)
    await acc.start()
    vm = client_of(acc)
    backend = acc.backend
    assert isinstance(backend, MemoryBackend)
    assert (await acc.grant(vm, KIB, clock.time())).granted == KIB
    waited = 0
    granted = KIB
    while granted < 4 * reservation(MIB):
        grant = acc.try_grant(vm, KIB, clock.time())
        if grant is None:
            waited += 1
            grant = await acc.grant(vm, KIB, clock.time())
        granted += grant.granted
        assert granted <= on_disk(path)
        # The disk keeps up between two grants (a write ahead finishes).
        for _ in range(20):
            await asyncio.sleep(0)
        await backend.settled()
    assert (0, True) == (waited, backend.writes > 4)
    await acc.close()


async def test_crash_never_hands_quota_out_again(tmp_path: Path) -> None:
    """
    After a crash at any point, the restarted broker grants at most what the
    first one had not, and at least that minus one reservation.
    """
    path = tmp_path / "accounts.json"
    limit = 64 * KIB
    for spent in (1, 3000, 20_000, 40_000, limit - 1, limit):
        clock = FakeClock()
        path.unlink(missing_ok=True)
        first = started(path, "64 KiB/day", clock)
        await first.start()
        vm = client_of(first)
        granted = 0
        while granted < spent:
            granted += (await first.grant(vm, spent - granted, clock.time())).granted
        # Crash: `first` is never closed; a fresh broker reads what it left.
        second = started(path, "64 KiB/day", clock)
        await second.start()
        again = (await second.grant(client_of(second), limit, clock.time())).granted
        await second.close()
        assert granted + again <= limit
        assert again >= limit - granted - reservation(limit)


async def test_concurrent_grants_are_all_covered(tmp_path: Path) -> None:
    """
    Grants racing each other (one waits on another's write) are all covered
    by the file once they return.
    """
    path = tmp_path / "accounts.json"
    clock = FakeClock()
    acc = started(path, "1 MiB/day", clock)
    await acc.start()
    vm = client_of(acc)
    grants = await asyncio.gather(
        *(acc.grant(vm, 5000, clock.time()) for _ in range(40))
    )
    granted = sum(grant.granted for grant in grants)
    assert 200_000 == granted
    assert granted <= on_disk(path) <= granted + reservation(MIB)
    await acc.close()


async def test_refunds_reach_the_file_at_housekeeping(tmp_path: Path) -> None:
    """
    Bytes refunded are released from the file at the next housekeeping round,
    so a crash after it costs at most one reservation.
    """
    path = tmp_path / "accounts.json"
    clock = FakeClock()
    acc = started(path, "1 MiB/day", clock, persist_interval=5)
    await acc.start()
    vm = client_of(acc)
    grant = await acc.grant(vm, 100_000, clock.time())
    acc.refund(vm, 60_000, grant.charged_at)
    await acc.flush()
    assert 100_000 <= on_disk(path)
    await acc.tick(clock.time())
    assert 40_000 + reservation(MIB) == on_disk(path)
    await acc.close()


async def test_unwritable_state_dir_serves_on_and_logs(tmp_path: Path) -> None:
    """
    When the state file cannot be written, grants are still served under the
    in-memory quota, and the failure is logged.
    """
    path = tmp_path / "missing" / "accounts.json"
    clock = FakeClock()
    acc = started(path, "8 KiB/day", clock)
    await acc.start()
    vm = client_of(acc)
    with structlog.testing.capture_logs() as logs:
        first = await acc.grant(vm, 6000, clock.time())
        second = await acc.grant(vm, 6000, clock.time())
    assert (6000, 2192) == (first.granted, second.granted)
    assert "accounts_state_save_failed" in [entry["event"] for entry in logs]
    await acc.close()


async def test_status_after_restart_shows_used_quota_at_once(tmp_path: Path) -> None:
    """
    The snapshot of a restarted broker shows the quota used before, before
    any grant or housekeeping round.
    """
    path = tmp_path / "accounts.json"
    clock = FakeClock()
    first = started(path, "1 MiB/day", clock)
    await first.start()
    await first.grant(client_of(first), 5000, clock.time())
    await first.close()
    second = started(path, "1 MiB/day", clock)
    await second.start()
    quota = second.snapshot()["customers"]["acme"]["quota"]
    await second.close()
    assert (5000, MIB - 5000) == (quota["used"], quota["remaining"])
