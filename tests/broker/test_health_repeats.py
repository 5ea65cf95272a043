"""
The repeat test: periodic output (counters, replayed blocks, replayed frames
with a sequence number) fails at any period up to 64 KiB and any alignment;
random output never does.
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
from broker.health_repeats import DEFAULT_WINDOW, PROBE_EVERY, group_layout

YEAR = 3.156e7
RATES = (4096, 1 << 20)
# The false-alarm table of broker.health_repeats: credit -> (L, factor and
# log2 of the per-group bound, false alarms per year at 4 KiB/s and 1 MiB/s).
TABLE = {
    8.0: (29, 5, -448, 0.0, 0.0),
    1.0: (56, 5, -96, 1.6e-20, 4.1e-18),
    0.125: (448, 1, -40, 2.3e-4, 0.059),
}
GROUP = RepeatTest().group_bytes
"""Bytes of a probe group at the default credit (125)."""


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


def first_group_after(offset: int) -> int:
    """
    Stream offset of the first probe group that starts at or after ``offset``.
    """
    return -(-offset // PROBE_EVERY) * PROBE_EVERY


def reference_repeats(data: bytes, size: int, window: int) -> list[tuple[int, int]]:
    """
    The test's definition, group by group: (end, distance found).
    """
    offsets, anchors, matches = group_layout(size)
    span = offsets[-1] + size
    out = []
    for group in range(0, len(data) - span + 1, PROBE_EVERY):
        for anchor in offsets[:anchors]:
            start = group + anchor
            needle = data[start : start + size]
            earliest = [
                earlier
                for earlier in range(max(start - window, 0), start)
                if data[earlier : earlier + size] == needle
            ]
            if not earliest:
                continue
            distance = start - earliest[0]
            same = sum(
                1
                for offset in offsets
                if group + offset - distance >= 0
                and data[group + offset - distance :][:size]
                == data[group + offset :][:size]
            )
            if same >= matches:
                out.append((group + span, distance))
                break
    return out


@pytest.mark.parametrize("h", sorted(TABLE))
def test_false_alarm_table_rows(h: float) -> None:
    """
    Each row of the module's table follows from L, W = 2^16 and a group every
    512 bytes: four sub-probes fail on an anchor and one other sub-probe at one
    distance (5 pairs, 2L bytes), a single probe on any match.
    """
    size, pairs, log2_per_group, per_year_slow, per_year_fast = TABLE[h]
    assert size == probe_length(h, -40)
    offsets, anchors, matches = group_layout(size)
    if pairs == 1:
        assert ((0,), 1, 1) == (offsets, anchors, matches)
        assert log2_per_group == math.log2(DEFAULT_WINDOW) - size * h
    else:
        assert (4, 2, 2) == (len(offsets), anchors, matches)
        assert pairs == sum(len(offsets) - 1 - a for a in range(anchors))
        assert log2_per_group == math.log2(DEFAULT_WINDOW) - 2 * size * h
    for rate, expected in zip(RATES, (per_year_slow, per_year_fast), strict=True):
        per_year = rate / PROBE_EVERY * YEAR * pairs * 2.0**log2_per_group
        assert expected == pytest.approx(per_year, rel=0.05, abs=1e-120)


def test_probe_length_limits() -> None:
    """
    Probes are never shorter than 29 nor longer than 512 bytes; four fit in a
    group up to 125 bytes each; nonsense fails.
    """
    assert 29 == probe_length(8, -40)
    assert 29 == probe_length(8, -100)
    assert 64 == probe_length(8, -496)
    assert 512 == probe_length(0.125, -100)
    with pytest.raises(ValueError, match="positive"):
        probe_length(0, -40)
    with pytest.raises(ValueError, match="negative"):
        probe_length(8, 0)
    with pytest.raises(ValueError, match="window"):
        probe_length(8, -40, 0)
    with pytest.raises(ValueError, match="probe"):
        RepeatTest(probe_bytes=513)
    with pytest.raises(ValueError, match="window"):
        RepeatTest(window=0)
    assert (0, 32, 64, 96) == RepeatTest().offsets
    assert 125 == GROUP
    assert 509 == RepeatTest(125).group_bytes
    assert ((0,), 1, 1) == group_layout(126)


def test_counter_source_is_quarantined_and_never_credited() -> None:
    """
    A 256-byte counter (bytes 0..255 over and over) fails at the second group,
    inside its start-up test, and is never credited.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    credited, events = feed_all(health, bytes(range(256)) * 4096)
    assert 0 == credited
    assert HealthState.QUARANTINED == health.state
    assert (HealthState.STARTUP, HealthState.QUARANTINED, 512 + GROUP) == events[0][:3]
    assert health.reason.startswith("repeat: 125 bytes at offset 512")
    assert 0 == health.counters.startups_passed
    assert 1 == health.counters.quarantines


