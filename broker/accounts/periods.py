"""
Quota periods: calendar hours, days, ISO weeks and months, all in UTC.

A quota is counted per period, and a period is a calendar unit rather than a
sliding window, so every broker (and every restart of one) agrees on when a
quota resets. Time is always an argument here: this module never reads a clock.
"""

import calendar
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal, get_args

from pydantic import BeforeValidator, PlainSerializer

from broker.units import parse_size

PeriodName = Literal["hour", "day", "week", "month"]
PERIODS: tuple[PeriodName, ...] = get_args(PeriodName)

_ALIASES: dict[str, PeriodName] = {
    "h": "hour",
    "hour": "hour",
    "d": "day",
    "day": "day",
    "w": "week",
    "week": "week",
    "month": "month",
    "mo": "month",
}


@dataclass(frozen=True, slots=True)
class Quota:
    """
    ``bytes`` bytes per calendar ``period`` (UTC).
    """

    bytes: int
    period: PeriodName

    def __str__(self) -> str:
        return f"{self.bytes} B/{self.period}"


def parse_quota(value: object) -> Quota:
    """
    Turn ``"200 MiB/day"``, ``"5 GiB/month"``, ``"1 GiB/week"`` or
    ``"10 MiB/hour"`` into a `Quota`.

    Raises:
        ValueError: the text is not a quota.
    """
    if isinstance(value, Quota):
        return value
    if not isinstance(value, str):
        raise ValueError("a quota is a string such as '200 MiB/day'")
    size_text, slash, period_text = value.partition("/")
    if not slash:
        raise ValueError(
            f"{value!r} is not a quota (try '200 MiB/day' or '5 GiB/month')"
        )
    period = _ALIASES.get(period_text.strip().lower())
    if period is None:
        raise ValueError(
            f"unknown quota period {period_text.strip()!r} in {value!r} "
            "(use hour, day, week or month)"
        )
    return Quota(parse_size(size_text.strip()), period)


QuotaSpec = Annotated[Quota, BeforeValidator(parse_quota), PlainSerializer(str)]
"""A config field holding a `Quota`, written as ``"200 MiB/day"``."""


def _moment(now: float) -> datetime:
    # Periods start on whole seconds, so flooring is exact; fromtimestamp alone
    # rounds to microseconds and would put 23:59:59.9999996 in the next day.
    return datetime.fromtimestamp(math.floor(now), UTC)


def _start(period: PeriodName, moment: datetime) -> datetime:
    if period == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())  # ISO weeks start on Monday
    return day.replace(day=1)


def _end(period: PeriodName, start: datetime) -> datetime:
    if period == "hour":
        return start + timedelta(hours=1)
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(weeks=1)
    days = calendar.monthrange(start.year, start.month)[1]
    return start + timedelta(days=days)


def period_bounds(period: PeriodName, now: float) -> tuple[float, float]:
    """
    Start and end (Unix seconds) of the ``period`` that contains ``now``.

    The start belongs to the period, the end to the next one.
    """
    start = _start(period, _moment(now))
    return start.timestamp(), _end(period, start).timestamp()


def period_key(period: PeriodName, now: float) -> str:
    """
    A stable name for the period containing ``now``: ``"day:2024-05-01"``,
    ``"week:2024-W18"``, ``"month:2024-05"``, ``"hour:2024-05-01T13"``.

    Every broker derives the same key for the same instant, which is what lets
    them share a counter.
    """
    start = _start(period, _moment(now))
    if period == "hour":
        return f"hour:{start:%Y-%m-%dT%H}"
    if period == "day":
        return f"day:{start:%Y-%m-%d}"
    if period == "week":
        year, week, _ = start.isocalendar()
        return f"week:{year:04d}-W{week:02d}"
    return f"month:{start:%Y-%m}"
