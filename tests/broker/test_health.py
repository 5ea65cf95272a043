"""
Health tests: SP 800-90B cut-offs, RCT, APT, FIPS 140-2 and the per-source
state machine.
"""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker.health import (
    APT_WINDOW_BINARY,
    FIPS_BLOCK_BYTES,
    STARTUP_SAMPLES,
    AdaptiveProportionTest,
    Fips140Tester,
    HealthConfig,
    HealthEvent,
    HealthState,
    RepetitionCountTest,
    SourceHealth,
    apt_cutoff,
    fips_block_failures,
    rct_cutoff,
)

# Cut-offs from NIST SP 800-90B's formulas (RCT §4.4.1, APT §4.4.2; see
# broker.health_cutoffs): H -> (RCT at 2^-20, 2^-30, 2^-40), (APT W=512 at
# 2^-20, 2^-30, 2^-40).
TABLE = {
    0.5: ((41, 61, 81), (410, 422, 432)),
    1: ((21, 31, 41), (311, 325, 336)),
    2: ((11, 16, 21), (177, 190, 201)),
    4: ((6, 9, 11), (62, 71, 78)),
    6: ((5, 6, 8), (25, 31, 35)),
    7: ((4, 6, 7), (18, 22, 26)),
    8: ((4, 5, 6), (13, 16, 19)),
}
BINARY_TABLE = {
    0.2: (941, 952),
    0.4: (840, 856),
    0.5: (793, 810),
    0.6: (748, 766),
    0.8: (664, 683),
    1.0: (589, 609),
}
ALPHAS = (-20, -30, -40)


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def with_repeated_word(data: bytes, word: int) -> bytes:
    """
    Copy 64-bit word ``word - 1`` of ``data`` over word ``word``.
    """
    out = bytearray(data)
    out[8 * word : 8 * word + 8] = out[8 * word - 8 : 8 * word]
    return bytes(out)


def poker_failing_block(seed: int = 0) -> bytes:
    """
    A block whose nibbles are too evenly spread: each appears 312 or 313 times.
    """
    nibbles = [n for n in range(16) for _ in range(312)] + [1, 2, 4, 8, 7, 11, 13, 14]
    random.Random(seed).shuffle(nibbles)
    return bytes((nibbles[2 * i] << 4) | nibbles[2 * i + 1] for i in range(2500))


def monobit_failing_bytes(size: int, seed: int) -> bytes:
    """
    Bytes drawn from values with 4 or 5 one-bits: 55 % ones, flat enough for
    the APT, distinct enough for the RCT.
    """
    values = [v for v in range(256) if v.bit_count() in (4, 5)]
    rng = random.Random(seed)
    return bytes(rng.choice(values) for _ in range(size))