@pytest.mark.parametrize("period", [4096, 65536])
def test_repeated_random_block_is_quarantined(period: int) -> None:
    """
    One random block (4 KiB, 64 KiB) sent over and over fails at the first
    group of its first repetition and is never re-admitted.
    """
    block = random_bytes(period, period)
    health = SourceHealth(HealthConfig(), 8.0)
    _, events = feed_all(health, block * (3 + (1 << 20) // period))
    assert (HealthState.HEALTHY, HealthState.QUARANTINED, period + GROUP) == events[1][
        :3
    ]
    assert [HealthState.STARTUP, HealthState.HEALTHY] == [e[0] for e in events[:2]]
    assert all(e[1] is HealthState.QUARANTINED for e in events[1:])
    assert HealthState.QUARANTINED == health.state
    assert f"already seen {period} bytes earlier" in health.reason
    assert 1 == health.counters.startups_passed


@pytest.mark.parametrize("period", [300, 1000, 4097, 32769, 65535])
def test_periods_not_aligned_to_probes_are_caught(period: int) -> None:
    """
    Any period up to 64 KiB fails at the first group whose second anchor
    (offset 32) starts a period into the stream, whatever its alignment.
    """
    block = random_bytes(period, period)
    health = SourceHealth(HealthConfig(), 8.0)
    _, events = feed_all(health, block * (3 + 200_000 // period), chunk=1000)
    failures = [e for e in events if e[1] is HealthState.QUARANTINED]
    assert first_group_after(period - 32) + GROUP == failures[0][2]
    assert failures[0][3].startswith("repeat:")
    assert HealthState.QUARANTINED == health.state


def numbered(record: bytes, count: int, at: int, width: int) -> bytes:
    """
    ``record`` ``count`` times, each copy with its index (``width`` bytes,
    little-endian) written at offset ``at``: a replayed frame with a sequence
    number.
    """
    return b"".join(
        record[:at] + (i % 256**width).to_bytes(width, "little") + record[at + width :]
        for i in range(count)
    )


def ticked(record: bytes, count: int, every: int) -> bytes:
    """
    ``record`` ``count`` times, one byte every ``every`` bytes changing with
    each copy.
    """
    out = bytearray()
    for i in range(count):
        copy = bytearray(record)
        for offset in range(0, len(copy), every):
            copy[offset] = (i + offset) % 256
        out += copy
    return bytes(out)


_A, _B = random_bytes(4096, 21), random_bytes(4096, 22)
REPLAYS = {
    "512-byte record, 4-byte sequence number at offset 0": numbered(
        random_bytes(512, 1), 2048, 0, 4
    ),
    "512-byte record, 4-byte sequence number at offset 200": numbered(
        random_bytes(512, 2), 2048, 200, 4
    ),
    "128-byte frames, 4-byte sequence number": numbered(
        random_bytes(128, 3), 8192, 0, 4
    ),
    "64-byte packets, 2-byte sequence number": numbered(
        random_bytes(64, 4), 16384, 0, 2
    ),
    "64-byte packets, 4-byte sequence number at offset 30": numbered(
        random_bytes(64, 5), 16384, 30, 4
    ),
    "1,000-byte record, one changing byte every 100 bytes": ticked(
        random_bytes(1000, 6), 1048, 100
    ),
    "two alternating 4 KiB blocks": random_bytes(8192, 7) + (_A + _B) * 128,
    "4 KiB buffer, byte 0 changing": numbered(random_bytes(4096, 8), 256, 0, 1),
}


@pytest.mark.parametrize("name", sorted(REPLAYS))
def test_replayed_frames_with_sequence_numbers_are_caught(name: str) -> None:
    """
    A replayed record, frame or packet whose copies differ only in a sequence
    number or a few changing bytes fails at the first group lying wholly in
    its second copy; when it repeats from the start it is never credited.
    """
    stream = REPLAYS[name]
    health = SourceHealth(HealthConfig(), 8.0)
    credited, events = feed_all(health, stream)
    assert HealthState.QUARANTINED == health.state
    assert health.counters.repeat_failures > len(stream) // PROBE_EVERY - 40
    assert all(e[1] is HealthState.QUARANTINED for e in events[1:])
    if name.startswith("two alternating"):
        assert 16384 - STARTUP_SAMPLES == credited
    elif name.startswith("4 KiB buffer"):
        assert 4096 - STARTUP_SAMPLES == credited
    else:
        assert 0 == credited


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    spacing=st.integers(64, 200),
    width=st.integers(1, 4),
    phase=st.integers(0, 199),
    fields=st.integers(1, 80),
)
def test_changed_fields_sixty_bytes_apart_are_caught(
    seed: int, spacing: int, width: int, phase: int, fields: int
) -> None:
    """
    The module's promise: a stream that repeats at distance P except for
    changed fields of at most 4 bytes with at least 60 unchanged bytes
    between them fails by the first group starting P bytes in (one group
    earlier when its second anchor already is P bytes in and unchanged).
    """
    period = spacing * fields
    copies = 3 + 2 * PROBE_EVERY // period
    stream = bytearray(random_bytes(period, seed) * copies)
    for start in range(phase % spacing, len(stream), spacing):
        copy = start // period
        for i in range(start, min(start + width, len(stream))):
            stream[i] = (copy * 31 + i) % 256
    failures = RepeatTest().feed(bytes(stream))
    assert failures
    latest = first_group_after(period) + GROUP
    assert failures[0].end in {latest, first_group_after(period - 32) + GROUP}
    assert 0 == failures[0].count % period


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
    size=st.sampled_from([1, 4, 16, 29, 200]),
)
def test_any_split_matches_the_reference(
    parts: list[bytes], cuts: list[int], size: int
) -> None:
    """
    However the stream is split, the test reports exactly the groups that the
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
    assert expected == found
    # The reported distance names a real repeat of an anchor.
    offsets, anchors, _ = group_layout(size)
    for end, distance in found:
        group = end - test.group_bytes
        assert 0 < distance <= window
        assert any(
            stream[group + a - distance :][:size] == stream[group + a :][:size]
            for a in offsets[:anchors]
        )
