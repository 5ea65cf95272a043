"""
Memory backend: atomic check-and-charge of the customer bucket and quota, and
counters that survive a save/load.
"""

import json
from pathlib import Path

import pytest

from broker.accounts.backend import BucketLimit, MemoryBackend, QuotaLimit

DAY = QuotaLimit("day:2024-05-01", 1000, 2_000_000.0)


async def test_quota_is_never_exceeded() -> None:
    """
    Charges stop exactly at the limit; the last one is cut short.
    """
    backend = MemoryBackend()
    assert (600, 600) == await backend.charge("a", "day:x", 600, 1000)
    assert (400, 1000) == await backend.charge("a", "day:x", 600, 1000)
    assert (0, 1000) == await backend.charge("a", "day:x", 1, 1000)
    assert 1000 == await backend.usage("a", "day:x")
    assert 0 == await backend.usage("b", "day:x")


async def test_take_applies_bucket_and_quota_together() -> None:
    """
    A take grants the least of bucket and quota and charges both by the grant.
    """
    backend = MemoryBackend()
    bucket = BucketLimit(100.0, 700)
    first = await backend.take("a", 500, 0.0, bucket, DAY)
    assert (500, 200.0, 500) == (
        first.granted,
        first.bucket_tokens,
        first.quota_used,
    )
    second = await backend.take("a", 500, 0.0, bucket, DAY)
    assert (200, 0.0, 700) == (second.granted, second.bucket_tokens, second.quota_used)
    third = await backend.take("a", 5000, 100.0, bucket, DAY)
    assert 300 == third.granted  # the quota, not the refilled bucket, binds
    assert 1000 == third.quota_used


async def test_give_back_restores_bucket_and_quota() -> None:
    """
    Unused bytes go back to both counters.
    """
    backend = MemoryBackend()
    bucket = BucketLimit(0.0, 500)
    await backend.take("a", 500, 0.0, bucket, DAY)
    await backend.give_back("a", 200, bucket, DAY)
    assert 300 == await backend.usage("a", DAY.period_key)
    assert 200 == (await backend.take("a", 500, 0.0, bucket, None)).granted
    assert 0 == await backend.refund("a", "never-charged", 5)


async def test_new_limits_apply_to_existing_bucket() -> None:
    """
    A changed rate or burst reconfigures the customer's bucket in place.
    """
    backend = MemoryBackend()
    await backend.take("a", 10, 0.0, BucketLimit(1.0, 1000), None)
    charge = await backend.take("a", 10_000, 0.0, BucketLimit(1.0, 100), None)
    assert 100 == charge.granted


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    """
    Quota counters survive a restart; no temporary file is left behind.
    """
    path = tmp_path / "accounts.json"
    backend = MemoryBackend()
    backend.take_now("a", 400, 1_000_000.0, None, DAY)
    backend.charge_now("b", "month:2024-05", 7, 10)
    backend.save(path)
    assert ["accounts.json"] == [p.name for p in tmp_path.iterdir()]
    restored = MemoryBackend()
    assert 2 == restored.load(path)
    assert 400 == restored.usage_now("a", DAY.period_key)
    assert 7 == restored.usage_now("b", "month:2024-05")


def test_ended_periods_are_not_saved(tmp_path: Path) -> None:
    """
    Counters of periods that ended before the latest ``now`` are dropped.
    """
    path = tmp_path / "accounts.json"
    backend = MemoryBackend()
    backend.take_now("a", 10, 1_000_000.0, None, QuotaLimit("old", 100, 1_500_000.0))
    backend.take_now("a", 10, 1_600_000.0, None, QuotaLimit("new", 100, 1_700_000.0))
    backend.save(path)
    periods = [e["period"] for e in json.loads(path.read_text())["quotas"]]
    assert ["new"] == periods


def test_load_keeps_larger_count(tmp_path: Path) -> None:
    """
    Loading never lowers a counter this process already holds.
    """
    path = tmp_path / "accounts.json"
    saved = MemoryBackend()
    saved.charge_now("a", "k", 5, 100)
    saved.save(path)
    live = MemoryBackend()
    live.charge_now("a", "k", 9, 100)
    live.load(path)
    assert 9 == live.usage_now("a", "k")


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    """
    No state file yet: nothing to load, no error.
    """
    assert 0 == MemoryBackend().load(tmp_path / "absent.json")


@pytest.mark.parametrize(
    "text",
    ["not json", '{"version": 99}', '{"version": 1, "quotas": [{"used": 1}]}'],
)
def test_bad_state_file_is_refused(tmp_path: Path, text: str) -> None:
    """
    A file that is not our state is an error, not silently fresh counters.
    """
    path = tmp_path / "accounts.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=str(path)):
        MemoryBackend().load(path)
