"""
Parsing of human-readable sizes, rates and durations used in the config file.
"""

import re
from dataclasses import dataclass

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_PERIODS: dict[str, float] = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "day": 86400.0,
    "d": 86400.0,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def parse_size(value: int | str) -> int:
    """
    Turn ``4096``, ``"4096"``, ``"4 KiB"`` or ``"1.5 MB"`` into a byte count.

    Raises:
        ValueError: the text is not a size.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 4096 or '4 KiB', not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size (try '4096', '4 KiB' or '1 MiB')")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        known = "B, KB, MB, GB, KiB, MiB, GiB"
        raise ValueError(f"unknown size unit {unit!r} in {value!r} (use {known})")
    return int(float(number) * factor)


@dataclass(frozen=True, slots=True)
class Rate:
    """
    A byte rate: ``bytes_per_period`` bytes every ``period`` seconds.
    """

    bytes_per_period: int
    period: float

    @property
    def per_second(self) -> float:
        return self.bytes_per_period / self.period


def parse_rate(value: int | float | str) -> Rate:
    """
    Turn ``"4 KiB/s"``, ``"100 MiB/day"`` or a plain number of bytes per second
    into a `Rate`.

    Raises:
        ValueError: the text is not a rate.
    """
    if isinstance(value, bool):
        raise ValueError("expected a rate such as '4 KiB/s', not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a rate cannot be negative")
        return Rate(int(value), 1.0)
    size_text, slash, period_text = value.partition("/")
    if not slash:
        raise ValueError(f"{value!r} is not a rate (try '4 KiB/s' or '100 MiB/day')")
    period = _PERIODS.get(period_text.strip().lower())
    if period is None:
        raise ValueError(
            f"unknown period {period_text.strip()!r} in {value!r} "
            "(use s, min, h or day)"
        )
    return Rate(parse_size(size_text), period)


def parse_duration(value: int | float | str) -> float:
    """
    Turn ``5``, ``2.5``, ``"500ms"`` or ``"10 s"`` into seconds.

    Raises:
        ValueError: the text is not a duration.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5 or '500ms', not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration (try 5, '500ms' or '2 min')")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[unit or "s"]
