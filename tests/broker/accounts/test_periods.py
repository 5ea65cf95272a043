"""
Quota periods: UTC calendar hours, days, ISO weeks and months.
"""

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.accounts.periods import (
    PERIODS,
    PeriodName,
    Quota,
    parse_quota,
    period_bounds,
    period_key,
)


def ts(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> float:
    """
    Unix time of a UTC date-time.
    """
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200 MiB/day", Quota(200 * 1024**2, "day")),
        ("5 GiB/month", Quota(5 * 1024**3, "month")),
        ("1 GiB / week", Quota(1024**3, "week")),
        ("10MiB/hour", Quota(10 * 1024**2, "hour")),
        ("1000/d", Quota(1000, "day")),
    ],
)
def test_parse_quota(text: str, expected: Quota) -> None:
    """
    Sizes reuse the size parser; periods accept their names and short forms.
    """
    assert expected == parse_quota(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("200 MiB", "not a quota"),
        ("200 MiB/year", "unknown quota period"),
        ("lots/day", "not a size"),
    ],
)
def test_parse_quota_errors(text: str, message: str) -> None:
    """
    A bad quota says what is wrong.
    """
    with pytest.raises(ValueError, match=message):
        parse_quota(text)


def test_quota_text_round_trips() -> None:
    """
    ``str(quota)`` (how config serialises it) parses back to the same quota.
    """
    quota = parse_quota("5 GiB/month")
    assert quota == parse_quota(str(quota))


def test_day() -> None:
    """
    A day runs from 00:00 UTC to the next 00:00 UTC.
    """
    now = ts(2024, 5, 1, 13, 45, 10)
    assert (ts(2024, 5, 1), ts(2024, 5, 2)) == period_bounds("day", now)
    assert "day:2024-05-01" == period_key("day", now)


def test_hour() -> None:
    """
    An hour is a UTC clock hour.
    """
    now = ts(2024, 5, 1, 13, 45, 10)
    assert (ts(2024, 5, 1, 13), ts(2024, 5, 1, 14)) == period_bounds("hour", now)
    assert "hour:2024-05-01T13" == period_key("hour", now)


def test_week_starts_monday() -> None:
    """
    Weeks are ISO weeks: Monday 00:00 UTC to the next Monday.
    """
    sunday = ts(2024, 5, 5, 23, 59)
    assert (ts(2024, 4, 29), ts(2024, 5, 6)) == period_bounds("week", sunday)
    assert "week:2024-W18" == period_key("week", sunday)
    assert "week:2024-W19" == period_key("week", ts(2024, 5, 6))


def test_iso_week_year_boundary() -> None:
    """
    1 January 2021 (a Friday) belongs to ISO week 53 of 2020.
    """
    assert "week:2020-W53" == period_key("week", ts(2021, 1, 1, 12))


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        (ts(2024, 2, 29, 12), ts(2024, 2, 1), ts(2024, 3, 1)),
        (ts(2023, 2, 10), ts(2023, 2, 1), ts(2023, 3, 1)),
        (ts(2024, 12, 31, 23, 59, 59), ts(2024, 12, 1), ts(2025, 1, 1)),
        (ts(2024, 4, 1), ts(2024, 4, 1), ts(2024, 5, 1)),
    ],
)
def test_month(now: float, start: float, end: float) -> None:
    """
    Months have their calendar lengths, leap Februaries and year ends included.
    """
    assert (start, end) == period_bounds("month", now)


@given(
    period=st.sampled_from(PERIODS),
    now=st.floats(ts(2000, 1, 1), ts(2100, 1, 1), allow_nan=False),
)
def test_bounds_contain_now_and_key_changes_at_end(
    period: PeriodName, now: float
) -> None:
    """
    start <= now < end; the whole period shares one key; the end starts a new one.
    """
    start, end = period_bounds(period, now)
    assert start <= now < end
    assert period_key(period, now) == period_key(period, start)
    assert period_key(period, now) != period_key(period, end)
    assert (end, period_bounds(period, end)[1]) == period_bounds(period, end)
