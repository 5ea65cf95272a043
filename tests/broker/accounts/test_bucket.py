"""
Token bucket: starts full, refills at its rate, never holds more than its burst.
"""

import math

from hypothesis import given
from hypothesis import strategies as st

from broker.accounts.bucket import TokenBucket


def test_new_bucket_is_full() -> None:
    """
    A fresh bucket serves its whole burst at once, and not a byte more.
    """
    bucket = TokenBucket(100, 1000)
    assert 1000 == bucket.take(5000, 0.0)
    assert 0 == bucket.take(1, 0.0)


def test_refills_at_rate_up_to_burst() -> None:
    """
    Tokens accrue at ``rate`` per second and stop at ``burst``.
    """
    bucket = TokenBucket(100, 1000)
    bucket.take(1000, 0.0)
    assert 50 == bucket.take(1000, 0.5)
    assert 1000 == bucket.take(5000, 1000.0)


def test_fractions_keep_accruing() -> None:
    """
    Whole bytes are handed out; the fraction left over is not lost.
    """
    bucket = TokenBucket(1, 10)
    bucket.take(10, 0.0)
    assert 0 == bucket.take(1, 0.6)
    assert 1 == bucket.take(1, 1.2)


def test_time_until() -> None:
    """
    ``time_until`` says when ``n`` bytes (capped at burst) will be there.
    """
    bucket = TokenBucket(100, 1000)
    assert 0.0 == bucket.time_until(500, 0.0)
    bucket.take(1000, 0.0)
    assert math.isclose(2.0, bucket.time_until(200, 0.0))
    assert math.isclose(10.0, bucket.time_until(10_000, 0.0))
    assert math.isclose(10.0, bucket.time_until_full(0.0))


def test_zero_rate_never_refills() -> None:
    """
    A bucket with rate 0 serves its burst once; waiting for more is forever.
    """
    bucket = TokenBucket(0, 10)
    assert 10 == bucket.take(20, 0.0)
    assert math.inf == bucket.time_until(1, 100.0)


def test_refund_is_capped_at_burst() -> None:
    """
    Refunded bytes come back, but never above the burst.
    """
    bucket = TokenBucket(100, 1000)
    bucket.take(300, 0.0)
    bucket.refund(200)
    assert 900 == bucket.available(0.0)
    bucket.refund(10_000)
    assert 1000 == bucket.available(0.0)


def test_clock_stepping_back_mints_nothing() -> None:
    """
    A ``now`` earlier than the last one neither adds tokens nor breaks refills.
    """
    bucket = TokenBucket(100, 1000)
    bucket.take(1000, 100.0)
    assert 0 == bucket.take(1000, 50.0)
    assert 100 == bucket.take(1000, 101.0)


def test_reconfigure_caps_saved_tokens() -> None:
    """
    Lowering the burst drops tokens above it; the new rate applies at once.
    """
    bucket = TokenBucket(100, 1000)
    bucket.reconfigure(10, 100)
    assert 100 == bucket.take(1000, 0.0)
    assert 10 == bucket.take(1000, 1.0)


@given(
    rate=st.integers(1, 10_000),
    burst=st.integers(1, 100_000),
    steps=st.lists(
        st.tuples(st.floats(0, 10, allow_nan=False), st.integers(0, 50_000)),
        max_size=50,
    ),
)
def test_never_serves_more_than_burst_plus_rate_times_time(
    rate: int, burst: int, steps: list[tuple[float, int]]
) -> None:
    """
    Whatever the requests, bytes served <= burst + rate * elapsed time.
    """
    bucket = TokenBucket(rate, burst)
    now = 0.0
    total = 0
    for delay, wanted in steps:
        now += delay
        taken = bucket.take(wanted, now)
        assert 0 <= taken <= wanted
        total += taken
    assert total <= burst + rate * now + 1e-6
