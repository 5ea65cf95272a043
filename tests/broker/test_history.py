"""
The broker's history: rings of 10-s and 1-min points, their rollup, gaps,
a clock that steps back, the memory bound, events, and the file that carries
the history over a restart.
"""

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.history import (
    COARSE_POINTS,
    FINE_POINTS,
    MAX_CUSTOMERS,
    MAX_EVENTS,
    CustomerPoint,
    Event,
    History,
    Sample,
    SourcePoint,
)
from broker.history_query import encode, take
from broker.history_recorder import (
    SAVE_EVERY,
    STEP_ENV,
    HistoryRecorder,
    configured_step,
)
from broker.history_sampler import Counters, Observation, Rates, Watcher
from broker.history_store import (
    FILE_NAME,
    MAGIC,
    HistoryFileError,
    compress,
    decode,
    snapshot,
)
from broker.status import Phase, SinkStatus, SourceStatus, TierStatus
from tests.fakeclock import START_WALL, FakeClock
from tests.sinks.http.test_api import FakeBroker

STEP = 10.0
T0 = 1_764_543_000.0  # a multiple of 60: slot boundaries of both rings


def sample(level: float = 0.0, **sources: SourcePoint) -> Sample:
    return Sample(
        level_bytes=level,
        in_bytes_per_s=level * 2,
        out_bytes_per_s=level * 3,
        connections=1.0,
        sources=sources,
    )


def key(
    state: str = "healthy", temperature: float = math.nan, voltage: float = math.nan
) -> SourcePoint:
    return SourcePoint(0, "entropykey", 4096.0, 32768.0, state, temperature, voltage)


def answer(history: History, now: float, resolution: str = "10s") -> dict[str, Any]:
    document: dict[str, Any] = json.loads(encode(take(history, now, resolution)))
    return document


# ---- rings ------------------------------------------------------------------------


def test_points_land_in_their_slots() -> None:
    """
    Point i is at start + i * step; a second sample in the same slot replaces
    the first.
    """
    history = History()
    history.record(T0, sample(1.0))
    history.record(T0 + 10, sample(2.0))
    history.record(T0 + 19.9, sample(3.0))
    document = answer(history, T0 + 20)
    assert T0 == document["start"]
    assert 2 == document["points"]
    assert [1.0, 3.0] == document["pool"]["level_bytes"]
    assert [2.0, 6.0] == document["pool"]["in_bytes_per_s"]


def test_rollup_of_a_minute() -> None:
    """
    The minute ring holds the mean of a minute's rates, the last state, the
    highest temperature and the lowest voltage.
    """
    history = History()
    states = ["healthy", "healthy", "quarantined", "healthy", "failed", "starting"]
    for index in range(6):
        history.record(
            T0 + index * STEP,
            sample(
                float(index),
                ekey=key(states[index], 40.0 + index % 3, 5.0 - index / 100),
            ),
        )
    history.record(T0 + 60, sample(100.0, ekey=key("healthy")))
    document = answer(history, T0 + 61, "1m")
    assert 60.0 == document["step"]
    assert T0 == document["start"]
    assert [2.5, 100.0] == document["pool"]["level_bytes"]
    ekey = document["sources"]["ekey"]
    assert ["starting", "healthy"] == ekey["state"]
    assert [42.0, None] == ekey["temperature_c"]
    assert [4.95, None] == ekey["voltage_v"]


def test_rollup_skips_missing_points() -> None:
    """
    A minute's mean is over the points that have data; a minute without any
    is null.
    """
    history = History()
    history.record(T0, sample(4.0))
    history.record(T0 + 50, sample(8.0))
    history.record(T0 + 130, sample(1.0))
    document = answer(history, T0 + 131, "1m")
    assert [6.0, None, 1.0] == document["pool"]["level_bytes"]


