"""
Re-admission after a failure: the start-up test counts only samples after the
last failing one, and a source that is not credited never shows healthy.
"""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.health import (
    FIPS_BLOCK_BYTES,
    STARTUP_SAMPLES,
    AdaptiveProportionTest,
    FailingSpan,
    HealthConfig,
    HealthEvent,
    HealthState,
    RepetitionCountTest,
    SourceHealth,
)


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def nonzero_bytes(size: int, seed: int) -> bytes:
    """
    Random bytes without 0x00, so that none continues a stuck-at-zero failure.
    """
    rng = random.Random(seed)
    return bytes(rng.randrange(1, 256) for _ in range(size))


def monobit_failing_bytes(size: int, seed: int) -> bytes:
    """
    Bytes with 4 or 5 one-bits: 55 % ones fails monobit, nothing else trips.
    """
    values = [v for v in range(256) if v.bit_count() in (4, 5)]
    rng = random.Random(seed)
    return bytes(rng.choice(values) for _ in range(size))


def bytes_until_healthy(health: SourceHealth, data: bytes) -> int | None:
    """
    Feed ``data`` a byte at a time: how many bytes it took to become HEALTHY.
    """
    for n in range(1, len(data) + 1):
        if health.feed(data[n - 1 : n], 2.0).state is HealthState.HEALTHY:
            return n
    return None


@pytest.mark.parametrize("stuck", [979, 723, 4096 + 467, 4096 + 211])
def test_stuck_bytes_after_the_failure_do_not_count(stuck: int) -> None:
    """
    A healthy source sticks at zero, then recovers. Every stuck byte fails
    (the RCT run and the APT window go on past their cut-offs), so the
    start-up test is the 1,024 bytes after the last zero. Counting the stuck
    bytes after the window's crossing re-admitted these after 576 or 832
    recovered bytes.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    health.feed(random_bytes(2048, 1), 0.0)
    assert HealthState.QUARANTINED == health.feed(bytes(stuck), 1.0).state
    assert STARTUP_SAMPLES == bytes_until_healthy(health, nonzero_bytes(3000, 2))


def test_readmission_at_exactly_1024_fresh_bytes() -> None:
    """
    The transition to HEALTHY is at the 1,024th byte after the last stuck
    byte, and only the bytes after it are credited.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    health.feed(random_bytes(2048, 3), 0.0)
    health.feed(bytes(979), 1.0)
    fresh = nonzero_bytes(STARTUP_SAMPLES + 500, 4)
    before = health.feed(fresh[: STARTUP_SAMPLES - 1], 2.0)
    assert (0, HealthState.QUARANTINED) == (before.creditable, before.state)
    after = health.feed(fresh[STARTUP_SAMPLES - 1 :], 3.0)
    [event] = after.events
    assert (HealthState.HEALTHY, 2048 + 979 + STARTUP_SAMPLES) == (
        event.to_state,
        event.position,
    )
    assert 500 == after.creditable