def reference_rct(
    data: bytes, size: int, cutoff: int, permanent: int | None
) -> list[tuple[int, int, bool]]:
    """
    SP 800-90B's RCT, one sample at a time: (end, count, permanent) per crossing.
    """
    out = []
    last = None
    run = 0
    for j in range(len(data) // size):
        sample = data[j * size : (j + 1) * size]
        run = run + 1 if sample == last else 1
        last = sample
        if run == cutoff:
            out.append(((j + 1) * size, cutoff, False))
        if run == permanent:
            out.append(((j + 1) * size, permanent, True))
    return out


def reference_apt(
    data: bytes, window: int, cutoff: int, permanent: int | None
) -> list[tuple[int, int, bool]]:
    """
    SP 800-90B's APT, one sample at a time: (end, count, permanent) per crossing.
    """
    out = []
    first = 0
    count = 0
    for i, sample in enumerate(data):
        if i % window == 0:
            first, count = sample, 1
        elif sample == first:
            count += 1
        else:
            continue
        if count == cutoff:
            out.append((i + 1, cutoff, False))
        if count == permanent:
            out.append((i + 1, permanent, True))
    return out


def feed_in_pieces(
    test: RepetitionCountTest | AdaptiveProportionTest, data: bytes, cuts: list[int]
) -> list[tuple[int, int, bool]]:
    out = []
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(bounds):
        out += [
            (start + f.end, f.count, f.permanent) for f in test.feed(data[start:end])
        ]
    return out


@pytest.mark.parametrize("h", sorted(TABLE))
@pytest.mark.parametrize("column", range(3))
def test_rct_cutoffs_match_the_table(h: float, column: int) -> None:
    """
    The RCT cut-off matches every cell of TABLE.
    """
    assert TABLE[h][0][column] == rct_cutoff(h, ALPHAS[column])


@pytest.mark.parametrize("h", sorted(TABLE))
@pytest.mark.parametrize("column", range(3))
def test_apt_cutoffs_match_the_table(h: float, column: int) -> None:
    """
    The APT cut-off for W = 512 matches every cell of TABLE.
    """
    assert TABLE[h][1][column] == apt_cutoff(h, ALPHAS[column], 512)


@pytest.mark.parametrize("h", sorted(BINARY_TABLE))
@pytest.mark.parametrize("column", range(2))
def test_binary_apt_cutoffs_match_the_table(h: float, column: int) -> None:
    """
    The APT cut-off for binary samples (W = 1024) matches BINARY_TABLE.
    """
    expected = BINARY_TABLE[h][column]
    assert expected == apt_cutoff(h, ALPHAS[column], APT_WINDOW_BINARY)


def test_jitterentropy_cutoffs() -> None:
    """
    H = 1 gives jitterentropy's intermittent (2^-30) and permanent (2^-60) cut-offs.
    """
    assert (31, 325) == (rct_cutoff(1, -30), apt_cutoff(1, -30))
    assert (61, 355) == (rct_cutoff(1, -60), apt_cutoff(1, -60))


def test_cutoffs_for_words_and_limits() -> None:
    """
    64-bit words at H = 8 bits/byte give C = 2; the APT cut-off never exceeds W.
    """
    assert 2 == rct_cutoff(64, -30)
    assert 5 == rct_cutoff(8, -30)
    assert 512 == apt_cutoff(0.01, -40)
    with pytest.raises(ValueError, match="positive"):
        rct_cutoff(0, -30)
    with pytest.raises(ValueError, match="negative"):
        apt_cutoff(8, 0)


def test_rct_trips_on_stuck_bytes_at_the_cutoff() -> None:
    """
    Stuck bytes fail the RCT exactly at the cut-off-th equal sample.
    """
    rct = RepetitionCountTest(5, permanent_cutoff=9)
    failures = rct.feed(b"\x01" + bytes(20))
    assert [(6, 5, False), (10, 9, True)] == [
        (f.end, f.count, f.permanent) for f in failures
    ]
    assert 20 == rct.run


def test_rct_on_words_sees_repeats_across_calls() -> None:
    """
    A 64-bit repeat split over three calls is found at the repeated word's end.
    """
    data = with_repeated_word(random_bytes(64, 1), 3)
    rct = RepetitionCountTest(2, sample_bytes=8)
    assert [] == rct.feed(data[:13])
    assert [] == rct.feed(data[13:27])
    failures = rct.feed(data[27:])
    assert [32 - 27] == [f.end for f in failures]


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=300).map(lambda b: bytes(x % 3 for x in b)),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    size=st.sampled_from([1, 2, 8]),
)
def test_rct_matches_the_reference_for_any_split(
    data: bytes, cuts: list[int], size: int
) -> None:
    """
    However the stream is split, the RCT reports what SP 800-90B's loop does.
    """
    rct = RepetitionCountTest(3, sample_bytes=size, permanent_cutoff=5)
    cuts = [c for c in cuts if c <= len(data)]
    assert reference_rct(data, size, 3, 5) == feed_in_pieces(rct, data, cuts)


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=200).map(lambda b: bytes(x % 3 for x in b)),
    cuts=st.lists(st.integers(0, 200), max_size=6),
)
def test_apt_matches_the_reference_for_any_split(data: bytes, cuts: list[int]) -> None:
    """
    However the stream is split, the APT reports what SP 800-90B's loop does.
    """
    apt = AdaptiveProportionTest(6, window=16, permanent_cutoff=9)
    cuts = [c for c in cuts if c <= len(data)]
    assert reference_apt(data, 16, 6, 9) == feed_in_pieces(apt, data, cuts)