def test_ring_wraps_around_and_stays_bounded() -> None:
    """
    More than a day of 10-s points keeps the newest 8,640, in order; the ring
    never grows.
    """
    history = History(fine_points=100, coarse_points=20)
    for index in range(250):
        history.record(T0 + index * STEP, sample(float(index)))
    document = answer(history, T0 + 2500)
    assert 100 == document["points"]
    assert [float(index) for index in range(150, 250)] == document["pool"][
        "level_bytes"
    ]
    assert T0 + 150 * STEP == document["start"]
    assert all(len(values) == 100 for values in history.fine.series.values())
    coarse = answer(history, T0 + 2500, "1m")
    assert 20 == coarse["points"]
    assert all(len(values) == 20 for values in history.coarse.series.values())


def test_missing_slots_are_null() -> None:
    """
    Slots skipped between two samples read as null, and so do older laps'
    values the skip passes over.
    """
    history = History(fine_points=10, coarse_points=10)
    for index in range(10):
        history.record(T0 + index * STEP, sample(1.0))
    history.record(T0 + 13 * STEP, sample(2.0))
    document = answer(history, T0 + 14 * STEP)
    assert [1.0] * 6 + [None] * 3 + [2.0] == document["pool"]["level_bytes"]
    history.record(T0 + 100 * STEP, sample(3.0))
    assert [None] * 9 + [3.0] == answer(history, T0 + 101 * STEP)["pool"]["level_bytes"]


def test_absent_figure_is_null() -> None:
    """
    NaN in a sample (no rate yet, a source without a thermometer) is null,
    and a source missing from a sample is null at that point.
    """
    history = History()
    history.record(T0, Sample(5.0, math.nan, math.nan, 0.0, {"ekey": key()}))
    history.record(T0 + 10, sample(6.0))
    document = answer(history, T0 + 11)
    assert [None, 12.0] == document["pool"]["in_bytes_per_s"]
    assert ["healthy", None] == document["sources"]["ekey"]["state"]
    assert [None, None] == document["sources"]["ekey"]["temperature_c"]


def test_clock_stepping_back_drops_samples() -> None:
    """
    A sample older than the newest point is dropped and counted; nothing
    already recorded changes, and points resume once the clock catches up.
    """
    history = History()
    for index in range(5):
        assert history.record(T0 + index * STEP, sample(float(index)))
    before = answer(history, T0 + 50)
    assert not history.record(T0 - 1800, sample(99.0))
    assert not history.record(T0 + 20, sample(99.0))
    assert 2 == history.dropped
    assert before == answer(history, T0 + 50)
    assert history.record(T0 + 50, sample(5.0))
    after = answer(history, T0 + 60)
    assert [float(index) for index in range(6)] == after["pool"]["level_bytes"]
    assert [2.5] == answer(history, T0 + 60, "1m")["pool"]["level_bytes"]


def test_clock_far_behind_starts_afresh() -> None:
    """
    A step back of more than an hour means the newest points had a wrong
    time: the rings start again at the new time, with a gap event saying so.
    """
    history = History()
    for index in range(5):
        history.record(T0 + index * STEP, sample(float(index)))
    assert history.record(T0 - 2 * 3600, sample(7.0))
    document = answer(history, T0 - 2 * 3600 + 1)
    assert T0 - 2 * 3600 == document["start"]
    assert [7.0] == document["pool"]["level_bytes"]
    assert [7.0] == answer(history, T0 - 2 * 3600 + 1, "1m")["pool"]["level_bytes"]
    [event] = document["events"]
    assert "gap" == event["kind"]
    assert "wall clock went back" in event["reason"]


def test_memory_bound() -> None:
    """
    Each series costs 8 bytes per point of both rings, whatever is recorded;
    4 sources (2 of them with temperature and voltage) and 20 customers make
    4 + 2 * 5 + 2 * 3 + 20 * 2 = 60 series; customers past the cap are left
    out.
    """
    per_series = 8 * (FINE_POINTS + COARSE_POINTS)
    assert 149_760 == per_series
    history = History()
    sources = {
        "ekey-1": key(temperature=40.0, voltage=5.0),
        "ekey-2": key(temperature=41.0, voltage=5.0),
        "hwrng": key(),
        "getrandom": key(),
    }
    customers = {f"c{index}": CustomerPoint(1.0, 0.0) for index in range(20)}
    for index in range(FINE_POINTS + 10):
        history.record(
            T0 + index * STEP, Sample(1.0, 1.0, 1.0, 1.0, sources, customers)
        )
    assert 60 * per_series == history.memory_bytes()
    crowd = {f"x{index}": CustomerPoint(1.0, 0.0) for index in range(MAX_CUSTOMERS)}
    history.record(T0 + FINE_POINTS * 20 * STEP, Sample(1.0, 1.0, 1.0, 1.0, {}, crowd))
    assert MAX_CUSTOMERS == len(history.customers)
    assert (4 + 16 + 2 * MAX_CUSTOMERS) * per_series == history.memory_bytes()


