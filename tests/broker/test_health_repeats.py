"""
The repeat test: periodic output (counters, replayed blocks) fails at any
period up to 64 KiB and any alignment; random output never does.
"""

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker.health import (
    STARTUP_SAMPLES,
    HealthConfig,
    HealthState,
    RepeatTest,
    SourceHealth,
    probe_length,
)
from broker.health_repeats import DEFAULT_WINDOW, PROBE_EVERY

YEAR = 3.156e7
RATES = (4096, 1 << 20)
# The false-alarm table of broker.health_repeats: credit -> (L, log2 of the
# per-probe bound, false alarms per year at 4 KiB/s and at 1 MiB/s).
TABLE = {
    8.0: (128, -1008, 0.0, 0.0),
    1.0: (128, -112, 5e-26, 1.3e-23),
    0.125: (448, -40, 2.3e-4, 0.059),
}


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def feed_all(
    health: SourceHealth, stream: bytes, chunk: int = 4096
) -> tuple[int, list[tuple[HealthState, HealthState, int, str]]]:
    """
    Feed ``stream`` in chunks at 4 KiB/s: the bytes credited and every event.
    """
    credited = 0
    events = []
    for i in range(0, len(stream), chunk):
        verdict = health.feed(stream[i : i + chunk], i / 4096)
        credited += verdict.creditable
        events += [
            (e.from_state, e.to_state, e.position, e.reason) for e in verdict.events
        ]
    return credited, events


