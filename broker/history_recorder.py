"""
The task that keeps `broker.history` up to date, and its file.

Entered as an async context manager by the broker once its sources run: it
loads ``state_dir/history.bin`` (a bad file is logged and ignored), notes the
time the broker was down as a ``gap`` event (the missing points read as
nulls), then every `TICK` s looks for events (state changes, tier changes,
endpoint failovers, phase changes) and once per step records a sample. The
history is saved every `SAVE_EVERY` s and on exit, compression and writing in
a worker thread.

``EBROKER_HISTORY_STEP`` (seconds) shortens the step, for tests that cannot
wait 10 s per point; a history saved with another step is ignored.
"""

import asyncio
import contextlib
import datetime
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import structlog

from broker.clock import Clock
from broker.history import FINE_STEP, Event, History
from broker.history_sampler import (
    Rates,
    Watcher,
    build_sample,
    observe,
    read_counters,
)
from broker.history_store import (
    FILE_NAME,
    HistoryFileError,
    compress,
    decode,
    snapshot,
    write_atomically,
)
from broker.status import BrokerView, SourceStatus

log = structlog.get_logger("ebroker.history")

STEP_ENV: Final = "EBROKER_HISTORY_STEP"
TICK: Final = 1.0
"""Seconds between two looks for events (never more than the step)."""
SAVE_EVERY: Final = 300.0
WAKE_SLACK: Final = 0.001
"""Seconds past a slot's start the sampler wakes, so that it is in the slot."""


def configured_step(environ: "os._Environ[str] | dict[str, str]") -> float:
    """
    The sampling step: `FINE_STEP`, or ``EBROKER_HISTORY_STEP`` when it is a
    positive number of seconds (a bad value is logged and ignored).
    """
    text = environ.get(STEP_ENV)
    if text is None:
        return FINE_STEP
    try:
        step = float(text)
    except ValueError:
        step = math.nan
    if not step > 0 or math.isinf(step):
        log.warning("history_step_ignored", value=text, step=FINE_STEP)
        return FINE_STEP
    return step


def _iso(time: float) -> str:
    return datetime.datetime.fromtimestamp(time, datetime.UTC).isoformat(
        timespec="seconds"
    )


class HistoryRecorder:
    """
    Samples ``broker`` into a `History` for as long as it is entered.

    Args:
        broker: what is sampled.
        state_dir: where the history file lives.
        clock: wall time stamps the points, monotonic time times the rates.
        step: seconds between two points.
    """

    def __init__(
        self,
        broker: BrokerView,
        state_dir: Path,
        *,
        clock: Clock,
        step: float = FINE_STEP,
    ) -> None:
        self._broker = broker
        self.path = state_dir / FILE_NAME
        self._clock = clock
        self._step = step
        self.history = History(step)
        self._rates = Rates()
        self._watcher = Watcher()
        self._task: asyncio.Task[None] | None = None
        self._saving: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._load()
        self._task = asyncio.create_task(self._run(), name="history")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel(msg="broker shutting down")
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # The last phase change (closing) belongs to the record too.
        self._look()
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)
        await self._save()

    async def _load(self) -> None:
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("history_file_ignored", path=str(self.path), error=str(exc))
            return
        loaded = History(self._step)
        try:
            # Inflating a full history takes tens of milliseconds.
            await asyncio.to_thread(decode, data, loaded)
        except HistoryFileError as exc:
            log.warning("history_file_ignored", path=str(self.path), error=str(exc))
            return
        self.history = loaded
        now = self._clock.time()
        head = loaded.fine.head
        if head is None:
            return
        last = (head + 1) * loaded.step
        if now > last:
            loaded.add_event(
                Event(
                    now,
                    "gap",
                    "broker",
                    _iso(last),
                    _iso(now),
                    f"no samples for {now - last:.0f} s: broker not running",
                )
            )
        log.info("history_loaded", path=str(self.path), points_until=_iso(last))

    async def _run(self) -> None:
        tick = TICK
        saved = self._clock.monotonic()
        recorded: int | None = None
        while True:
            now = self._clock.time()
            slot = self.history.fine.slot(now)
            try:
                sources = self._look()
                if slot != recorded:
                    recorded = slot
                    self._sample(now, sources)
            except Exception:
                # One bad reading must not end the history: logged, and the
                # next tick tries again.
                log.error("history_sample_failed", exc_info=True)
            if self._clock.monotonic() - saved >= SAVE_EVERY and self._saving is None:
                saved = self._clock.monotonic()
                self._saving = asyncio.create_task(self._save(), name="history-save")
                self._saving.add_done_callback(self._saved)
            # Wake just inside the next slot, or a tick from now to look for
            # events; timers a little early or late never skip a slot then.
            now = self._clock.time()
            wake = min((self.history.fine.slot(now) + 1) * self._step, now + tick)
            await self._clock.sleep(max(0.0, wake - now) + WAKE_SLACK)

    def _sample(self, now: float, sources: list[SourceStatus]) -> None:
        counters = read_counters(self._broker, sources, self._clock.monotonic())
        sample = build_sample(self._broker, sources, self._rates.update(counters))
        if not self.history.record(now, sample) and self.history.dropped == 1:
            log.warning(
                "history_clock_behind",
                hint="the wall clock went back; points resume once it passes "
                "the newest one",
            )

    @property
    def saving(self) -> "asyncio.Task[None] | None":
        """
        The periodic save in progress, if one is.
        """
        return self._saving

    def _saved(self, task: "asyncio.Task[None]") -> None:
        self._saving = None

    def _look(self) -> list[SourceStatus]:
        sources = self._broker.sources_status()
        now = self._clock.time()
        for event in self._watcher.update(now, observe(self._broker, sources)):
            self.history.add_event(event)
            log.debug("history_event", **event.to_json())
        return sources

    async def _save(self) -> None:
        body = snapshot(self.history, self._clock.time())
        try:
            await asyncio.to_thread(self._write, body)
        except OSError as exc:
            log.error("history_not_saved", path=str(self.path), error=str(exc))

    def _write(self, body: bytes) -> None:
        write_atomically(self.path, compress(body))