def test_stuck_value_recurring_in_the_failed_window_restarts_the_count() -> None:
    """
    After the APT's cut-off, each recurrence of the stuck value in the same
    window is a failing sample: the start-up test begins after the last one.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    health.feed(random_bytes(2048, 5), 0.0)
    health.feed(bytes(100), 1.0)
    # Window of 512 from stream offset 2048: 100 zeros, then a zero at 300.
    fresh = bytearray(nonzero_bytes(3000, 6))
    fresh[199] = 0
    assert STARTUP_SAMPLES + 200 == bytes_until_healthy(health, bytes(fresh))


def test_rct_spans_cover_a_run_across_calls() -> None:
    """
    A run that goes on past the cut-off over several calls is failing in each
    call until it ends; its crossing is reported once.
    """
    rct = RepetitionCountTest(3, sample_bytes=2)
    assert [] == rct.feed(b"\x01\x02" + bytes(3))
    assert [] == rct.failing
    # Stream bytes 5..9 complete the 3rd equal sample at byte 8 (3 into
    # this data) and the 4th at byte 10.
    crossing = rct.feed(bytes(5))
    assert [3] == [f.end for f in crossing]
    assert [FailingSpan("rct", 3, 5)] == rct.failing
    assert [] == rct.feed(bytes(10))
    assert [FailingSpan("rct", 2, 10)] == rct.failing
    assert [] == rct.feed(b"\x00\x00\x07\x07")
    assert [FailingSpan("rct", 2, 2)] == rct.failing
    rct.feed(b"\x00\x00")
    assert [] == rct.failing


def test_apt_spans_cover_recurrences_in_the_window() -> None:
    """
    An APT window past its cut-off is failing at each later occurrence of its
    value, in this call and the next, until the window ends.
    """
    apt = AdaptiveProportionTest(3, window=16)
    data = b"\x05\x05\x01\x05\x02\x05\x03"
    assert [4] == [f.end for f in apt.feed(data)]
    assert [FailingSpan("apt", 4, 6)] == apt.failing
    assert [] == apt.feed(b"\x04\x05\x06")
    assert [FailingSpan("apt", 2, 2)] == apt.failing
    apt.feed(b"\x09" * 6)
    assert [] == apt.failing


def reference_failing(data: bytes, rct_cut: int, window: int, apt_cut: int) -> set[int]:
    """
    Ends of the failing samples, one byte-sample at a time: RCT run or APT
    window count at or past the cut-off.
    """
    out = set()
    run = 0
    for i, x in enumerate(data):
        run = run + 1 if i and data[i - 1] == x else 1
        if run >= rct_cut:
            out.add(i + 1)
    first = count = 0
    for i, x in enumerate(data):
        if i % window == 0:
            first, count = x, 1
        elif x == first:
            count += 1
        else:
            continue
        if count >= apt_cut:
            out.add(i + 1)
    return out


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=200).map(lambda b: bytes(x % 3 for x in b)),
    cuts=st.lists(st.integers(0, 200), max_size=6),
)
def test_spans_match_the_failing_samples_for_any_split(
    data: bytes, cuts: list[int]
) -> None:
    """
    However the stream is split, every failing sample lies in a span, and
    every span starts and ends at a failing sample.
    """
    rct = RepetitionCountTest(3)
    apt = AdaptiveProportionTest(6, window=16)
    expected = reference_failing(data, 3, 16, 6)
    bounds = [0, *sorted({c for c in cuts if c <= len(data)}), len(data)]
    spans = []
    for start, end in itertools.pairwise(bounds):
        rct.feed(data[start:end])
        apt.feed(data[start:end])
        spans += [(start + s.start, start + s.end) for s in rct.failing + apt.failing]
    covered = {i for lo, hi in spans for i in range(lo, hi + 1)}
    assert expected <= covered
    assert {i for span in spans for i in span} <= expected


def test_failed_fips_block_shows_quarantined_with_reason() -> None:
    """
    A failed FIPS block stops credit, so the source shows QUARANTINED with
    the failed tests as reason, without counting as a quarantine.
    """
    health = SourceHealth(HealthConfig(fips=True), 8.0)
    assert (
        HealthState.HEALTHY == health.feed(random_bytes(FIPS_BLOCK_BYTES, 7), 0).state
    )
    verdict = health.feed(monobit_failing_bytes(FIPS_BLOCK_BYTES, 8), 1.0)
    assert (0, HealthState.QUARANTINED) == (verdict.creditable, verdict.state)
    assert "FIPS 140-2 block failed (monobit" in health.reason
    assert (1, 0) == (health.counters.fips_failures, health.counters.quarantines)


def test_fips_hold_ends_with_a_passing_block_after_fresh_bytes() -> None:
    """
    After a failed block the source is re-admitted at the end of the next
    passing block (2,500 fresh bytes, more than a start-up test), and credits
    only what follows it.
    """
    health = SourceHealth(HealthConfig(fips=True), 8.0)
    health.feed(random_bytes(FIPS_BLOCK_BYTES, 9), 0.0)
    health.feed(monobit_failing_bytes(FIPS_BLOCK_BYTES, 10), 1.0)
    good = random_bytes(2 * FIPS_BLOCK_BYTES, 11)
    held = health.feed(good[: FIPS_BLOCK_BYTES - 1], 2.0)
    assert (0, HealthState.QUARANTINED) == (held.creditable, held.state)
    passed = health.feed(good[FIPS_BLOCK_BYTES - 1 :], 3.0)
    [event] = passed.events
    assert (HealthState.HEALTHY, 3 * FIPS_BLOCK_BYTES) == (
        event.to_state,
        event.position,
    )
    assert FIPS_BLOCK_BYTES == passed.creditable
    assert 2 == health.counters.startups_passed


def test_a_fips_hold_is_marked_as_one_and_a_real_failure_is_not() -> None:
    """
    Entering and leaving a FIPS hold are marked as holds (the broker logs them
    as routine), while a stuck source's quarantine and its re-admission are not.
    """
    health = SourceHealth(HealthConfig(fips=True), 8.0)
    health.feed(random_bytes(FIPS_BLOCK_BYTES, 12), 0.0)
    [entered] = health.feed(monobit_failing_bytes(FIPS_BLOCK_BYTES, 13), 1.0).events
    [left] = health.feed(random_bytes(FIPS_BLOCK_BYTES, 14), 2.0).events
    assert (HealthState.QUARANTINED, True) == (entered.to_state, entered.hold)
    assert (HealthState.HEALTHY, True) == (left.to_state, left.hold)

    stuck = health.feed(bytes(64), 3.0).events
    assert [(HealthState.QUARANTINED, False)] == [
        (event.to_state, event.hold) for event in stuck
    ]
    back = health.feed(random_bytes(2 * FIPS_BLOCK_BYTES, 15), 4.0).events
    readmitted = next(e for e in back if e.to_state is HealthState.HEALTHY)
    assert not readmitted.hold


def test_fips_holds_never_fail_the_source() -> None:
    """
    Isolated failed blocks, many within an hour, are holds: they never add up
    to a permanent failure (the leaky count decides when blocks are a fault).
    """
    health = SourceHealth(HealthConfig(fips=True, permanent_failures=2), 8.0)
    for n in range(6):
        health.feed(random_bytes(2 * FIPS_BLOCK_BYTES, 20 + n), float(n))
        health.feed(monobit_failing_bytes(FIPS_BLOCK_BYTES, 30 + n), float(n))
    assert HealthState.QUARANTINED == health.state
    assert (
        HealthState.HEALTHY == health.feed(random_bytes(FIPS_BLOCK_BYTES, 40), 9).state
    )
    assert (6, 0) == (health.counters.fips_failures, health.counters.quarantines)


def test_source_failure_during_a_fips_hold_counts_and_takes_the_reason() -> None:
    """
    A real failure while on a FIPS hold is a new incident: it counts as a
    quarantine and becomes the reason.
    """
    health = SourceHealth(HealthConfig(fips=True), 8.0)
    health.feed(random_bytes(FIPS_BLOCK_BYTES, 50), 0.0)
    health.feed(monobit_failing_bytes(FIPS_BLOCK_BYTES, 51), 1.0)
    health.feed(bytes(64), 2.0)
    assert HealthState.QUARANTINED == health.state
    assert health.reason.startswith("RCT")
    assert 1 == health.counters.quarantines


def _stream_part() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.integers(0, 2**32).map(lambda seed: random_bytes(1500, seed)),
        st.integers(1, 600).map(bytes),
        st.integers(0, 2**32).map(lambda seed: monobit_failing_bytes(900, seed)),
    )


@settings(max_examples=40, deadline=None)
@given(
    parts=st.lists(_stream_part(), min_size=1, max_size=10),
    cuts=st.lists(st.integers(0, 15000), max_size=10),
)
def test_holds_and_spans_do_not_depend_on_the_split(
    parts: list[bytes], cuts: list[int]
) -> None:
    """
    With FIPS holds, stuck stretches and recoveries, feeding the stream whole
    or in any pieces gives the same events, counters and state.
    """
    config = HealthConfig(fips=True, permanent_failures=50, quarantine_limit=1e9)
    stream = b"".join(parts)
    whole = SourceHealth(config, 8.0)
    whole_events = whole.feed(stream, 0.0).events
    split = SourceHealth(config, 8.0)
    bounds = [0, *sorted({c for c in cuts if c <= len(stream)}), len(stream)]
    events: list[HealthEvent] = []
    for start, end in itertools.pairwise(bounds):
        events += split.feed(stream[start:end], 0.0).events
    assert list(whole_events) == events
    assert (whole.counters, whole.state) == (split.counters, split.state)
