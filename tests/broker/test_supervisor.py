"""
The supervisor restarts failing sources with backoff and feeds the pool from the
best tier that has a healthy source.
"""

import asyncio
import os
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Self

from broker.errors import SourceError
from broker.pool import EntropyPool
from broker.status import SourceState
from broker.supervisor import Backoff, SourceRunner, Supervisor
from sources.device import DeviceSource, DeviceSourceConfig
from tests.helpers import eventually


class ScriptedSource:
    """
    A source whose behaviour the test switches at will.
    """

    kind = "scripted"
    nominal_rate = None

    def __init__(self, name: str, priority: int) -> None:
        self.name = name
        self.priority = priority
        self.credit = 8.0
        self.broken = False
        self.opens = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __aenter__(self) -> Self:
        self.opens += 1
        if self.broken:
            raise SourceError("device unplugged")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def read(self) -> bytes:
        await self.gate.wait()
        if self.broken:
            raise SourceError("device unplugged")
        await asyncio.sleep(0)
        return os.urandom(64)


def make(
    pool: EntropyPool, *priorities: int
) -> tuple[Supervisor, list[ScriptedSource]]:
    supervisor = Supervisor(
        pool, standby_probe=0.05, backoff_initial=0.01, backoff_max=0.05
    )
    sources = [
        ScriptedSource(f"s{index}", tier) for index, tier in enumerate(priorities)
    ]
    for source in sources:
        supervisor.add(source)
    return supervisor, sources


async def test_only_the_best_tier_is_credited() -> None:
    """
    With a healthy primary, the fallback runs as standby and earns no credit.
    """
    pool = EntropyPool(1 << 20)
    supervisor, _ = make(pool, 0, 1)
    supervisor.start()
    try:
        primary, fallback = supervisor.runners
        await eventually(lambda: primary.healthy and fallback.healthy)
        await eventually(lambda: primary.credited_bits > 10_000)
        assert 0 == supervisor.active_tier
        assert 0 == fallback.credited_bits
        assert not supervisor.degraded
    finally:
        await supervisor.stop()


async def test_failover_and_failback() -> None:
    """
    When the primary fails the fallback takes over at once; when the primary
    recovers it is preferred again, and both hand-overs are counted.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (primary_source, _) = make(pool, 0, 1)
    supervisor.start()
    try:
        primary, fallback = supervisor.runners
        await eventually(lambda: primary.healthy and supervisor.active_tier == 0)
        primary_source.broken = True
        await eventually(lambda: supervisor.active_tier == 1)
        assert SourceState.FAILED == primary.state
        assert "device unplugged" == primary.reason
        assert supervisor.degraded
        await eventually(lambda: fallback.credited_bits > 0)
        primary_source.broken = False
        await eventually(lambda: supervisor.active_tier == 0)
        assert 2 == supervisor.failovers
        assert not supervisor.degraded
    finally:
        await supervisor.stop()


async def test_failing_source_is_restarted_with_backoff() -> None:
    """
    A source that keeps failing is retried, with the restarts counted.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (source,) = make(pool, 0)
    source.broken = True
    supervisor.start()
    try:
        runner = supervisor.runners[0]
        await eventually(lambda: runner.restarts >= 3)
        assert SourceState.FAILED == runner.state
        source.broken = False
        await eventually(lambda: runner.healthy)
        assert 0 == runner.backoff.failures
    finally:
        await supervisor.stop()


async def test_optional_missing_device_is_skipped(tmp_path: Path) -> None:
    """
    An optional device that is absent at start-up is skipped with a reason, and
    does not count as the preferred tier.
    """
    pool = EntropyPool(1 << 20)
    supervisor = Supervisor(pool, backoff_initial=0.01)
    config = DeviceSourceConfig(
        name="hwrng", kind="hwrng", path=tmp_path / "hwrng", optional=True
    )
    runner = supervisor.add(DeviceSource(config), optional=True)
    fallback = supervisor.add(ScriptedSource("fallback", 1))
    supervisor.start()
    try:
        await eventually(lambda: runner.skipped and fallback.healthy)
        assert SourceState.STOPPED == runner.state
        assert runner.reason.startswith("skipped: cannot open")
        assert not supervisor.degraded
    finally:
        await supervisor.stop()


async def test_full_pool_pauses_reading() -> None:
    """
    Sources stop reading while the pool is full instead of discarding input.
    """
    pool = EntropyPool(4096)
    supervisor, _ = make(pool, 0)
    supervisor.start()
    try:
        runner = supervisor.runners[0]
        await eventually(lambda: not pool.has_space)
        before = runner.bytes_in
        for _ in range(20):
            await asyncio.sleep(0)
        assert before == runner.bytes_in
    finally:
        await supervisor.stop()


def test_backoff_grows_and_is_bounded() -> None:
    """
    Delays double from the initial value up to the maximum, with jitter below it.
    """
    backoff = Backoff(initial=1.0, maximum=8.0, rng=lambda: 1.0)
    assert [1.0, 2.0, 4.0, 8.0, 8.0] == [backoff.next_delay() for _ in range(5)]
    low = Backoff(initial=1.0, maximum=8.0, rng=lambda: 0.0)
    assert [0.5, 1.0, 2.0] == [low.next_delay() for _ in range(3)]


