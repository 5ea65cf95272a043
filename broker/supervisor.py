"""
The supervisor runs every source as its own task and decides whose bytes are
credited into the pool.

Theory of operation
-------------------
Each source gets a `SourceRunner`: a task that opens the driver, reads from it,
and on any error closes it, waits a backoff delay (exponential, with jitter,
bounded) and tries again. One bad device never disturbs its siblings.

Sources are grouped in tiers by ``priority`` (lower is better). The *active*
tier is the best one with a healthy source; only sources in the active tier
are credited. Sources in worse tiers run as hot standby: they are opened and
read now and then (every ``standby_probe`` seconds) so that a broken fallback is
noticed before it is needed; their bytes are mixed into the pool without credit.
When the active tier loses its last healthy source, the next tier becomes active
at once and its sources read at full speed; the output buffer covers the
hand-over. When a better tier recovers it takes over again.

A source configured ``optional`` whose device is absent at start-up is skipped
(state ``stopped``) with a warning instead of being retried forever.
"""

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import structlog

from broker.errors import SourceError
from broker.pool import EntropyPool
from broker.status import SourceStatus
from sources.base import Source, SourceState

log = structlog.get_logger("ebroker.supervisor")

_RATE_WINDOW = 10.0


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


class SourceRunner:
    """
    Keeps one source running and reports its state.
    """

    def __init__(
        self,
        source: Source,
        supervisor: "Supervisor",
        *,
        optional: bool = False,
        record_raw: Path | None = None,
    ) -> None:
        self.source = source
        self.name = source.name
        self.priority = source.priority
        self._supervisor = supervisor
        self._optional = optional
        self._record_path = record_raw
        self.state = SourceState.STARTING
        self.reason = "starting"
        self.since = time.time()
        self.bytes_in = 0
        self.credited_bits = 0
        self.restarts = 0
        self.skipped = False
        self.backoff = Backoff(supervisor.backoff_initial, supervisor.backoff_max)
        self._meter = RateMeter()
        self._log = log.bind(source=source.name, kind=source.kind)

    def set_state(self, state: SourceState, reason: str) -> None:
        if state == self.state and reason == self.reason:
            return
        previous = self.state
        self.state = state
        self.reason = reason
        self.since = time.time()
        event = "source_state_changed"
        if state in (SourceState.FAILED, SourceState.STALLED, SourceState.QUARANTINED):
            self._log.warning(
                event, previous=str(previous), state=str(state), reason=reason
            )
        else:
            self._log.info(
                event, previous=str(previous), state=str(state), reason=reason
            )
        self._supervisor.source_changed()

    @property
    def healthy(self) -> bool:
        return self.state == SourceState.HEALTHY

    async def run(self) -> None:
        first_attempt = True
        record: BinaryIO | None = None
        try:
            if self._record_path is not None:
                record = self._record_path.open("ab")
            while True:
                try:
                    await self._run_once(record)
                except (SourceError, OSError) as exc:
                    if first_attempt and self._optional and self.bytes_in == 0:
                        self.skipped = True
                        self._log.warning("source_skipped", reason=str(exc))
                        self.set_state(SourceState.STOPPED, f"skipped: {exc}")
                        return
                    self.set_state(SourceState.FAILED, str(exc))
                except Exception as exc:  # noqa: BLE001 - a driver bug must not kill siblings
                    self._log.error("source_crashed", exc_info=True)
                    self.set_state(SourceState.FAILED, f"driver error: {exc!r}")
                first_attempt = False
                delay = self.backoff.next_delay()
                self._log.info("source_restart_scheduled", delay=round(delay, 3))
                await asyncio.sleep(delay)
                self.restarts += 1
        finally:
            if record is not None:
                record.close()
            if not self.skipped:
                self.set_state(SourceState.STOPPED, "stopped")

    async def _run_once(self, record: BinaryIO | None) -> None:
        pool = self._supervisor.pool
        async with self.source as source:
            while True:
                await pool.wait_for_space()
                if not self._supervisor.is_active(self) and self.healthy:
                    await self._supervisor.wait_until_needed(self)
                    await pool.wait_for_space()
                data = await source.read()
                if not data:
                    raise SourceError("driver returned no data")
                now = time.monotonic()
                self.bytes_in += len(data)
                self._meter.add(now, len(data))
                if record is not None:
                    record.write(data)
                if self.state != SourceState.HEALTHY:
                    self.backoff.reset()
                    self.set_state(SourceState.HEALTHY, "delivering")
                if self._supervisor.is_active(self):
                    pool.add(data, source.credit)
                    self.credited_bits += int(len(data) * source.credit)
                else:
                    pool.mix(data)

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
            rate=self._meter.rate(time.monotonic()),
            restarts=self.restarts,
            feeding=self._supervisor.is_active(self) and self.healthy,
        )


class Supervisor:
    """
    Runs the source tasks and tracks which tier feeds the pool.
    """

    def __init__(
        self,
        pool: EntropyPool,
        *,
        standby_probe: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.pool = pool
        self.standby_probe = standby_probe
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.runners: list[SourceRunner] = []
        self.active_tier: int | None = None
        self.failovers = 0
        self._tier_changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def add(
        self, source: Source, *, optional: bool = False, record_raw: Path | None = None
    ) -> SourceRunner:
        runner = SourceRunner(source, self, optional=optional, record_raw=record_raw)
        self.runners.append(runner)
        return runner

    def start(self) -> None:
        for runner in self.runners:
            task = asyncio.create_task(runner.run(), name=f"source:{runner.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.source_changed()

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel(msg="broker shutting down")
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- tiers ------------------------------------------------------------------

    def source_changed(self) -> None:
        healthy_tiers = [runner.priority for runner in self.runners if runner.healthy]
        tier = min(healthy_tiers) if healthy_tiers else None
        if tier == self.active_tier:
            return
        previous, self.active_tier = self.active_tier, tier
        if previous is not None:
            self.failovers += 1
        log.info("active_tier_changed", previous=previous, tier=tier)
        self._tier_changed.set()
        self._tier_changed = asyncio.Event()

    def is_active(self, runner: SourceRunner) -> bool:
        # With no healthy source at all, anyone who delivers may claim the tier.
        return self.active_tier is None or runner.priority <= self.active_tier

    async def wait_until_needed(self, runner: SourceRunner) -> None:
        """
        Park a standby source until its tier becomes active or a probe is due.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.standby_probe):
                while not self.is_active(runner):
                    await self._tier_changed.wait()

    @property
    def best_tier(self) -> int | None:
        tiers = [runner.priority for runner in self.runners if not runner.skipped]
        return min(tiers) if tiers else None

    @property
    def degraded(self) -> bool:
        return self.active_tier is not None and self.active_tier != self.best_tier

    def any_healthy(self) -> bool:
        return any(runner.healthy for runner in self.runners)

    def statuses(self) -> list[SourceStatus]:
        return [runner.status() for runner in self.runners]