def test_apt_trips_on_a_biased_source() -> None:
    """
    Bytes where 0x00 has probability 1/8 fail the APT within a few windows.
    """
    rng = random.Random(7)
    data = bytes(
        0 if rng.random() < 1 / 8 else rng.randrange(1, 256) for _ in range(8192)
    )
    apt = AdaptiveProportionTest(apt_cutoff(8, -40))
    failures = apt.feed(data)
    assert failures
    first = failures[0]
    window_start = (first.end - 1) // 512 * 512
    assert 0 == data[window_start]
    assert 19 == data[window_start : first.end].count(0)


def test_apt_counts_the_window_first_sample() -> None:
    """
    A window's first value seen 19 times (itself included) fails at the 19th.
    """
    data = bytearray(range(1, 256)) * 3
    data = data[:512]
    for i in range(0, 19 * 10, 10):
        data[i] = 0
    apt = AdaptiveProportionTest(19)
    assert [(181, 19)] == [(f.end, f.count) for f in apt.feed(bytes(data))]


def test_fips_passes_good_blocks_at_the_expected_rate() -> None:
    """
    Seeded random blocks fail about 1 in 1,270 times, not more.
    """
    tester = Fips140Tester()
    results = tester.feed(random_bytes(2000 * FIPS_BLOCK_BYTES, 2024))
    failed = [r for r in results if r.failed]
    assert 2000 == len(results)
    assert len(failed) <= 8
    assert not any(r.tripped for r in results)


def test_fips_zero_block_fails() -> None:
    """
    An all-zero block fails monobit, poker, runs and long run.
    """
    assert ("monobit", "poker", "runs", "long_run") == fips_block_failures(bytes(2500))


def test_fips_too_even_nibbles_fail_poker() -> None:
    """
    Nibble counts that are too uniform fail poker and only poker.
    """
    assert ("poker",) == fips_block_failures(poker_failing_block())


def test_fips_long_run_alone() -> None:
    """
    26 equal bits fail the long-run test; 25 do not.
    """
    block = bytearray(random_bytes(2500, 5))
    block[100:104] = b"\xff\xff\xff\xc0"  # 26 ones, then zeros
    block[99] &= 0xFE
    assert "long_run" in fips_block_failures(bytes(block))
    block[103] = 0x80  # 25 ones
    assert "long_run" not in fips_block_failures(bytes(block))


def test_fips_continuous_test_spans_blocks() -> None:
    """
    A 32-bit word equal to the last word of the previous block fails the block.
    """
    first = random_bytes(2500, 11)
    second = first[-4:] + random_bytes(2496, 12)
    tester = Fips140Tester()
    results = tester.feed(first[:1000]) + tester.feed(first[1000:] + second)
    assert [1500, 4000] == [r.end for r in results]
    assert [(), ("continuous",)] == [r.failed for r in results]


def test_fips_leaky_count_forgives() -> None:
    """
    Good blocks forgive failures, so only a burst trips the tester.
    """
    good = random_bytes(2500 * 5, 3)
    assert not any(r.failed for r in Fips140Tester().feed(good))
    bad = poker_failing_block()
    tester = Fips140Tester(max_failures=3, forgive_every=5)
    tester.feed(bad + bad)
    assert 2 == tester.failures
    tester.feed(good)
    assert 1 == tester.failures
    assert not any(r.tripped for r in tester.feed(bad))
    assert [True] == [r.tripped for r in tester.feed(bad)]
    assert 0 == tester.failures


