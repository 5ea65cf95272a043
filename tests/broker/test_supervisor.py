"""
The supervisor restarts failing sources with backoff and feeds the pool from the
best tier that has a healthy source.

Time is a `FakeClock`: watchdogs, backoff delays and standby probes happen at
exactly the fake second they are due, and nothing here waits in real time.
Sources deliver what the test queues, when it queues it.
"""

import asyncio
import contextlib
import random
import stat
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
from structlog.testing import capture_logs

from broker.errors import SourceError
from broker.health import FIPS_BLOCK_BYTES, STARTUP_SAMPLES
from broker.health_config import HealthConfig
from broker.pool import BLOCK_BYTES, EntropyPool
from broker.runner import Backoff, SourceRunner
from broker.status import SourceState
from broker.supervisor import Supervisor
from sources.device import DeviceSource, DeviceSourceConfig
from tests.broker.test_health_readmission import monobit_failing_bytes, random_bytes
from tests.fakeclock import START_WALL, FakeClock, settle

STANDBY_PROBE = 10.0
BLOCK = 1024
LOW_WATERMARK = 4096
# Output of one credited BLOCK read: 8 bits a byte, 320 credited bits a block.
BLOCK_OUTPUT = -(-BLOCK * 8 // 320) * 32


class FakeSource:
    """
    A source that delivers exactly the blocks (or errors) the test queues.
    """

    kind = "fake"
    nominal_rate: float | None = None

    def __init__(self, name: str = "s", priority: int = 0) -> None:
        self.name = name
        self.priority = priority
        self.credit = 8.0
        self.open_error: Exception | None = None
        self.opens = 0
        self.closes = 0
        self.reads = 0
        """read() calls started, including one still waiting."""
        self._queue: asyncio.Queue[bytes | Exception] = asyncio.Queue()
        self._rng = random.Random(name)

    async def __aenter__(self) -> Self:
        self.opens += 1
        if self.open_error is not None:
            raise self.open_error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.closes += 1

    async def read(self) -> bytes:
        self.reads += 1
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def details(self) -> dict[str, Any]:
        return {"opens": self.opens}

    def push(self, item: bytes | Exception) -> None:
        self._queue.put_nowait(item)

    def random_block(self, size: int = BLOCK) -> bytes:
        return self._rng.randbytes(size)


async def deliver(source: FakeSource, *items: bytes | Exception) -> None:
    """
    Queue ``items`` one at a time, letting the runner take each in turn.
    """
    for item in items:
        source.push(item)
        await settle()


async def pass_startup(source: FakeSource) -> None:
    """
    Deliver a start-up test's worth of good bytes, then one more block.
    """
    await deliver(source, source.random_block(STARTUP_SAMPLES + BLOCK))


async def fill(pool: EntropyPool, source: FakeSource) -> None:
    """
    Deliver good blocks from a credited source until the pool is full.
    """
    for _ in range(64):
        if not pool.has_space:
            return
        await deliver(source, source.random_block())
    raise AssertionError("the pool never filled")


async def feed_until_paused(source: FakeSource) -> None:
    """
    Deliver good blocks until the runner stops asking for more.
    """
    for _ in range(64):
        reads = source.reads
        await deliver(source, source.random_block())
        if reads == source.reads:
            return
    raise AssertionError("the source was never paused")


def make(
    pool: EntropyPool,
    clock: FakeClock,
    *priorities: int,
    jitter: float = 0.0,
    low_watermark: int = LOW_WATERMARK,
) -> tuple[Supervisor, list[FakeSource]]:
    supervisor = Supervisor(
        pool,
        clock=clock,
        standby_probe=STANDBY_PROBE,
        low_watermark=low_watermark,
        backoff_initial=1.0,
        backoff_max=4.0,
        rng=lambda: jitter,
    )
    sources = [FakeSource(f"s{index}", tier) for index, tier in enumerate(priorities)]
    for source in sources:
        supervisor.add(source)
    return supervisor, sources


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_only_the_best_tier_is_credited(clock: FakeClock) -> None:
    """
    With a healthy primary, the fallback runs as standby and earns no credit.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (primary_source, fallback_source) = make(pool, clock, 0, 1)
    supervisor.start()
    try:
        primary, fallback = supervisor.runners
        await pass_startup(primary_source)
        await pass_startup(fallback_source)
        assert primary.healthy
        assert fallback.healthy
        assert 0 == supervisor.active_tier
        assert 8 * BLOCK == primary.credited_bits
        assert 0 == fallback.credited_bits
        assert not supervisor.degraded
    finally:
        await supervisor.stop()


async def test_standby_source_is_probed_every_standby_probe_seconds(
    clock: FakeClock,
) -> None:
    """
    A healthy source in a worse tier is read once when standby_probe seconds
    have passed, and not before; what it delivers is mixed in, not credited.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (primary_source, fallback_source) = make(pool, clock, 0, 1)
    supervisor.start()
    try:
        fallback = supervisor.runners[1]
        await pass_startup(primary_source)
        await pass_startup(fallback_source)
        reads = fallback_source.reads
        await clock.advance(STANDBY_PROBE - 0.25)
        assert reads == fallback_source.reads
        await clock.advance(0.25)
        assert reads + 1 == fallback_source.reads
        await deliver(fallback_source, fallback_source.random_block())
        assert 0 == fallback.credited_bits
        await clock.advance(STANDBY_PROBE)
        assert reads + 2 == fallback_source.reads
    finally:
        await supervisor.stop()


async def test_failover_and_failback(clock: FakeClock) -> None:
    """
    When the primary fails the fallback takes over at once; when the primary
    recovers it is preferred again, and both hand-overs are counted.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (primary_source, fallback_source) = make(pool, clock, 0, 1)
    supervisor.start()
    try:
        primary, fallback = supervisor.runners
        await pass_startup(primary_source)
        await pass_startup(fallback_source)
        await deliver(primary_source, SourceError("device unplugged"))
        assert SourceState.FAILED == primary.state
        assert "device unplugged" == primary.reason
        assert 1 == supervisor.active_tier
        assert supervisor.degraded
        # The standby fallback is woken by the hand-over, not by its probe.
        await deliver(fallback_source, fallback_source.random_block())
        assert 8 * BLOCK == fallback.credited_bits
        # jitter 0: the first restart comes after half the initial delay.
        await clock.advance(0.5)
        assert 2 == primary_source.opens
        await pass_startup(primary_source)
        assert 0 == supervisor.active_tier
        assert 2 == supervisor.failovers
        assert not supervisor.degraded
    finally:
        await supervisor.stop()


async def test_backoff_delays_are_exact(clock: FakeClock) -> None:
    """
    A source that keeps failing to open is retried after 1, 2, 4, then 4
    seconds (full jitter at its top), and the restarts are counted; once it
    opens and passes its start-up test the backoff starts over.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (source,) = make(pool, clock, 0, jitter=1.0)
    source.open_error = SourceError("device unplugged")
    supervisor.start()
    try:
        runner = supervisor.runners[0]
        await settle()
        assert 1 == source.opens
        for opens, delay in enumerate((1.0, 2.0, 4.0, 4.0), start=2):
            await clock.advance(delay - 0.25)
            assert opens - 1 == source.opens
            await clock.advance(0.25)
            assert opens == source.opens
        assert 4 == runner.restarts
        assert SourceState.FAILED == runner.state
        source.open_error = None
        await clock.advance(4.0)
        await pass_startup(source)
        assert runner.healthy
        assert 0 == runner.backoff.failures
    finally:
        await supervisor.stop()


async def test_silent_source_is_stalled_when_the_watchdog_expires(
    clock: FakeClock,
) -> None:
    """
    A read that delivers nothing is cancelled exactly when the watchdog
    expires: the source is reported stalled, closed, and reopened after its
    backoff delay.
    """
    pool = EntropyPool(1 << 20)
    supervisor = Supervisor(pool, clock=clock, backoff_initial=2.0, rng=lambda: 0.0)
    source = FakeSource()
    runner = supervisor.add(source, watchdog=5.0)
    supervisor.start()
    try:
        await pass_startup(source)
        await clock.advance(4.75)
        assert runner.healthy
        await clock.advance(0.25)
        assert SourceState.STALLED == runner.state
        assert "delivered nothing for 5 s (watchdog)" == runner.reason
        assert START_WALL + 5.0 == runner.since
        assert (1, 1) == (runner.stalls, source.closes)
        await clock.advance(1.0)
        assert 2 == source.opens
        await pass_startup(source)
        assert runner.healthy
        assert 1 == runner.restarts
    finally:
        await supervisor.stop()


async def test_derived_watchdog() -> None:
    """
    Without a configured watchdog, a source of unknown rate gets 30 s and a
    source of known rate the time 16 KiB take, at least 5 s.
    """
    supervisor = Supervisor(EntropyPool(1 << 20), clock=FakeClock())
    unknown = supervisor.add(FakeSource("unknown"))
    slow_source = FakeSource("slow")
    slow_source.nominal_rate = 1024.0
    fast_source = FakeSource("fast")
    fast_source.nominal_rate = 1 << 20
    slow, fast = supervisor.add(slow_source), supervisor.add(fast_source)
    assert (30.0, 16.0, 5.0) == (unknown.watchdog, slow.watchdog, fast.watchdog)


async def test_optional_missing_device_is_skipped(
    tmp_path: Path, clock: FakeClock
) -> None:
    """
    An optional device that is absent at start-up is skipped with a reason, and
    does not count as the preferred tier.
    """
    pool = EntropyPool(1 << 20)
    supervisor = Supervisor(pool, clock=clock)
    config = DeviceSourceConfig(
        name="hwrng", kind="hwrng", path=tmp_path / "hwrng", optional=True
    )
    runner = supervisor.add(DeviceSource(config), optional=True)
    fallback_source = FakeSource("fallback", 1)
    fallback = supervisor.add(fallback_source)
    supervisor.start()
    try:
        await pass_startup(fallback_source)
        assert runner.skipped
        assert fallback.healthy
        assert SourceState.STOPPED == runner.state
        assert runner.reason.startswith("skipped: cannot open")
        assert not supervisor.degraded
    finally:
        await supervisor.stop()


async def test_full_pool_pauses_reading_until_a_probe_is_due(
    clock: FakeClock,
) -> None:
    """
    A healthy source stops reading while the pool is full, instead of
    discarding input; after standby_probe seconds it is read once anyway, so
    a device that turned stuck while nobody drew is quarantined.
    """
    pool = EntropyPool(4096)
    supervisor, (source,) = make(pool, clock, 0)
    supervisor.start()
    try:
        runner = supervisor.runners[0]
        await pass_startup(source)
        await fill(pool, source)
        reads, credited = source.reads, runner.credited_bits
        await clock.advance(STANDBY_PROBE - 0.25)
        assert reads == source.reads
        await clock.advance(0.25)
        assert reads + 1 == source.reads
        await deliver(source, bytes(BLOCK))
        assert SourceState.QUARANTINED == runner.state
        assert credited == runner.credited_bits
    finally:
        await supervisor.stop()


async def test_nothing_is_credited_before_the_startup_test(clock: FakeClock) -> None:
    """
    The first 1024 bytes of a source are tested, not credited.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (source,) = make(pool, clock, 0)
    supervisor.start()
    try:
        runner = supervisor.runners[0]
        await deliver(source, source.random_block(STARTUP_SAMPLES - 1))
        assert SourceState.STARTING == runner.state
        await deliver(source, source.random_block(1))
        assert runner.healthy
        assert 0 == runner.credited_bits
        await deliver(source, source.random_block())
        assert 8 * BLOCK == runner.credited_bits
    finally:
        await supervisor.stop()


async def test_stuck_source_is_quarantined_and_readmitted(clock: FakeClock) -> None:
    """
    Stuck output is caught by the repetition count test, never credited, the
    fallback takes over; good output again passes a fresh start-up test and
    the source is credited again.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (primary_source, fallback_source) = make(pool, clock, 0, 1)
    supervisor.start()
    try:
        primary, fallback = supervisor.runners
        await pass_startup(primary_source)
        await pass_startup(fallback_source)
        credited = primary.credited_bits
        await deliver(primary_source, bytes(BLOCK))
        assert SourceState.QUARANTINED == primary.state
        assert 1 == primary.health.counters.rct_failures
        assert 1 == supervisor.active_tier
        await deliver(fallback_source, fallback_source.random_block())
        assert 0 < fallback.credited_bits
        assert credited == primary.credited_bits
        await pass_startup(primary_source)
        assert primary.healthy
        assert 0 == supervisor.active_tier
        assert credited < primary.credited_bits
        assert 2 == primary.health.counters.startups_passed
    finally:
        await supervisor.stop()


async def test_repeated_failures_fail_the_source_for_good(clock: FakeClock) -> None:
    """
    A source that keeps failing its tests (three separate incidents within the
    failure window) is marked failed with the reason and time, and is no
    longer read.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (source,) = make(pool, clock, 0)
    supervisor.start()
    try:
        runner = supervisor.runners[0]
        for incident in (1, 2):
            await pass_startup(source)
            await deliver(source, bytes(64))
            assert incident == runner.health.counters.quarantines
        await pass_startup(source)
        credited = runner.credited_bits
        await deliver(source, bytes(64))
        # The third incident fails it instead of quarantining it once more.
        assert SourceState.FAILED == runner.state
        assert 2 == runner.health.counters.quarantines
        assert START_WALL == runner.health.failed_at
        assert runner.reason.startswith("health tests: 3 failures")
        assert credited == runner.credited_bits
        reads = source.reads
        await clock.advance(3600)
        assert reads == source.reads
    finally:
        await supervisor.stop()
    assert SourceState.FAILED == runner.state


async def test_better_tier_takes_over_while_the_pool_is_full(
    clock: FakeClock,
) -> None:
    """
    A preferred source that starts late still passes its start-up test and
    takes over from a fallback that filled the pool while nobody drew.
    """
    pool = EntropyPool(4096)
    supervisor, (primary_source, fallback_source) = make(pool, clock, 0, 1)
    supervisor.start()
    try:
        primary = supervisor.runners[0]
        await pass_startup(fallback_source)
        await fill(pool, fallback_source)
        assert 1 == supervisor.active_tier
        await pass_startup(primary_source)
        assert primary.healthy
        assert 0 == supervisor.active_tier
    finally:
        await supervisor.stop()


async def test_status_reads_the_injected_clock(clock: FakeClock) -> None:
    """
    State stamps are wall time, the rate is measured over the last ten
    seconds and tier time on the monotonic clock, all from the injected
    clock; driver details come from the driver.
    """
    pool = EntropyPool(1 << 20)
    supervisor, (source,) = make(pool, clock, 0)
    supervisor.start()
    try:
        runner = supervisor.runners[0]
        await clock.advance(3.0)
        await pass_startup(source)
        status = runner.status()
        assert START_WALL + 3.0 == status.since
        assert (STARTUP_SAMPLES + BLOCK) / 10 == status.rate
        assert {"opens": 1} == status.details
        await clock.advance(7.0)
        assert {"none": 3.0, "0": 7.0} == supervisor.tier_seconds()
        await clock.advance(3.5)
        assert 0.0 == runner.status().rate
    finally:
        await supervisor.stop()


async def test_a_failing_details_call_does_not_break_status(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A driver bug in details() is logged and the status shows no details.
    """
    supervisor, (source,) = make(EntropyPool(1 << 20), clock, 0)

    def broken() -> dict[str, Any]:
        raise RuntimeError("driver bug")

    monkeypatch.setattr(source, "details", broken)
    with capture_logs() as logs:
        assert {} == supervisor.runners[0].status().details
    assert ["source_details_failed"] == [entry["event"] for entry in logs]


class SlowToClose(FakeSource):
    """
    A source whose close takes until the test releases it, and which a
    second cancellation cannot hurry (as a device finishing a USB transfer).
    """

    def __init__(self) -> None:
        super().__init__()
        self.closing = asyncio.Event()
        self.release = asyncio.Event()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.closing.set()
        while not self.release.is_set():
            # Deliberately deaf to cancellation: that is the device's behaviour
            # under test; the cancellation that started the close still
            # propagates once this returns.
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()
        self.closes += 1


async def test_a_cancelled_stop_finishes_cleanup_then_raises(
    clock: FakeClock,
) -> None:
    """
    stop() cancelled while a source is still closing waits for the close to
    finish, then raises CancelledError instead of swallowing it.
    """
    supervisor = Supervisor(EntropyPool(1 << 20), clock=clock)
    source = SlowToClose()
    runner = supervisor.add(source)
    supervisor.start()
    await settle()
    stopping = asyncio.create_task(supervisor.stop())
    await source.closing.wait()
    stopping.cancel()
    await settle()
    assert not stopping.done()
    source.release.set()
    await asyncio.wait([stopping])
    assert stopping.cancelled()
    assert 1 == source.closes
    assert SourceState.STOPPED == runner.state


async def test_a_cancelled_runner_closes_its_source_and_reraises(
    clock: FakeClock,
) -> None:
    """
    Cancelling a runner closes the driver, reports it stopped, and lets the
    cancellation through.
    """
    supervisor = Supervisor(EntropyPool(1 << 20), clock=clock)
    source = FakeSource()
    runner = supervisor.add(source)
    task = asyncio.create_task(runner.run())
    await pass_startup(source)
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert 1 == source.closes
    assert SourceState.STOPPED == runner.state


async def test_stop_waits_for_every_runner(clock: FakeClock) -> None:
    """
    After stop() every source is closed and reported stopped, including one
    waiting out a backoff delay.
    """
    supervisor, (healthy_source, failing_source) = make(
        EntropyPool(1 << 20), clock, 0, 1
    )
    failing_source.open_error = SourceError("device unplugged")
    supervisor.start()
    await pass_startup(healthy_source)
    await supervisor.stop()
    assert 1 == healthy_source.closes
    assert [SourceState.STOPPED, SourceState.FAILED] == [
        runner.state for runner in supervisor.runners
    ]
    assert 0 == clock.pending


def test_backoff_grows_and_is_bounded() -> None:
    """
    Delays double from the initial value up to the maximum, with jitter below it.
    """
    backoff = Backoff(initial=1.0, maximum=8.0, rng=lambda: 1.0)
    assert [1.0, 2.0, 4.0, 8.0, 8.0] == [backoff.next_delay() for _ in range(5)]
    low = Backoff(initial=1.0, maximum=8.0, rng=lambda: 0.0)
    assert [0.5, 1.0, 2.0] == [low.next_delay() for _ in range(3)]


async def test_fallback_fills_to_the_low_watermark_while_a_better_tier_starts(
    clock: FakeClock,
) -> None:
    """
    While the preferred source is in its start-up test, the healthy fallback
    fills the pool only up to the low watermark (plus one read) and refills it
    as clients draw; once the preferred source is healthy, what the fallback
    left buffered is served, then only the preferred tier's output.
    """
    pool = EntropyPool(64 * 1024)
    supervisor, (primary_source, fallback_source) = make(pool, clock, 0, 1)
    supervisor.start()
    try:
        primary = supervisor.runners[0]
        await deliver(primary_source, primary_source.random_block(BLOCK // 2))
        assert SourceState.STARTING == primary.state
        await pass_startup(fallback_source)
        assert 1 == supervisor.active_tier
        await feed_until_paused(fallback_source)
        assert LOW_WATERMARK <= pool.level < LOW_WATERMARK + BLOCK_OUTPUT
        drawn = len(pool.read_nowait(pool.level))
        await clock.advance(1.0)
        await feed_until_paused(fallback_source)
        buffered = pool.level
        assert LOW_WATERMARK <= buffered < LOW_WATERMARK + BLOCK_OUTPUT

        await pass_startup(primary_source)
        assert 0 == supervisor.active_tier
        stats = pool.stats()
        # The first block after the hand-over may still owe most of its
        # credit to the fallback's last read, and count as the fallback's.
        left = stats.level_by_tier[1]
        assert buffered <= left <= buffered + BLOCK_BYTES
        assert {0, 1} == set(stats.level_by_tier)
        assert left == len(pool.read_nowait(left))
        assert drawn + left == pool.stats().bytes_out_by_tier[1]
        rest = len(pool.read_nowait(pool.level))
        assert 0 < rest
        stats = pool.stats()
        assert {0: rest, 1: drawn + left} == dict(stats.bytes_out_by_tier)
        served, still = supervisor.tier_output()
        assert ({"0": rest, "1": drawn + left}, 0) == (served, sum(still.values()))
    finally:
        await supervisor.stop()


async def test_fallback_fills_the_pool_when_the_better_tier_has_failed(
    clock: FakeClock,
) -> None:
    """
    With the preferred source failed, nothing better is on its way: the
    fallback fills the whole pool, availability first.
    """
    pool = EntropyPool(16 * 1024)
    supervisor, (primary_source, fallback_source) = make(pool, clock, 0, 1)
    primary_source.open_error = SourceError("device unplugged")
    supervisor.start()
    try:
        await pass_startup(fallback_source)
        assert SourceState.FAILED == supervisor.runners[0].state
        await fill(pool, fallback_source)
        assert not pool.has_space
    finally:
        await supervisor.stop()


async def test_a_better_tier_stalling_in_its_startup_test_lifts_the_gate(
    clock: FakeClock,
) -> None:
    """
    A preferred source that goes silent in its start-up test is stalled by
    its watchdog; the fallback, held at the low watermark until then, fills
    the pool at once, without waiting for a client to draw.
    """
    pool = EntropyPool(16 * 1024)
    supervisor = Supervisor(
        pool,
        clock=clock,
        standby_probe=STANDBY_PROBE,
        low_watermark=LOW_WATERMARK,
        rng=lambda: 0.0,
    )
    primary_source, fallback_source = FakeSource("s0", 0), FakeSource("s1", 1)
    primary = supervisor.add(primary_source, watchdog=5.0)
    supervisor.add(fallback_source, watchdog=60.0)
    supervisor.start()
    try:
        await deliver(primary_source, primary_source.random_block(BLOCK // 2))
        await pass_startup(fallback_source)
        await feed_until_paused(fallback_source)
        assert pool.level < LOW_WATERMARK + BLOCK_OUTPUT
        await clock.advance(5.0)
        assert SourceState.STALLED == primary.state
        await fill(pool, fallback_source)
        assert not pool.has_space
    finally:
        await supervisor.stop()


@pytest.mark.parametrize(
    ("ending", "state"),
    [
        (SourceError("device unplugged"), SourceState.FAILED),
        (None, SourceState.STOPPED),
    ],
)
async def test_rate_is_zero_once_a_source_is_closed(
    clock: FakeClock, ending: Exception | None, state: SourceState
) -> None:
    """
    A source that fails or stops reports a rate of 0 at once, not the rate
    it had in the seconds before.
    """
    supervisor, (source,) = make(EntropyPool(1 << 20), clock, 0)
    supervisor.start()
    runner = supervisor.runners[0]
    try:
        await pass_startup(source)
        await clock.advance(1.0)
        assert 0 < runner.status().rate
        if ending is not None:
            await deliver(source, ending)
    finally:
        await supervisor.stop()
    assert state == runner.state
    assert 0.0 == runner.status().rate


async def test_a_stalled_source_reports_no_rate(clock: FakeClock) -> None:
    """
    A source cut off by its watchdog reports a rate of 0 although it
    delivered within the last rate window.
    """
    supervisor = Supervisor(EntropyPool(1 << 20), clock=clock, rng=lambda: 0.0)
    source = FakeSource()
    runner = supervisor.add(source, watchdog=5.0)
    supervisor.start()
    try:
        await pass_startup(source)
        await clock.advance(5.0)
        assert SourceState.STALLED == runner.state
        assert 0.0 == runner.status().rate
    finally:
        await supervisor.stop()


async def test_record_raw_is_owner_only(tmp_path: Path, clock: FakeClock) -> None:
    """
    The raw recording is created 0600 in a directory created 0700, and holds
    every raw byte the source delivered.
    """
    path = tmp_path / "raw" / "s.bin"
    supervisor = Supervisor(EntropyPool(1 << 20), clock=clock)
    source = FakeSource()
    supervisor.add(source, record_raw=path)
    supervisor.start()
    try:
        data = source.random_block(STARTUP_SAMPLES + BLOCK)
        await deliver(source, data)
    finally:
        await supervisor.stop()
    assert 0o700 == stat.S_IMODE(path.parent.stat().st_mode)
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)
    assert data == path.read_bytes()


async def test_record_raw_tightens_a_file_others_could_read(
    tmp_path: Path, clock: FakeClock
) -> None:
    """
    An existing recording readable by others is tightened to 0600, appended
    to, and the change is logged with the path.
    """
    path = tmp_path / "s.bin"
    path.write_bytes(b"old")
    path.chmod(0o644)
    supervisor = Supervisor(EntropyPool(1 << 20), clock=clock)
    source = FakeSource()
    supervisor.add(source, record_raw=path)
    with capture_logs() as logs:
        supervisor.start()
        try:
            await deliver(source, b"new")
        finally:
            await supervisor.stop()
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)
    assert b"oldnew" == path.read_bytes()
    tightened = [
        entry for entry in logs if entry["event"] == "record_raw_mode_tightened"
    ]
    assert [(str(path), "0644")] == [
        (entry["path"], entry["previous"]) for entry in tightened
    ]


def state_of(runner: SourceRunner) -> SourceState:
    """
    Read the state afresh (mypy would keep an earlier narrowing of it).
    """
    return runner.state


async def test_a_fips_hold_keeps_its_tier_active(clock: FakeClock) -> None:
    """
    A failed FIPS block holds the hardware source (quarantined, uncredited)
    until its next block passes, but its tier stays the active one: the
    fallback is not credited and no failover is counted for a routine hold.
    """
    supervisor = Supervisor(EntropyPool(1 << 20), clock=clock)
    hardware, fallback = FakeSource("hw", 0), FakeSource("fallback", 1)
    held = supervisor.add(hardware, health=HealthConfig(fips=True))
    standby = supervisor.add(fallback)
    supervisor.start()
    try:
        await deliver(hardware, random_bytes(2 * FIPS_BLOCK_BYTES, 1))
        await pass_startup(fallback)
        assert (0, SourceState.HEALTHY) == (supervisor.active_tier, state_of(held))
        failovers, fallback_credit = supervisor.failovers, standby.credited_bits
        await deliver(hardware, monobit_failing_bytes(FIPS_BLOCK_BYTES, 2))
        assert SourceState.QUARANTINED == state_of(held)
        assert 0 == supervisor.active_tier
        await deliver(fallback, fallback.random_block(BLOCK))
        assert fallback_credit == standby.credited_bits
        await deliver(hardware, random_bytes(FIPS_BLOCK_BYTES, 3))
        assert SourceState.HEALTHY == state_of(held)
        assert failovers == supervisor.failovers
    finally:
        await supervisor.stop()


async def test_a_failing_recording_costs_the_recording_not_the_source(
    clock: FakeClock,
) -> None:
    """
    When the recording's disk is full (``/dev/full`` fails every flush), the
    recording stops with one logged error and the source goes on being
    tested and credited.
    """
    supervisor = Supervisor(EntropyPool(1 << 20), clock=clock)
    source = FakeSource()
    runner = supervisor.add(source, record_raw=Path("/dev/full"))
    with capture_logs() as logs:
        supervisor.start()
        try:
            for _ in range(6):
                await deliver(source, source.random_block(4096))
            assert SourceState.HEALTHY == runner.state
            assert runner.credited_bits > 0
        finally:
            await supervisor.stop()
    failed = [entry for entry in logs if entry["event"] == "record_raw_failed"]
    assert 1 == len(failed)
    assert "/dev/full" == failed[0]["path"]


async def test_a_pool_without_room_for_a_block_pauses_its_source(
    clock: FakeClock,
) -> None:
    """
    A pool a few bytes short of full has no room for another block: the
    source pauses there instead of reading on and losing the credit.
    """
    pool = EntropyPool(4096 + BLOCK_BYTES // 2)
    supervisor, (source,) = make(pool, clock, 0)
    supervisor.start()
    try:
        await pass_startup(source)
        await fill(pool, source)
        assert 0 < pool.level < pool.capacity
        reads = source.reads
        await deliver(source, source.random_block())
        assert reads == source.reads
    finally:
        await supervisor.stop()
