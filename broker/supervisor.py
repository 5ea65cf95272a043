"""
The supervisor runs every source as its own task and decides whose bytes are
credited into the pool.

Theory of operation
-------------------
Each source is kept running by a `broker.runner.SourceRunner` (open, read,
health-test, restart with backoff, watchdog); the supervisor starts and stops
those tasks and owns the one decision they share: which tier is credited.

Sources are grouped in tiers by ``priority`` (lower is better). The *active*
tier is the best one with a healthy source; only sources in the active tier
are credited. Sources in worse tiers run as hot standby: they are opened and
read now and then (every ``standby_probe`` seconds) so that a broken fallback is
noticed before it is needed; their bytes are mixed into the pool without credit.
When the active tier loses its last healthy source, the next tier becomes active
at once and its sources read at full speed; the output buffer covers the
hand-over. When a better tier recovers it takes over again. With no healthy
source at all the active tier is ``None`` and every source may claim it.

Who moves the active tier: every runner state change calls `source_changed`,
which recomputes it, counts a failover when a tier hands over to another, and
wakes the standby runners parked in `wait_until_needed`. Time spent with each
tier active is measured on the injected clock's monotonic reading.

A source configured ``optional`` whose device is absent at start-up is skipped
(state ``stopped``) with a warning instead of being retried forever; it no
longer counts towards the best tier.
"""

import asyncio
import contextlib
import random
from collections.abc import Callable
from pathlib import Path

import structlog

from broker.clock import SYSTEM_CLOCK, Clock
from broker.health import HealthConfig
from broker.pool import EntropyPool
from broker.runner import Backoff, SourceRunner
from broker.status import SourceStatus
from sources.base import Source

__all__ = ["Supervisor"]

log = structlog.get_logger("ebroker.supervisor")


class Supervisor:
    """
    Runs the source tasks and tracks which tier feeds the pool.

    Args:
        pool: where the sources' bytes go.
        clock: time for every runner's waits and stamps, and for tier time.
        standby_probe: seconds a healthy source on standby, or paused by a
            full pool, goes unread before it is read once anyway.
        backoff_initial: first restart delay of a failing source.
        backoff_max: longest restart delay.
        rng: jitter for restart delays, a float in [0, 1).
    """

    def __init__(
        self,
        pool: EntropyPool,
        *,
        clock: Clock = SYSTEM_CLOCK,
        standby_probe: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.standby_probe = standby_probe
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rng = rng
        self.runners: list[SourceRunner] = []
        self.active_tier: int | None = None
        self.failovers = 0
        self._tier_changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._tier_seconds: dict[str, float] = {}
        self._tier_since = clock.monotonic()

    def add(
        self,
        source: Source,
        *,
        optional: bool = False,
        record_raw: Path | None = None,
        health: HealthConfig | None = None,
        watchdog: float | None = None,
    ) -> SourceRunner:
        runner = SourceRunner(
            source,
            self,
            clock=self.clock,
            backoff=Backoff(self.backoff_initial, self.backoff_max, self._rng),
            optional=optional,
            record_raw=record_raw,
            health=health,
            watchdog=watchdog,
        )
        self.runners.append(runner)
        return runner

    def start(self) -> None:
        for runner in self.runners:
            self._launch(runner)
        self._started = True
        self.source_changed()

    def add_running(
        self,
        source: Source,
        *,
        record_raw: Path | None = None,
        health: HealthConfig | None = None,
        watchdog: float | None = None,
    ) -> SourceRunner:
        """
        Add a source while the broker runs (a newly plugged device).
        """
        runner = self.add(
            source, record_raw=record_raw, health=health, watchdog=watchdog
        )
        if self._started:
            self._launch(runner)
        return runner

    def _launch(self, runner: SourceRunner) -> None:
        task = asyncio.create_task(runner.run(), name=f"source:{runner.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """
        Cancel every source task and wait until each has closed its driver.

        Raises:
            asyncio.CancelledError: ``stop`` itself was cancelled; it is raised
                only once every source task has finished.
        """
        self._started = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel(msg="broker shutting down")
        # gather waits for every task even when stop() is cancelled meanwhile,
        # and then raises that cancellation: cleanup first, never swallowed.
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, Exception):
                log.error("source_task_failed", task=task.get_name(), exc_info=result)

    # ---- tiers ------------------------------------------------------------------

    def source_changed(self) -> None:
        healthy_tiers = [runner.priority for runner in self.runners if runner.healthy]
        tier = min(healthy_tiers) if healthy_tiers else None
        if tier == self.active_tier:
            return
        self._account_tier_time(self.clock.monotonic())
        previous, self.active_tier = self.active_tier, tier
        if previous is not None:
            self.failovers += 1
        log.info("active_tier_changed", previous=previous, tier=tier)
        self._tier_changed.set()
        self._tier_changed = asyncio.Event()

    def _account_tier_time(self, now: float) -> None:
        key = "none" if self.active_tier is None else str(self.active_tier)
        self._tier_seconds[key] = (
            self._tier_seconds.get(key, 0.0) + now - self._tier_since
        )
        self._tier_since = now

    def tier_seconds(self) -> dict[str, float]:
        """
        Seconds spent with each tier active ("none": no healthy source at all).
        """
        self._account_tier_time(self.clock.monotonic())
        return dict(self._tier_seconds)

    def is_active(self, runner: SourceRunner) -> bool:
        # With no healthy source at all, anyone who delivers may claim the tier.
        return self.active_tier is None or runner.priority <= self.active_tier

    async def wait_until_needed(self, runner: SourceRunner) -> None:
        """
        Park a standby source until its tier becomes active or a probe is due.
        """
        with contextlib.suppress(TimeoutError):
            async with self.clock.timeout(self.standby_probe):
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