def test_events_are_bounded_and_filtered() -> None:
    """
    The oldest events go past the cap; ``since`` keeps the events after it.
    """
    history = History()
    for index in range(MAX_EVENTS + 5):
        history.add_event(Event(T0 + index, "phase", "broker", "a", "b", ""))
    assert MAX_EVENTS == len(history.events)
    assert T0 + 5 == history.events[0].time
    window = take(history, T0 + 2000, since=T0 + MAX_EVENTS + 2)
    assert [T0 + MAX_EVENTS + 3, T0 + MAX_EVENTS + 4] == [
        event.time for event in window.events
    ]


# ---- rates and events -------------------------------------------------------------


def test_rates_between_readings() -> None:
    """
    A rate needs two readings; a counter that went down gives no rate.
    """
    rates = Rates()
    first = rates.update(Counters(0.0, {"pool/in": 100.0}))
    assert math.isnan(first["pool/in"])
    assert {"pool/in": 50.0, "new": pytest.approx(math.nan, nan_ok=True)} == (
        rates.update(Counters(2.0, {"pool/in": 200.0, "new": 5.0}))
    )
    assert math.isnan(rates.update(Counters(3.0, {"pool/in": 10.0}))["pool/in"])


def status(state: str, since: float, **details: Any) -> SourceStatus:
    return SourceStatus(
        name="ekey",
        kind="entropykey",
        priority=0,
        state=state,
        reason=f"now {state}",
        since=since,
        bytes_in=0,
        credited_bits=0,
        rate=0.0,
        restarts=0,
        feeding=True,
        details=details,
    )


def test_watcher_reports_changes() -> None:
    """
    State changes carry the source's own change time and reason; tier,
    endpoint and phase changes are reported too; the first look reports
    nothing.
    """
    watcher = Watcher()
    first = Observation(
        "starting", 0, False, {"ekey": status("healthy", T0, failovers=0)}
    )
    assert [] == watcher.update(T0 + 1, first)
    second = Observation(
        "serving",
        1,
        True,
        {
            "ekey": status(
                "failed", T0 + 1.5, failovers=1, endpoint="b:1", last_error="refused"
            )
        },
    )
    events = watcher.update(T0 + 2, second)
    assert [
        Event(T0 + 1.5, "source_state", "ekey", "healthy", "failed", "now failed"),
        Event(T0 + 2, "phase", "broker", "starting", "serving", ""),
        Event(
            T0 + 2,
            "tier_change",
            "broker",
            "tier 0",
            "tier 1",
            "only a fallback tier feeds the pool",
        ),
        Event(T0 + 2, "failover", "ekey", "none", "b:1", "refused"),
    ] == events
    third = replace(second, active_tier=None, degraded=False)
    assert [
        Event(T0 + 3, "tier_change", "broker", "tier 1", "none", "no healthy source")
    ] == watcher.update(T0 + 3, third)
    fourth = replace(third, active_tier=0)
    assert [
        Event(
            T0 + 4,
            "tier_change",
            "broker",
            "none",
            "tier 0",
            "a preferred tier is healthy again",
        )
    ] == watcher.update(T0 + 4, fourth)


