"""
Human-readable sizes, rates and durations.
"""

import pytest

from broker.units import Rate, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("4 KiB", 4096),
        ("4KiB", 4096),
        ("1 MiB", 1 << 20),
        ("1.5 kB", 1500),
        ("2 GiB", 2 << 30),
        ("10 B", 10),
    ],
)
def test_sizes_accept_units(text: int | str, expected: int) -> None:
    """
    Operators write sizes with or without units, binary or decimal.
    """
    assert expected == parse_size(text)


@pytest.mark.parametrize("text", ["", "KiB", "4 XB", "-1", "four", True, -5])
def test_bad_sizes_are_refused_with_a_reason(text: object) -> None:
    """
    A size that is not one is refused, never guessed.
    """
    with pytest.raises(ValueError, match=r"size|unit|negative|boolean"):
        parse_size(text)  # type: ignore[arg-type]


def test_rates_carry_their_period() -> None:
    """
    Rates keep the period they were written with (quotas need it).
    """
    assert Rate(4096, 1.0) == parse_rate("4 KiB/s")
    assert Rate(200 << 20, 86400.0) == parse_rate("200 MiB/day")
    assert 4096.0 == parse_rate("4 KiB/s").per_second
    assert Rate(100, 1.0) == parse_rate(100)


@pytest.mark.parametrize("text", ["4 KiB", "4 KiB/fortnight", "x/s"])
def test_bad_rates_are_refused(text: str) -> None:
    """
    A rate needs a size and a known period.
    """
    with pytest.raises(ValueError, match=r"rate|period|size"):
        parse_rate(text)


def test_durations() -> None:
    """
    Durations accept seconds as numbers or with units.
    """
    assert 5.0 == parse_duration(5)
    assert 0.5 == parse_duration("500ms")
    assert 120.0 == parse_duration("2 min")
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")
