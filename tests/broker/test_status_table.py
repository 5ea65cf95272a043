"""
``ebroker status``'s verdict (Nagios/Icinga exit codes) and its table, from
status documents shaped as ``/v1/status`` answers them.
"""

import copy
from typing import Any

import pytest

from broker.status_table import (
    Verdict,
    duration,
    perfdata,
    render,
    size,
    table,
    verdict,
)


def source(name: str, priority: int, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": fields.pop("kind", name),
        "priority": priority,
        "state": "healthy",
        "reason": "delivering",
        "rate": 4096.0,
        "feeding": priority == 0,
        "details": {},
        **fields,
    }


def document(**changes: Any) -> dict[str, Any]:
    """
    A healthy broker: hwrng at tier 0 feeding, getrandom at tier 1 standing by.
    """
    base: dict[str, Any] = {
        "instance": "vm",
        "version": "0.1.0",
        "time": 1_800_000_000.0,
        "uptime": 3725.0,
        "phase": "serving",
        "health": {"status": "ok", "serving": True, "reasons": []},
        "config": {"path": "/etc/ebroker/ebroker.toml"},
        "pool": {"capacity": 1048576, "level": 524288, "waiters": 0, "bytes_out": 10},
        "tiers": {"active_tier": 0, "best_tier": 0, "failovers": 1},
        "accounts": {
            "backend": {"kind": "memory", "healthy": True},
            "customers": {
                "default": {
                    "bytes_served": 2048,
                    "throttled_seconds": 1.5,
                    "throttled_requests": 3,
                    "denied": 0,
                    "quota": None,
                    "client_count": 1,
                }
            },
        },
        "sources": [source("hwrng", 0), source("getrandom", 1)],
        "sinks": [
            {
                "name": "egd",
                "kind": "egd",
                "addresses": ["tcp://127.0.0.1:8888"],
                "connections": 2,
                "connections_total": 7,
                "requests": 40,
                "bytes_out": 4096,
            }
        ],
    }
    base.update(changes)
    return base


def test_healthy_serving_broker_is_ok() -> None:
    """
    Health ok, serving, every source healthy: OK (exit 0), counted in the line.
    """
    assessment = verdict(document())
    assert Verdict.OK == assessment.verdict
    assert 0 == int(assessment.verdict)
    assert (
        "EBROKER OK - serving, health ok, 2 of 2 sources healthy"
        == assessment.plugin_line()
    )


def test_degraded_is_warning_with_its_reasons() -> None:
    """
    Only a fallback tier feeding, the better source failed: WARNING (exit 1),
    naming the broker's reasons and the failed source.
    """
    doc = document(
        health={
            "status": "degraded",
            "serving": True,
            "reasons": ["only fallback tier 1 feeds the pool"],
        },
        sources=[
            source("hwrng", 0, state="failed", reason="read failed", feeding=False),
            source("getrandom", 1, feeding=True),
        ],
    )
    assessment = verdict(doc)
    assert Verdict.WARNING == assessment.verdict
    assert (
        "only fallback tier 1 feeds the pool",
        "source hwrng failed: read failed",
    ) == assessment.problems


def test_unhealthy_is_critical() -> None:
    """
    Health unhealthy: CRITICAL (exit 2).
    """
    doc = document(
        health={"status": "unhealthy", "serving": False, "reasons": ["no source"]}
    )
    assert Verdict.CRITICAL == verdict(doc).verdict


@pytest.mark.parametrize("phase", ["starting", "draining", "closing"])
def test_not_serving_phases_are_warning(phase: str) -> None:
    """
    A broker starting or on its way down is not an outage, but is no OK either.
    """
    assert Verdict.WARNING == verdict(document(phase=phase)).verdict


def test_a_quarantined_standby_is_warning_though_health_is_ok() -> None:
    """
    A source in trouble while a better tier serves leaves health ok; the
    operator still hears of it.
    """
    doc = document(
        sources=[
            source("hwrng", 0),
            source("getrandom", 1, state="quarantined", reason="RCT failed"),
        ]
    )
    assessment = verdict(doc)
    assert Verdict.WARNING == assessment.verdict
    assert ("source getrandom quarantined: RCT failed",) == assessment.problems