def test_healthy_data_never_trips() -> None:
    """
    4 MB of good random data passes: one start-up, then every byte credited.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    data = random_bytes(4 << 20, 42)
    credited = 0
    events: list[HealthEvent] = []
    for i in range(0, len(data), 4096):
        verdict = health.feed(data[i : i + 4096], float(i))
        credited += verdict.creditable
        events += verdict.events
    assert HealthState.HEALTHY == health.state
    assert len(data) - STARTUP_SAMPLES == credited
    assert [(HealthState.STARTUP, HealthState.HEALTHY)] == [
        (e.from_state, e.to_state) for e in events
    ]
    counters = health.counters
    assert (len(data), 0, 0, 1, 0) == (
        counters.samples_tested,
        counters.rct_failures,
        counters.apt_failures,
        counters.startups_passed,
        counters.quarantines,
    )


def test_healthy_data_with_fips_never_quarantines() -> None:
    """
    With FIPS on, good data may fail a block now and then; each is a hold until
    the next block passes, never a quarantine for a source failure.
    """
    health = SourceHealth(HealthConfig(fips=True), 8.0)
    data = random_bytes(4 << 20, 43)
    for i in range(0, len(data), 4096):
        health.feed(data[i : i + 4096], 0.0)
    assert HealthState.HEALTHY == health.state
    assert 0 == health.counters.quarantines
    assert len(data) // FIPS_BLOCK_BYTES == health.counters.fips_blocks


def test_startup_credits_nothing_before_1024_samples() -> None:
    """
    The first 1,024 bytes are never credited; credit starts with byte 1,025.
    """
    data = random_bytes(3000, 9)
    health = SourceHealth(HealthConfig(), 8.0)
    first = health.feed(data[:1023], 0.0)
    assert (0, HealthState.STARTUP, ()) == (first.creditable, first.state, first.events)
    second = health.feed(data[1023:1024], 1.0)
    assert (0, HealthState.HEALTHY) == (second.creditable, second.state)
    assert [(1024, 1.0)] == [(e.position, e.time) for e in second.events]
    assert 10 == health.feed(data[1024:1034], 2.0).creditable
    other = SourceHealth(HealthConfig(), 8.0)
    assert 1500 - 1024 == other.feed(data[:1500], 0.0).creditable


def test_stuck_source_fails_at_exact_samples() -> None:
    """
    All-zero output: RCT at the 2nd word, APT at the 19th byte, and with
    permanent cut-offs configured (alpha 2^-60), permanent at the 3rd word.
    """
    health = SourceHealth(HealthConfig(permanent_alpha_log2=-60), 8.0)
    verdict = health.feed(bytes(4096), 5.0)
    assert 0 == verdict.creditable
    assert [
        (HealthState.STARTUP, HealthState.QUARANTINED, 16),
        (HealthState.QUARANTINED, HealthState.QUARANTINED, 19),
        (HealthState.QUARANTINED, HealthState.FAILED, 24),
    ] == [(e.from_state, e.to_state, e.position) for e in verdict.events]
    assert HealthState.FAILED == health.state
    assert 5.0 == health.failed_at
    assert "permanent" in health.reason
    assert 24 == health.counters.samples_tested


def test_lower_credit_means_longer_runs_before_failure() -> None:
    """
    At 1 bit/byte a word carries 8 bits: the RCT fails at 5 equal words (byte 40).
    """
    config = HealthConfig(permanent_alpha_log2=None, permanent_failures=100)
    health = SourceHealth(config, 1.0)
    verdict = health.feed(random_bytes(8, 1) * 6, 0.0)
    assert [40] == [e.position for e in verdict.events]


def test_quarantine_then_readmission_after_fresh_startup() -> None:
    """
    One repeated word quarantines the source; 1,024 clean bytes re-admit it.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    good = random_bytes(20000, 4)
    assert 2048 - 1024 == health.feed(good[:2048], 0.0).creditable
    bad = with_repeated_word(good[2048:4096], 250)
    failed = health.feed(bad, 1.0)
    assert 0 == failed.creditable
    assert HealthState.QUARANTINED == health.state
    [event] = failed.events
    assert (2048 + 2008, 1.0) == (event.position, event.time)
    assert "RCT: 2 equal consecutive 8-byte samples" in event.reason
    # The start-up restarts after the failing word: 4056 + 1024 = 5080.
    assert 0 == health.feed(good[4096:5000], 2.0).creditable
    admitted = health.feed(good[5000:6000], 3.0)
    assert HealthState.HEALTHY == admitted.state
    assert [5080] == [e.position for e in admitted.events]
    assert 6000 - 5080 == admitted.creditable
    counters = health.counters
    assert (1, 2, 1) == (
        counters.rct_failures,
        counters.startups_passed,
        counters.quarantines,
    )


