"""
One source kept running: opened, read, health-tested, restarted with backoff.

Theory of operation
-------------------
Each source gets a `SourceRunner`: a task that opens the driver, reads from it,
and on any error closes it, waits a backoff delay (exponential, with jitter,
bounded) and tries again. One bad device never disturbs its siblings.

Every byte a source delivers goes through that source's continuous health
tests (`broker.health.SourceHealth`) before anything is credited. A source in
its start-up test or in quarantine keeps being read, but its bytes are mixed in
with no credit; it is re-admitted once a fresh start-up test passes. Such a
source is read even while the pool is full (its bytes need no room there), so
a better tier can pass its start-up test and take over while a fallback has
filled the pool and no client draws. A healthy source waits for room, but at
most ``standby_probe`` seconds: then it is read once anyway (mixed in without
credit), so a device that dies while the pool is full is noticed. Room is what
the supervisor grants: the whole pool, or only up to the low watermark while a
better tier is in its start-up test. A driver that can read less (`SizedRead`:
getrandom, whose reads never wait) is asked for just the input that backs that
room (and a start-up test's worth, if it has yet to pass one), so a read never
overshoots the room nor is mostly dropped; once such a source has filled the
pool it rests until a sixteenth of it (at most 64 KiB) is drawn: it is read
once per that much output, not once per withdrawal. After each read the loop
gets a turn: a read that did not wait must not hold up the sinks.

A source whose tests fail too often is ``failed`` for good (restart the broker
to clear it). A watchdog bounds each read: a source that delivers nothing for
longer than its ``watchdog`` (derived from its nominal rate unless
configured) is ``stalled``: the read is cancelled, the driver closed and
restarted. The watchdog is the only bound on a read; drivers keep none of
their own.

The rate a source reports is what it delivered over the last ten seconds,
and 0 from the moment its driver is closed (failed, stalled, stopped). A raw
recording (``record_raw``) is opened owner-only (`broker.recording`).

Which tier is credited, and when a standby source is read, is the
supervisor's decision (`broker.supervisor`); a runner asks it through `Tiers`.
Every wait and every time stamp goes through the injected `broker.clock.Clock`.

States (`broker.status.SourceState`) and who moves them: the runner, from the
health state after each read (``starting``, ``healthy``, ``quarantined``,
``failed`` for good), and from what ended a run (``stalled`` by the watchdog,
``failed`` by a driver error, ``stopped`` when the task ends or an optional
device is absent).
"""

import asyncio
import math
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from broker.clock import Clock
from broker.errors import SourceError, SourceQuarantined, SourceStalled
from broker.health import (
    STARTUP_SAMPLES,
    HealthConfig,
    HealthEvent,
    HealthState,
    SourceHealth,
)
from broker.pool import BLOCK_BITS, BLOCK_BYTES, RESERVE_BITS, EntropyPool
from broker.recording import RawRecording
from broker.status import SourceState, SourceStatus
from sources.base import Source

_ABSENT = (FileNotFoundError, NotADirectoryError)
"""What opening a device that is not there raises."""

log = structlog.get_logger("ebroker.supervisor")

_RATE_WINDOW = 10.0
# Watchdog when a source's rate is unknown, and the floor when it is known.
_WATCHDOG_DEFAULT = 30.0
_WATCHDOG_FLOOR = 5.0
# With a known rate, allow this many bytes' worth of time before calling a stall.
_WATCHDOG_BYTES = 16384
# States in which the driver is closed: the source delivers nothing.
_CLOSED_STATES = frozenset(
    {SourceState.FAILED, SourceState.STALLED, SourceState.STOPPED}
)
# The most a pool filled by a sized reader must drain before it is read again.
_RESUME_MOST = 64 * 1024
# Credit behind one output block, in thousandths of a bit as the pool counts it.
_BLOCK_MILLIBITS = (BLOCK_BITS + RESERVE_BITS) * 1000


class SourceFailedForGood(SourceError):
    """
    The health tests failed the source permanently; it is not restarted.
    """


def derive_watchdog(nominal_rate: float | None) -> float:
    """
    How long a read may take before the source counts as stalled.
    """
    if not nominal_rate:
        return _WATCHDOG_DEFAULT
    return max(_WATCHDOG_FLOOR, _WATCHDOG_BYTES / nominal_rate)