class PatternSource(ScriptedSource):
    """
    A source whose output the test can make stuck or hang.
    """

    def __init__(self, name: str, priority: int) -> None:
        super().__init__(name, priority)
        self.stuck = False
        self.hang = False
        self.stuck_reads = 0

    async def read(self) -> bytes:
        await self.gate.wait()
        await asyncio.sleep(0)
        if self.hang:
            await asyncio.Event().wait()
        if self.stuck_reads:
            self.stuck_reads -= 1
            return bytes(64)
        return bytes(64) if self.stuck else os.urandom(64)


async def test_nothing_is_credited_before_the_startup_test() -> None:
    """
    The first 1024 bytes of a source are tested, not credited.
    """
    pool = EntropyPool(1 << 20)
    supervisor = Supervisor(pool)
    source = PatternSource("s", 0)
    runner = supervisor.add(source)
    supervisor.start()
    try:
        await eventually(lambda: runner.bytes_in >= 1024)
        await eventually(lambda: runner.healthy)
        assert runner.bytes_in - runner.credited_bits // 8 >= 1024
    finally:
        await supervisor.stop()


async def test_stuck_source_is_quarantined_and_readmitted() -> None:
    """
    Stuck output is caught by the repetition count test within its cut-off,
    never credited, the fallback takes over; good output again passes a fresh
    start-up test and the source is credited again.
    """
    pool = EntropyPool(1 << 20)
    supervisor = Supervisor(pool, standby_probe=0.05)
    primary_source = PatternSource("primary", 0)
    primary = supervisor.add(primary_source)
    fallback = supervisor.add(PatternSource("fallback", 1))
    supervisor.start()
    try:
        await eventually(lambda: primary.healthy and supervisor.active_tier == 0)
        primary_source.stuck = True
        await eventually(lambda: primary.state == SourceState.QUARANTINED)
        credited_when_stuck = primary.credited_bits
        assert 1 == primary.health.counters.rct_failures
        await eventually(lambda: supervisor.active_tier == 1)
        await eventually(lambda: fallback.credited_bits > 0)
        assert credited_when_stuck == primary.credited_bits
        assert SourceState.QUARANTINED == primary.state
        primary_source.stuck = False
        await eventually(lambda: supervisor.active_tier == 0)
        assert primary.health.counters.startups_passed >= 2
    finally:
        await supervisor.stop()


async def test_hanging_source_is_caught_by_the_watchdog() -> None:
    """
    A read that never returns is reported as stalled and the source restarted.
    """
    pool = EntropyPool(1 << 20)
    supervisor = Supervisor(pool, backoff_initial=0.01, backoff_max=0.02)
    source = PatternSource("s", 0)
    runner = supervisor.add(source, watchdog=0.05)
    supervisor.start()
    try:
        await eventually(lambda: runner.healthy)
        source.hang = True
        await eventually(lambda: runner.state == SourceState.STALLED)
        assert "watchdog" in runner.reason
        source.hang = False
        await eventually(lambda: runner.restarts >= 1 and runner.healthy)
        assert 1 <= runner.stalls
    finally:
        await supervisor.stop()


def quarantined_times(runner: SourceRunner, times: int) -> bool:
    return runner.health.counters.quarantines == times


async def test_repeated_failures_fail_the_source_for_good() -> None:
    """
    A source that keeps failing its tests (three separate incidents within the
    failure window) is marked failed with the reason and time, and is no
    longer read.
    """
    pool = EntropyPool(1 << 20)
    supervisor = Supervisor(pool)
    source = PatternSource("s", 0)
    runner = supervisor.add(source)
    supervisor.start()
    try:
        for incident in (1, 2):
            await eventually(lambda: runner.healthy)
            source.stuck_reads = 1
            await eventually(partial(quarantined_times, runner, incident))
        await eventually(lambda: runner.healthy)
        credited = runner.credited_bits
        source.stuck = True
        await eventually(lambda: runner.state == SourceState.FAILED)
        # The third incident fails it instead of quarantining it once more.
        assert 2 == runner.health.counters.quarantines
        assert runner.health.failed_at is not None
        assert runner.reason.startswith("health tests: 3 failures")
        assert credited == runner.credited_bits
        read = runner.bytes_in
        for _ in range(20):
            await asyncio.sleep(0)
        assert read == runner.bytes_in
    finally:
        await supervisor.stop()
    assert SourceState.FAILED == runner.state


async def test_better_tier_takes_over_while_the_pool_is_full() -> None:
    """
    A preferred source that starts late still passes its start-up test and
    takes over from a fallback that filled the pool while nobody drew.
    """
    pool = EntropyPool(4096)
    supervisor = Supervisor(pool, standby_probe=0.05)
    primary_source = PatternSource("primary", 0)
    primary_source.gate.clear()
    primary = supervisor.add(primary_source)
    supervisor.add(PatternSource("fallback", 1))
    supervisor.start()
    try:
        await eventually(lambda: supervisor.active_tier == 1 and not pool.has_space)
        primary_source.gate.set()
        await eventually(lambda: primary.healthy and supervisor.active_tier == 0)
    finally:
        await supervisor.stop()


async def test_paused_source_is_still_probed() -> None:
    """
    A healthy source paused by a full pool is read now and then, so a device
    that dies while nobody draws is noticed.
    """
    pool = EntropyPool(4096)
    supervisor = Supervisor(pool, standby_probe=0.05)
    source = PatternSource("s", 0)
    runner = supervisor.add(source)
    supervisor.start()
    try:
        await eventually(lambda: runner.healthy and not pool.has_space)
        source.stuck = True
        await eventually(lambda: runner.state == SourceState.QUARANTINED)
    finally:
        await supervisor.stop()