async def test_recorder_saves_every_few_minutes(tmp_path: Path) -> None:
    """
    The history is saved while the broker runs, not only when it stops, so
    a crash loses minutes at most.
    """
    clock = FakeClock(wall=T0)
    recorder = HistoryRecorder(RecordedFake(), tmp_path, clock=clock)
    async with recorder:
        await clock.advance(SAVE_EVERY + 1)
        saving = recorder.saving
        assert saving is not None
        await saving
        loaded = History()
        decode((tmp_path / FILE_NAME).read_bytes(), loaded)
        assert loaded.fine.head is not None
        assert loaded.fine.head * STEP >= T0 + SAVE_EVERY - STEP


async def test_recorder_survives_a_failing_reading(tmp_path: Path) -> None:
    """
    A reading that raises is logged; the recorder carries on.
    """
    clock = FakeClock(wall=T0)
    broker = RecordedFake(health_error=None)
    broker.sources = []
    recorder = HistoryRecorder(broker, tmp_path, clock=clock)
    failing = True

    def sources_status() -> list[SourceStatus]:
        if failing:
            raise RuntimeError("no reading")
        return []

    broker.sources_status = sources_status  # type: ignore[method-assign]
    with capture_logs() as logs:
        async with recorder:
            await clock.advance(10.5)
            failing = False
            await clock.advance(10)
    assert "history_sample_failed" in [entry["event"] for entry in logs]
    assert 1 <= answer(recorder.history, clock.time())["points"]


# ---- the file ---------------------------------------------------------------------


def recorded() -> History:
    history = History()
    for index in range(20):
        history.record(
            T0 + index * STEP,
            Sample(
                float(index),
                1.0,
                2.0,
                3.0,
                {"ekey": key(temperature=40.0)},
                {"acme": CustomerPoint(1.0, 0.5)},
            ),
        )
    history.add_event(Event(T0, "phase", "broker", "starting", "serving", ""))
    return history


def test_file_round_trip() -> None:
    """
    What is saved loads back the same, answers and all.
    """
    history = recorded()
    loaded = History()
    assert T0 + 200 == decode(compress(snapshot(history, T0 + 200)), loaded)
    for resolution in ("10s", "1m"):
        assert answer(history, T0 + 200, resolution) == answer(
            loaded, T0 + 200, resolution
        )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a history",
        MAGIC + b"garbage",
        MAGIC + compress(b"{}\n")[len(MAGIC) :],
        MAGIC + compress(b'{"version": 2}\n')[len(MAGIC) :],
        MAGIC + compress(b"[1, 2]\n")[len(MAGIC) :],
    ],
)
def test_foreign_or_corrupt_file_is_refused(data: bytes) -> None:
    """
    Bytes that are not a history of this version are refused.
    """
    with pytest.raises(HistoryFileError):
        decode(data, History())


def test_file_with_malformed_header_is_refused() -> None:
    """
    A header whose parts have the wrong types is refused, not a crash.
    """
    body = snapshot(recorded(), T0)
    line, _, raw = body.partition(b"\n")
    header = json.loads(line)
    for key, bad in (("sources", ["ekey"]), ("events", [{"time": "x"}])):
        broken = {**header, key: bad}
        with pytest.raises(HistoryFileError):
            decode(compress(json.dumps(broken).encode() + b"\n" + raw), History())