class Backoff:
    """
    Exponential backoff with full jitter, bounded by ``maximum``.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2**self.failures))
        self.failures += 1
        # Half fixed, half random: restarts of many sources spread out, yet a
        # delay never collapses to zero.
        return float(ceiling / 2 + self._rng() * ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


class RateMeter:
    """
    Bytes per second over a sliding window.

    A source that delivers nothing for a whole window reads 0; a source that
    is closed (stopped, failed, stalled) is `clear`-ed at once, so a dead
    device never shows the rate it had before it died.
    """

    def __init__(self, window: float = _RATE_WINDOW) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, count: int) -> None:
        self._samples.append((now, count))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self._window:
            self._samples.popleft()

    def rate(self, now: float) -> float:
        self._trim(now)
        return sum(count for _, count in self._samples) / self._window

    def clear(self) -> None:
        self._samples.clear()


class Tiers(Protocol):
    """
    What a runner asks of the supervisor that runs it.
    """

    @property
    def pool(self) -> EntropyPool:
        """
        The pool the runner's bytes go into.
        """
        ...

    @property
    def standby_probe(self) -> float:
        """
        Seconds a healthy source may stay unread while paused or on standby.
        """
        ...

    def is_active(self, runner: "SourceRunner") -> bool:
        """
        Whether ``runner``'s tier is credited right now.
        """
        ...

    def has_room(self, runner: "SourceRunner") -> bool:
        """
        Whether ``runner`` may add credited bytes to the pool now.
        """
        ...

    def fill_limit(self, runner: "SourceRunner") -> int:
        """
        The pool level up to which ``runner`` may add credited bytes.
        """
        ...

    async def wait_for_room(self, runner: "SourceRunner") -> None:
        """
        Return once ``runner`` may add credited bytes to the pool.
        """
        ...

    async def wait_until_needed(self, runner: "SourceRunner") -> None:
        """
        Return when ``runner``'s tier becomes active or a standby probe is due.
        """
        ...

    def source_changed(self) -> None:
        """
        A runner's state changed: the active tier may have to move.
        """
        ...


@runtime_checkable
class SizedRead(Protocol):
    """
    A driver that can read less than its usual amount when asked to.
    """

    async def read_up_to(self, limit: int) -> bytes:
        """
        Like `Source.read`, but return at most ``limit`` bytes (limit ≥ 1).
        """
        ...


class SourceRunner:
    """
    Keeps one source running and reports its state.

    Args:
        source: the driver.
        tiers: the supervisor deciding whose bytes are credited.
        clock: time for backoff, the watchdog, probes, rates and stamps.
        backoff: restart delays.
        optional: skip the source (state ``stopped``) when its first open fails.
        record_raw: append every raw byte to this file.
        health: health-test settings (defaults when ``None``).
        watchdog: seconds a read may take (derived from the nominal rate when
            ``None``).
    """

    def __init__(
        self,
        source: Source,
        tiers: Tiers,
        *,
        clock: Clock,
        backoff: Backoff,
        optional: bool = False,
        record_raw: Path | None = None,
        health: HealthConfig | None = None,
        watchdog: float | None = None,
    ) -> None:
        self.source = source
        self.name = source.name
        self.priority = source.priority
        self._tiers = tiers
        self._clock = clock
        self._optional = optional
        self.state = SourceState.STARTING
        self.reason = "starting"
        self.since = clock.time()
        self.bytes_in = 0
        self.credited_bits = 0
        self.restarts = 0
        self.skipped = False
        self.backoff = backoff
        self.health = SourceHealth(health or HealthConfig(), source.credit)
        self.watchdog = watchdog or derive_watchdog(source.nominal_rate)
        self.transitions = 0
        self.stalls = 0
        self._opened_once = False
        self._meter = RateMeter()
        # Input bytes that back one output block at this source's credit
        # (None: never credited, so reads need no bound).
        millibits = math.floor(source.credit * 1000)
        self._block_input = -(-_BLOCK_MILLIBITS // millibits) if millibits else None
        self._read_up_to = source.read_up_to if isinstance(source, SizedRead) else None
        capacity = tiers.pool.capacity
        self._resume = min(capacity // 16, _RESUME_MOST) if self._read_up_to else 0
        self._filled = False
        self._log = log.bind(source=source.name, kind=source.kind)
        self._recording = (
            RawRecording(record_raw, self._log) if record_raw is not None else None
        )

    def set_state(self, state: SourceState, reason: str) -> None:
        if state == self.state and reason == self.reason:
            return
        previous = self.state
        self.state = state
        self.reason = reason
        self.since = self._clock.time()
        self.transitions += 1
        if state in _CLOSED_STATES:
            # What a source read before it closed says nothing of what it
            # delivers now: nothing.
            self._meter.clear()
        event = "source_state_changed"
        if state in (SourceState.FAILED, SourceState.STALLED, SourceState.QUARANTINED):
            self._log.warning(
                event, previous=str(previous), state=str(state), reason=reason
            )
        else:
            self._log.info(
                event, previous=str(previous), state=str(state), reason=reason
            )
        self._tiers.source_changed()

    @property
    def healthy(self) -> bool:
        return self.state == SourceState.HEALTHY

    @property
    def holding(self) -> bool:
        """
        Quarantined only by a FIPS hold: uncredited until its next block
        passes, yet still the device its tier relies on.
        """
        return self.state == SourceState.QUARANTINED and self.health.holding

    async def run(self) -> None:
        """
        Run the source until it fails for good, is skipped, or the task is
        cancelled (the cancellation propagates once the driver is closed).
        """
        first_attempt = True
        try:
            if self._recording is not None:
                self._recording.open()
            while True:
                try:
                    await self._run_once()
                except SourceFailedForGood:
                    return
                except SourceQuarantined as exc:
                    self.set_state(SourceState.QUARANTINED, str(exc))
                except SourceStalled as exc:
                    self.stalls += 1
                    self.set_state(SourceState.STALLED, str(exc))
                except (SourceError, OSError) as exc:
                    if first_attempt and self._optional and self.bytes_in == 0:
                        self.skipped = True
                        # An optional device that is simply absent is what
                        # optional means; one there but unusable is a problem.
                        absent = isinstance(exc, _ABSENT) or isinstance(
                            exc.__cause__, _ABSENT
                        )
                        emit = self._log.info if absent else self._log.warning
                        emit("source_skipped", reason=str(exc))
                        self.set_state(SourceState.STOPPED, f"skipped: {exc}")
                        return
                    self.set_state(SourceState.FAILED, str(exc))
                except Exception as exc:  # noqa: BLE001 - a driver bug must not kill siblings
                    self._log.error("source_crashed", exc_info=True)
                    self.set_state(SourceState.FAILED, f"driver error: {exc!r}")
                first_attempt = False
                delay = self.backoff.next_delay()
                self._log.info("source_restart_scheduled", delay=round(delay, 3))
                await self._clock.sleep(delay)
                self.restarts += 1
        finally:
            if self._recording is not None:
                self._recording.close()
            if not self.skipped and self.state != SourceState.FAILED:
                self.set_state(SourceState.STOPPED, "stopped")

    async def _run_once(self) -> None:
        async with self.source as source:
            if self._opened_once:
                self._log_health_event(self.health.reset(self._clock.time()))
            self._opened_once = True
            self._apply_health_state()
            while True:
                probe = False
                if self.healthy:
                    if not self._tiers.is_active(self):
                        await self._tiers.wait_until_needed(self)
                    probe = not await self._room_or_probe()
                limit = None if probe else self._read_limit()
                # A source in its start-up test or in quarantine is read even
                # while the pool is full: its bytes are only mixed in, so they
                # need no room, and it must get through its start-up test to
                # take over from a fallback tier that filled the pool.
                try:
                    async with self._clock.timeout(self.watchdog):
                        if limit is not None and self._read_up_to is not None:
                            data = await self._read_up_to(limit)
                        else:
                            data = await source.read()
                except TimeoutError:
                    raise SourceStalled(
                        f"delivered nothing for {self.watchdog:g} s (watchdog)"
                    ) from None
                if not data:
                    raise SourceError("driver returned no data")
                self._absorb(data, probe=probe)
                # A read that did not wait gave the loop no turn: give it one.
                await asyncio.sleep(0)

    async def _room_or_probe(self) -> bool:
        """
        Wait for room in the pool, at most ``standby_probe`` seconds. Room is
        what the supervisor grants this tier: the whole pool, or only up to the
        low watermark while a better tier is in its start-up test.

        A healthy source paused by a full pool is still read that often, as a
        standby one is, so that a device that died while no client drew (an
        unplugged key, a stuck generator) is reported and failed over from
        before the pool runs dry, not when it does.

        Returns:
            True when there is room; False when a probe read is due.
        """
        tiers = self._tiers
        if not self._resting() and tiers.has_room(self):
            return True  # the usual case: no timer to arm
        try:
            async with self._clock.timeout(tiers.standby_probe):
                await tiers.wait_for_room(self)
                if self._resting():
                    pool = tiers.pool
                    await pool.wait_for_level_below(pool.capacity - self._resume + 1)
        except TimeoutError:
            return tiers.has_room(self)
        return True

    def _resting(self) -> bool:
        """
        Whether a source that reads in sized pieces, having filled the pool,
        still waits for a sixteenth of it to be drawn: it is then read about
        once per that much output, not once per withdrawal.
        """
        if not self._resume:
            return False
        pool = self._tiers.pool
        room = pool.capacity - pool.level
        if room < BLOCK_BYTES:
            self._filled = True
        elif room >= self._resume:
            self._filled = False
        return self._filled

    def _read_limit(self) -> int | None:
        """
        Input that backs the output the pool has room for (at least a block
        when healthy; plus a start-up test's worth when not yet): what a read
        may credit. None: no bound.
        """
        if self._block_input is None:
            return None
        room = self._tiers.fill_limit(self) - self._tiers.pool.level
        blocks = max(0, -(-room // BLOCK_BYTES))
        if self.healthy:
            return max(1, blocks) * self._block_input
        return STARTUP_SAMPLES + blocks * self._block_input

    def _absorb(self, data: bytes, *, probe: bool = False) -> None:
        pool = self._tiers.pool
        self.bytes_in += len(data)
        self._meter.add(self._clock.monotonic(), len(data))
        if self._recording is not None:
            self._recording.write(data)
        verdict = self.health.feed(data, self._clock.time())
        for event in verdict.events:
            self._log_health_event(event)
        self._apply_health_state()
        # A probe of a full pool is mixed in: crediting it would overfill it.
        active = self._tiers.is_active(self) and not probe
        creditable = verdict.creditable if active else 0
        if creditable < len(data):
            pool.mix(data[: len(data) - creditable])
        if creditable:
            pool.add(
                data[len(data) - creditable :], self.source.credit, tier=self.priority
            )
            self.credited_bits += int(creditable * self.source.credit)

    def _apply_health_state(self) -> None:
        state = self.health.state
        if state is HealthState.HEALTHY:
            if self.state != SourceState.HEALTHY:
                self.backoff.reset()
            self.set_state(SourceState.HEALTHY, "delivering")
        elif state is HealthState.STARTUP:
            self.set_state(
                SourceState.STARTING,
                f"start-up health test over {STARTUP_SAMPLES} bytes",
            )
        elif state is HealthState.QUARANTINED:
            self.set_state(SourceState.QUARANTINED, self.health.reason)
        else:
            self.set_state(SourceState.FAILED, f"health tests: {self.health.reason}")
            raise SourceFailedForGood(self.health.reason)

    def _log_health_event(self, event: HealthEvent | None) -> None:
        if event is None:
            return
        if event.from_state == event.to_state:
            # A quarantined source failing again (a stuck one does so in every
            # APT window, thousands of times a second on a fast device): not a
            # transition, and counted in the health counters; a warning each
            # time would flood the log.
            self._log.debug(
                "health_still_failing",
                state=event.to_state.value,
                reason=event.reason,
                position=event.position,
            )
            return
        # A passed start-up test (every source at every start) and a FIPS hold,
        # which comes and goes on a healthy source, are routine; a warning each
        # time would teach operators to ignore the ones that matter.
        routine = event.hold or event.to_state is HealthState.HEALTHY
        emit = self._log.info if routine else self._log.warning
        emit(
            "health_transition",
            previous=event.from_state.value,
            state=event.to_state.value,
            reason=event.reason,
            position=event.position,
        )

    def status(self) -> SourceStatus:
        return SourceStatus(
            name=self.name,
            kind=self.source.kind,
            priority=self.priority,
            state=str(self.state),
            reason=self.reason,
            since=self.since,
            bytes_in=self.bytes_in,
            credited_bits=self.credited_bits,
            rate=self._meter.rate(self._clock.monotonic()),
            restarts=self.restarts,
            feeding=self._tiers.is_active(self) and self.healthy,
            health=self._health_summary(),
            details=self._details(),
        )

    def _health_summary(self) -> dict[str, Any]:
        counters = self.health.counters
        return {
            "state": self.health.state.value,
            "reason": self.health.reason,
            "failed_at": self.health.failed_at,
            "transitions": self.transitions,
            "stalls": self.stalls,
            "watchdog": self.watchdog,
            "rct_cutoff": self.health.rct.cutoff,
            "apt_cutoff": self.health.apt.cutoff,
            "samples_tested": counters.samples_tested,
            "rct_failures": counters.rct_failures,
            "apt_failures": counters.apt_failures,
            "repeat_failures": counters.repeat_failures,
            "fips_blocks": counters.fips_blocks,
            "fips_failures": counters.fips_failures,
            "startups_passed": counters.startups_passed,
            "quarantines": counters.quarantines,
        }

    def _details(self) -> dict[str, Any]:
        try:
            return dict(self.source.details())
        except Exception:  # noqa: BLE001 - a status page must not die of a driver bug
            self._log.error("source_details_failed", exc_info=True)
            return {}