def test_repeated_failures_fail_the_source_with_reason_and_time() -> None:
    """
    Three failures within the window make the source FAILED, with the time.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    stream = random_bytes(12 * 2048, 8)
    states = []
    for n, now in enumerate((10.0, 20.0, 30.0)):
        chunk = stream[n * 4096 : (n + 1) * 4096]
        states.append(health.feed(with_repeated_word(chunk, 500), now).state)
    assert [
        HealthState.QUARANTINED,
        HealthState.QUARANTINED,
        HealthState.FAILED,
    ] == states
    assert 30.0 == health.failed_at
    assert "3 failures within 3600 s" in health.reason
    assert "RCT" in health.reason
    assert 0 == health.feed(stream[-4096:], 40.0).creditable
    assert health.reset(50.0) is None
    assert HealthState.FAILED == health.state


def test_failures_spread_out_do_not_fail_the_source() -> None:
    """
    Failures further apart than failure_window only ever quarantine.
    """
    health = SourceHealth(HealthConfig(failure_window="1 h"), 8.0)
    stream = random_bytes(8 * 4096, 13)
    for n in range(8):
        chunk = stream[n * 4096 : (n + 1) * 4096]
        health.feed(with_repeated_word(chunk, 500), n * 4000.0)
    assert HealthState.QUARANTINED == health.state
    assert 8 == health.counters.rct_failures


def test_reset_restarts_the_startup_test() -> None:
    """
    After reset() a healthy source credits nothing until a new start-up passes.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    data = random_bytes(6000, 21)
    health.feed(data[:2000], 0.0)
    event = health.reset(1.0)
    assert event is not None
    assert (HealthState.HEALTHY, HealthState.STARTUP, 2000) == (
        event.from_state,
        event.to_state,
        event.position,
    )
    assert 0 == health.feed(data[2000:3000], 2.0).creditable
    assert 3100 - 3024 == health.feed(data[3000:3100], 3.0).creditable


def test_fips_failures_hold_then_quarantine_past_the_threshold() -> None:
    """
    A failed FIPS block quarantines the source with its reason until a block
    passes, without counting as a source failure; at the limit the failures
    are one.
    """
    health = SourceHealth(HealthConfig(fips=True, fips_max_failures=3), 8.0)
    good = random_bytes(4 * FIPS_BLOCK_BYTES, 31)
    assert HealthState.HEALTHY == health.feed(good, 0.0).state
    bad = monobit_failing_bytes(3 * FIPS_BLOCK_BYTES, 32)
    first = health.feed(bad[:FIPS_BLOCK_BYTES], 1.0)
    assert (0, HealthState.QUARANTINED) == (first.creditable, first.state)
    [hold] = first.events
    assert 5 * FIPS_BLOCK_BYTES == hold.position
    assert health.reason.startswith("FIPS 140-2 block failed (monobit")
    assert "nothing is credited until a block passes" in health.reason
    assert 0 == health.counters.quarantines
    # After a failed block nothing is credited until a block passes.
    held = health.feed(bad[FIPS_BLOCK_BYTES : FIPS_BLOCK_BYTES + 100], 1.5)
    assert (0, HealthState.QUARANTINED) == (held.creditable, held.state)
    rest = health.feed(bad[FIPS_BLOCK_BYTES + 100 :], 2.0)
    assert HealthState.QUARANTINED == rest.state
    assert "FIPS 140-2: 3 failed blocks (last: monobit" in rest.events[-1].reason
    assert 4 * FIPS_BLOCK_BYTES + 3 * FIPS_BLOCK_BYTES == rest.events[-1].position
    assert health.reason.startswith("FIPS 140-2: 3 failed blocks")
    counters = health.counters
    assert (7, 3, 0, 0, 1) == (
        counters.fips_blocks,
        counters.fips_failures,
        counters.rct_failures,
        counters.apt_failures,
        counters.quarantines,
    )