def test_a_skipped_optional_source_is_ok() -> None:
    """
    An optional device that is absent (stopped, skipped) is what optional means.
    """
    doc = document(
        sources=[
            source("hwrng", 0, state="stopped", reason="skipped: no such device"),
            source("getrandom", 1, feeding=True),
        ]
    )
    assert Verdict.OK == verdict(doc).verdict


def test_customer_near_quota_is_warning() -> None:
    """
    A customer at 90 % of its quota or more makes the verdict WARNING.
    """
    doc = document()
    customers = doc["accounts"]["customers"]
    customers["acme"] = {
        **customers["default"],
        "quota": {"limit": 1000, "period": "day", "used": 950, "remaining": 50},
    }
    assessment = verdict(doc)
    assert Verdict.WARNING == assessment.verdict
    assert ("customer acme used 95% of its quota",) == assessment.problems


def test_document_without_health_is_refused() -> None:
    """
    Something that is not a broker's status cannot be judged (UNKNOWN upstream).
    """
    with pytest.raises(ValueError, match="no health"):
        verdict({"sources": []})


def test_perfdata_carries_pool_and_rates() -> None:
    """
    Performance data after the pipe: pool level with its bounds, bytes served,
    each source's rate.
    """
    assert (
        "pool_bytes=524288B;;;0;1048576 served_bytes=10c "
        "'rate_hwrng'=4096 'rate_getrandom'=4096"
    ) == perfdata(document())
    line = verdict(document()).plugin_line(perfdata(document()))
    assert line.startswith("EBROKER OK - ")
    assert " | pool_bytes=" in line


def test_render_shows_every_part() -> None:
    """
    The table names health and phase, the pool, each source with tier and
    state, sinks with connections and requests, the backend and customers.
    """
    doc = document()
    text = render(doc, verdict(doc), out_rate=2048.0)
    lines = text.splitlines()
    assert lines[0].startswith("EBROKER OK - ")
    assert "up 1h2m" in lines[1]
    assert "512.0 KiB of 1.0 MiB (50%)  in 4.0 KiB/s  out 2.0 KiB/s" in text
    assert any(
        line.split()[:6] == ["*", "hwrng", "hwrng", "0", "healthy", "4.0"]
        for line in lines
    )
    assert any(line.split()[:5] == ["egd", "egd", "2", "7", "40"] for line in lines)
    assert "backend memory healthy" in text
    assert any(line.split()[:3] == ["default", "2.0", "KiB"] for line in lines)
    assert "3 req, 1.5 s" in text
    assert "\x1b[" not in text


def test_render_shows_key_temperature_and_voltage() -> None:
    """
    With an Entropy Key among the sources, TEMP and VOLTS columns appear.
    """
    key = source(
        "ekey-a",
        0,
        kind="entropykey",
        details={"temperature_c": 34.5, "voltage_v": 5.012},
    )
    doc = document(sources=[key, source("getrandom", 1)])
    text = render(doc, verdict(doc))
    assert "TEMP" in text
    assert "34.5 C" in text
    assert "5.012 V" in text


def test_render_quota_use() -> None:
    """
    A customer with a quota shows use against it, per period.
    """
    doc = copy.deepcopy(document())
    doc["accounts"]["customers"]["default"]["quota"] = {
        "limit": 1048576,
        "period": "day",
        "used": 262144,
    }
    assert "256.0 KiB of 1.0 MiB/day (25%)" in render(doc, verdict(doc))


def test_colour_only_when_asked() -> None:
    """
    Colour codes appear with colour=True, and the columns still line up.
    """
    doc = document()
    plain = render(doc, verdict(doc))
    coloured = render(doc, verdict(doc), colour=True)
    assert "\x1b[32mhealthy\x1b[0m" in coloured
    stripped = coloured
    for code in ("\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[1m", "\x1b[2m", "\x1b[0m"):
        stripped = stripped.replace(code, "")
    assert plain == stripped


def test_table_aligns_columns() -> None:
    """
    Every column starts at the same offset on every line.
    """
    assert ["  A    BB", "  ccc  d"] == table(["A", "BB"], [["ccc", "d"]])


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 2**30, "3.0 GiB")],
)
def test_size(count: int, text: str) -> None:
    """
    Byte counts in binary units.
    """
    assert text == size(count)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5, "5s"), (125, "2m5s"), (7500, "2h5m"), (90000, "1d1h")],
)
def test_duration(seconds: float, text: str) -> None:
    """
    Uptime in its two largest units.
    """
    assert text == duration(seconds)
