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

Provenance gating: while a better tier has a source in its start-up test
(``starting``: it is expected to be healthy soon), a worse tier, even the
active one, may fill the pool only up to ``low_watermark``. Clients are served
meanwhile, from a small buffer, and once the better tier is healthy and takes
over, at most what the worse tier left buffered (the low watermark plus one
read) is served before the better tier's output. Without gating a fallback
that is healthy first would fill the whole buffer (1 MiB by default) at start,
and that much would be served before any hardware byte. When no better tier is
starting (its sources failed, stalled or stopped), the fallback fills the
whole pool: availability comes first. What each tier's output amounts to, in
bytes served and bytes buffered, is counted by the pool (`tier_output`).

Who moves the active tier: every runner state change calls `source_changed`,
which recomputes it, counts a failover when a tier hands over to another, and
wakes the runners parked in `wait_until_needed` or `wait_for_room` (a change of
state may open or close a gate). Time spent with each tier active is measured
on the injected clock's monotonic reading.

A source configured ``optional`` whose device is absent at start-up is skipped
(state ``stopped``) with a warning instead of being retried forever; it no
longer counts towards the best tier.
"""

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import structlog

from broker.clock import SYSTEM_CLOCK, Clock
from broker.health import HealthConfig
from broker.pool import NO_TIER, EntropyPool
from broker.runner import Backoff, SourceRunner
from broker.status import SourceState, SourceStatus
from sources.base import Source

__all__ = ["Supervisor"]

log = structlog.get_logger("ebroker.supervisor")

DEFAULT_LOW_WATERMARK = 4096


class Supervisor:
    """
    Runs the source tasks and tracks which tier feeds the pool.

    Args:
        pool: where the sources' bytes go.
        clock: time for every runner's waits and stamps, and for tier time.
        standby_probe: seconds a healthy source on standby, or paused by a
            full pool, goes unread before it is read once anyway.
        low_watermark: pool level up to which a tier may fill the pool while
            a better tier is in its start-up test.
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
        low_watermark: int = DEFAULT_LOW_WATERMARK,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.standby_probe = standby_probe
        self.low_watermark = low_watermark
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rng = rng
        self.runners: list[SourceRunner] = []
        self.active_tier: int | None = None
        self.failovers = 0
        self._changed = asyncio.Event()
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
        # Any change may open or close a gate, even when the tier stays.
        self._changed.set()
        self._changed = asyncio.Event()
        # A FIPS hold lasts one block: handing the tier to a fallback for it
        # (every few seconds on a fast source) would credit the fallback and
        # count a failover each time.
        healthy_tiers = [
            runner.priority
            for runner in self.runners
            if runner.healthy or runner.holding
        ]
        tier = min(healthy_tiers) if healthy_tiers else None
        if tier == self.active_tier:
            return
        self._account_tier_time(self.clock.monotonic())
        previous, self.active_tier = self.active_tier, tier
        if previous is not None:
            self.failovers += 1
        log.info("active_tier_changed", previous=previous, tier=tier)

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
                    await self._changed.wait()

    def better_tier_starting(self, runner: SourceRunner) -> bool:
        """
        Whether a tier better than ``runner``'s has a source in its start-up
        test.
        """
        return any(
            other.priority < runner.priority and other.state == SourceState.STARTING
            for other in self.runners
        )

    def fill_limit(self, runner: SourceRunner) -> int:
        """
        The pool level up to which ``runner`` may add credited bytes.
        """
        if self.better_tier_starting(runner):
            return min(self.low_watermark, self.pool.capacity)
        return self.pool.capacity

    def has_room(self, runner: SourceRunner) -> bool:
        # has_space, not a bare level check: the pool takes whole blocks, and
        # credit offered while no block fits is dropped.
        return self.pool.has_space and self.pool.level < self.fill_limit(runner)

    async def wait_for_room(self, runner: SourceRunner) -> None:
        """
        Park a source until the pool is below its fill limit (or closed).
        """
        pool = self.pool
        while not self.has_room(runner) and not pool.closed:
            # A state change can move the fill limit either way: wait for the
            # level to fall below today's limit, or for the limit to change.
            await _first_of(
                pool.wait_for_level_below(self.fill_limit(runner)),
                self._changed.wait(),
            )

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

    def tier_output(self) -> tuple[dict[str, int], dict[str, int]]:
        """
        Output bytes each tier's credited input produced: served to clients,
        and still buffered in the pool, keyed as `tier_seconds` is ("none":
        credited input from no source tier).
        """
        stats = self.pool.stats()
        return _by_tier_name(stats.bytes_out_by_tier), _by_tier_name(
            stats.level_by_tier
        )


def _by_tier_name(counts: Mapping[int, int]) -> dict[str, int]:
    return {
        ("none" if tier == NO_TIER else str(tier)): count
        for tier, count in sorted(counts.items())
    }


async def _first_of(*waits: Coroutine[Any, Any, Any]) -> None:
    """
    Return when the first of ``waits`` is done; the others are cancelled.
    """
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # Collect the cancelled ones so none is left pending or unretrieved.
        await asyncio.gather(*tasks, return_exceptions=True)