def test_disabled_health_credits_everything() -> None:
    """
    With the tests disabled every byte is credited at once, even zeros.
    """
    health = SourceHealth(HealthConfig(enabled=False), 8.0)
    verdict = health.feed(bytes(100), 0.0)
    assert (100, HealthState.HEALTHY, ()) == (
        verdict.creditable,
        verdict.state,
        verdict.events,
    )


def test_zero_credit_source_is_still_checked_for_being_stuck() -> None:
    """
    A source credited 0 bits is tested as if it had 1/8 bit per byte.
    """
    health = SourceHealth(HealthConfig(), 0.0)
    assert 31 == health.rct.cutoff
    assert HealthState.QUARANTINED == health.feed(bytes(8192), 0.0).state


def test_config_defaults_and_validation() -> None:
    """
    Defaults follow the false-alarm arithmetic; nonsense is refused.
    """
    config = HealthConfig()
    assert (-30, -40, None, 40, 3, 3600.0) == (
        config.alpha_log2,
        config.apt_alpha_log2,
        config.permanent_alpha_log2,
        config.fips_max_failures,
        config.permanent_failures,
        config.failure_window,
    )
    with pytest.raises(ValidationError, match="alpha_log2"):
        HealthConfig(alpha_log2=-5)
    with pytest.raises(ValidationError, match="permanent_alpha_log2 must be below"):
        HealthConfig(permanent_alpha_log2=-35)
    with pytest.raises(ValidationError, match="extra"):
        HealthConfig.model_validate({"alpah_log2": -30})


def _stream_part() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.integers(0, 2**32).map(lambda seed: random_bytes(700, seed)),
        st.integers(1, 40).map(bytes),
        st.binary(min_size=1, max_size=30).map(lambda b: b * 20),
    )


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(_stream_part(), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 9000), max_size=10),
    fips=st.booleans(),
)
def test_any_split_gives_the_same_events_and_counters(
    parts: list[bytes], cuts: list[int], fips: bool
) -> None:
    """
    Feeding a stream whole or in any pieces gives the same events and counters.
    """
    config = HealthConfig(fips=fips, fips_max_failures=1, permanent_failures=50)
    stream = b"".join(parts)
    whole = SourceHealth(config, 8.0)
    whole_verdict = whole.feed(stream, 0.0)
    split = SourceHealth(config, 8.0)
    bounds = [0, *sorted({c for c in cuts if c <= len(stream)}), len(stream)]
    events: list[HealthEvent] = []
    for start, end in itertools.pairwise(bounds):
        events += split.feed(stream[start:end], 0.0).events
    assert list(whole_verdict.events) == events
    assert whole.counters == split.counters
    assert whole.state == split.state


def test_one_stuck_incident_counts_once() -> None:
    """
    A source stuck for many APT windows is one quarantine, not a permanent
    failure; only the quarantine time limit fails it.
    """
    health = SourceHealth(HealthConfig(quarantine_limit=60), 8.0)
    health.feed(random_bytes(2048, 7), 0.0)
    assert HealthState.QUARANTINED == health.feed(bytes(16384), 1.0).state
    assert HealthState.QUARANTINED == health.feed(bytes(16384), 59.0).state
    assert 1 == health.counters.quarantines
    verdict = health.feed(bytes(16384), 62.0)
    assert HealthState.FAILED == verdict.state
    assert "quarantine" in health.reason


def test_quarantine_keeps_its_first_reason() -> None:
    """
    A stuck source fails again in every APT window while quarantined; the
    reported reason stays the cause that quarantined it.
    """
    health = SourceHealth(HealthConfig(), 8.0)
    health.feed(random_bytes(2048, 3), 0.0)
    health.feed(bytes(8192), 1.0)
    assert HealthState.QUARANTINED == health.state
    assert health.reason.startswith("RCT")