def first_probe_after(offset: int) -> int:
    """
    Stream offset of the first probe that starts at or after ``offset``.
    """
    return -(-offset // PROBE_EVERY) * PROBE_EVERY


def reference_repeats(data: bytes, size: int, window: int) -> list[tuple[int, int]]:
    """
    The test's definition, probe by probe: (end, distance to the first match).
    """
    out = []
    for probe in range(0, len(data) - size + 1, PROBE_EVERY):
        needle = data[probe : probe + size]
        for earlier in range(max(probe - window, 0), probe):
            if data[earlier : earlier + size] == needle:
                out.append((probe + size, probe - earlier))
                break
    return out


@pytest.mark.parametrize("h", sorted(TABLE))
def test_false_alarm_table_rows(h: float) -> None:
    """
    Each row of the module's table follows from L, W = 2^16 and 512-byte probes.
    """
    size, log2_per_probe, per_year_slow, per_year_fast = TABLE[h]
    assert size == probe_length(h, -40)
    assert log2_per_probe == math.log2(DEFAULT_WINDOW) - size * h
    for rate, expected in zip(RATES, (per_year_slow, per_year_fast), strict=True):
        per_year = rate / PROBE_EVERY * YEAR * 2.0**log2_per_probe
        assert expected == pytest.approx(per_year, rel=0.05, abs=1e-290)


def test_probe_length_limits() -> None:
    """
    Probes are never shorter than 128 nor longer than 512 bytes; nonsense fails.
    """
    assert 128 == probe_length(8, -100)
    assert 512 == probe_length(0.125, -100)
    with pytest.raises(ValueError, match="positive"):
        probe_length(0, -40)
    with pytest.raises(ValueError, match="negative"):
        probe_length(8, 0)
    with pytest.raises(ValueError, match="window"):
        probe_length(8, -40, 0)
    with pytest.raises(ValueError, match="probe"):
        RepeatTest(probe_bytes=513)


def test_counter_source_is_quarantined_and_never_credited() -> None:
    """
    A 256-byte counter (bytes 0..255 over and over) fails at the second probe,
    inside its start-up test, and is never credited.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    credited, events = feed_all(health, bytes(range(256)) * 4096)
    assert 0 == credited
    assert HealthState.QUARANTINED == health.state
    assert (HealthState.STARTUP, HealthState.QUARANTINED, 512 + 128) == events[0][:3]
    assert health.reason.startswith("repeat: 128 bytes at offset 512")
    assert 0 == health.counters.startups_passed
    assert 1 == health.counters.quarantines


@pytest.mark.parametrize("period", [4096, 65536])
def test_repeated_random_block_is_quarantined(period: int) -> None:
    """
    One random block (4 KiB, 64 KiB) sent over and over fails at the first
    probe of its first repetition and is never re-admitted.
    """
    block = random_bytes(period, period)
    health = SourceHealth(HealthConfig(), 8.0)
    _, events = feed_all(health, block * (3 + (1 << 20) // period))
    assert (HealthState.HEALTHY, HealthState.QUARANTINED, period + 128) == events[1][:3]
    assert [HealthState.STARTUP, HealthState.HEALTHY] == [e[0] for e in events[:2]]
    assert all(e[1] is HealthState.QUARANTINED for e in events[1:])
    assert HealthState.QUARANTINED == health.state
    assert f"already seen {period} bytes earlier" in health.reason
    assert 1 == health.counters.startups_passed


@pytest.mark.parametrize("period", [300, 1000, 4097, 32769, 65535])
def test_periods_not_aligned_to_probes_are_caught(period: int) -> None:
    """
    Any period up to 64 KiB fails at the first probe starting a period into
    the stream, whatever its alignment.
    """
    block = random_bytes(period, period)
    health = SourceHealth(HealthConfig(), 8.0)
    _, events = feed_all(health, block * (3 + 200_000 // period), chunk=1000)
    failures = [e for e in events if e[1] is HealthState.QUARANTINED]
    assert first_probe_after(period) + 128 == failures[0][2]
    assert failures[0][3].startswith("repeat:")
    assert HealthState.QUARANTINED == health.state


def test_period_past_the_window_is_not_caught() -> None:
    """
    The window is 64 KiB: a period one byte longer passes (documented limit).
    """
    test = RepeatTest()
    block = random_bytes(DEFAULT_WINDOW + 1, 3)
    assert [] == test.feed(block * 3)


def test_random_data_is_never_flagged() -> None:
    """
    16 MiB of random data, fed in uneven chunks, passes with every byte after
    the start-up credited.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    data = random_bytes(16 << 20, 99)
    credited, events = feed_all(health, data, chunk=12_345)
    assert [(HealthState.STARTUP, HealthState.HEALTHY)] == [e[:2] for e in events]
    assert len(data) - STARTUP_SAMPLES == credited
    assert 0 == health.counters.repeat_failures


def test_random_data_at_the_lowest_credit_is_never_flagged() -> None:
    """
    At 1/8 bit per byte the probes are 448 bytes long and still random data
    of several MiB never matches.
    """
    test = RepeatTest(probe_length(0.125, -40))
    assert 448 == test.probe_bytes
    data = random_bytes(4 << 20, 5)
    assert [] == test.feed(data)


def test_memory_is_bounded_by_the_window() -> None:
    """
    The test keeps less than W + 512 bytes however much it is fed.
    """
    test = RepeatTest()
    for seed in range(40):
        test.feed(random_bytes(9999, seed))
        assert test.held_bytes < DEFAULT_WINDOW + PROBE_EVERY
    assert 40 * 9999 == test.samples


def test_switch_turns_the_test_off() -> None:
    """
    With ``repeats = false`` a counter passes (the RCT and APT cannot see it).
    """
    config = HealthConfig.model_validate({"repeats": False})
    health = SourceHealth(config, 8.0)
    assert health.repeats is None
    credited, _ = feed_all(health, bytes(range(256)) * 64)
    assert HealthState.HEALTHY == health.state
    assert 256 * 64 - STARTUP_SAMPLES == credited
    assert HealthConfig().repeats
    with pytest.raises(ValidationError):
        HealthConfig.model_validate({"repeats": "sometimes"})


def test_replay_after_reopen_is_caught() -> None:
    """
    `reset` (a reopened device) keeps the window, so a device replaying what it
    sent before the reopen fails.
    """
    data = random_bytes(8192, 12)
    health = SourceHealth(HealthConfig(), 8.0)
    health.feed(data, 0.0)
    health.reset(1.0)
    verdict = health.feed(data, 2.0)
    assert HealthState.QUARANTINED == verdict.state
    assert health.reason.startswith("repeat:")


def _stream_part() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.integers(0, 2**32).map(lambda seed: random_bytes(90, seed)),
        st.binary(min_size=1, max_size=90),
        st.sampled_from([b"", b"\x00" * 40, bytes(range(50))]),
    )


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(_stream_part(), min_size=1, max_size=30),
    cuts=st.lists(st.integers(0, 3000), max_size=12),
    size=st.sampled_from([1, 4, 16]),
)
def test_any_split_matches_the_reference(
    parts: list[bytes], cuts: list[int], size: int
) -> None:
    """
    However the stream is split, the test reports exactly the probes that the
    byte-by-byte definition finds within the window.
    """
    stream = b"".join(parts)
    window = 700
    test = RepeatTest(probe_bytes=size, window=window)
    bounds = [0, *sorted({c for c in cuts if c <= len(stream)}), len(stream)]
    found = []
    for start, end in itertools.pairwise(bounds):
        found += [(start + f.end, f.count) for f in test.feed(stream[start:end])]
    expected = reference_repeats(stream, size, window)
    assert [end for end, _ in expected] == [end for end, _ in found]
    # Any earlier copy is a repeat; the reported distance names a real one.
    for end, distance in found:
        probe = end - size
        assert stream[probe - distance : probe - distance + size] == stream[probe:end]
        assert 0 < distance <= window