def test_truncated_or_other_step_file_is_refused() -> None:
    """
    A cut file, or one recorded with another step, is refused.
    """
    data = compress(snapshot(recorded(), T0))
    with pytest.raises(HistoryFileError):
        decode(data[: len(data) // 2], History())
    body = snapshot(recorded(), T0)
    with pytest.raises(HistoryFileError, match="expected"):
        decode(compress(body), History(step=1.0))
    header, _, raw = body.partition(b"\n")
    with pytest.raises(HistoryFileError, match="truncated"):
        decode(compress(header + b"\n" + raw[:-8]), History())


# ---- the recorder -----------------------------------------------------------------


@dataclass
class RecordedFake(FakeBroker):
    """
    A fake broker whose phase and tiers the test sets.
    """

    current_phase: Phase = Phase.SERVING
    tier: int | None = 0
    connections: int = 2
    extra: list[SinkStatus] = field(default_factory=list)

    def phase(self) -> Phase:
        return self.current_phase

    def tiers(self) -> TierStatus:
        return TierStatus(self.tier, 0, False, 0, {})

    def sinks_status(self) -> list[SinkStatus]:
        return [SinkStatus("egd", "egd", (), self.connections, 0, 0, 0)]


async def test_recorder_samples_saves_and_shows_a_gap(tmp_path: Path) -> None:
    """
    A recorder samples every step and notes changes as events; its history
    is saved on exit, and a recorder started later on the same directory
    loads it, with the time in between as nulls and a ``gap`` event.
    """
    clock = FakeClock(wall=T0)
    broker = RecordedFake(sources=[status("healthy", T0)])
    recorder = HistoryRecorder(broker, tmp_path, clock=clock)
    async with recorder:
        # The recorder samples just after each 10-s boundary.
        await clock.advance(30.5)
        broker.sources = [status("failed", clock.time())]
        broker.current_phase = Phase.DRAINING
        await clock.advance(30.5)
        broker.current_phase = Phase.CLOSING
    document = answer(recorder.history, clock.time())
    assert 7 == document["points"]
    assert [2.0] * 7 == document["pool"]["connections"]
    assert ["healthy"] * 4 + ["failed"] * 3 == document["sources"]["ekey"]["state"]
    assert [
        ("source_state", "healthy", "failed"),
        ("phase", "serving", "draining"),
        ("phase", "draining", "closing"),
    ] == [(event["kind"], event["from"], event["to"]) for event in document["events"]]
    assert (tmp_path / FILE_NAME).exists()

    clock.set_wall(T0 + 300)
    later = HistoryRecorder(broker, tmp_path, clock=clock)
    async with later:
        await clock.advance(0)
    document = answer(later.history, clock.time())
    assert T0 == document["start"]
    assert 31 == document["points"]
    assert [None] * 23 == document["pool"]["connections"][7:30]
    assert 2.0 == document["pool"]["connections"][30]
    assert ["source_state", "phase", "phase", "gap"] == [
        event["kind"] for event in document["events"]
    ]
    gap = document["events"][-1]
    assert ("gap", "broker") == (gap["kind"], gap["subject"])
    assert "no samples for 230 s" in gap["reason"]


async def test_recorder_ignores_a_corrupt_file(tmp_path: Path) -> None:
    """
    A corrupt history file is logged and ignored: the recorder starts empty
    and replaces it on exit.
    """
    (tmp_path / FILE_NAME).write_bytes(MAGIC + b"\x00" * 100)
    clock = FakeClock(wall=T0)
    recorder = HistoryRecorder(RecordedFake(), tmp_path, clock=clock)
    with capture_logs() as logs:
        async with recorder:
            await clock.advance(10.5)
    assert ["history_file_ignored"] == [
        entry["event"] for entry in logs if entry["log_level"] == "warning"
    ]
    assert 2 == answer(recorder.history, clock.time())["points"]
    decode((tmp_path / FILE_NAME).read_bytes(), History())


async def test_recorder_survives_the_clock_stepping_back(tmp_path: Path) -> None:
    """
    The wall clock set back half an hour stops the points (with one warning)
    until it passes the newest point again.
    """
    clock = FakeClock(wall=T0)
    recorder = HistoryRecorder(RecordedFake(), tmp_path, clock=clock)
    with capture_logs() as logs:
        async with recorder:
            await clock.advance(20.5)
            clock.set_wall(T0 - 1800)
            await clock.advance(30)
    assert 3 == answer(recorder.history, T0 + 30)["points"]
    assert recorder.history.dropped >= 3
    assert 1 == sum(entry["event"] == "history_clock_behind" for entry in logs)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, 10.0), ("0.25", 0.25), ("0", 10.0), ("x", 10.0)]
)
def test_configured_step(value: str | None, expected: float) -> None:
    """
    The step comes from the environment only when it is a positive number.
    """
    environ = {} if value is None else {STEP_ENV: value}
    assert expected == configured_step(environ)


def test_start_wall_is_a_slot_boundary() -> None:
    """
    The fake clock's start is on a minute boundary, which the recorder tests
    rely on for their point counts.
    """
    assert 0 == START_WALL % 60
    assert 0 == T0 % 60
