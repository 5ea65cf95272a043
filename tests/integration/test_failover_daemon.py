"""
Health tests, supervision and failover through the real daemon.

A ``device`` source reads a FIFO the test writes into (the README's alarm
drill): healthy random bytes, a stuck stream of zeros, biased bytes, or
nothing at all. A ``getrandom`` source at tier 1 is the fallback, except in
the last test, where the FIFO is all there is.

Only the silent-source test gives the FIFO a short watchdog: elsewhere a
feeder thread starved for a second on a loaded machine would be a stall, and
the extra restart and start-up test would change what the test counts.
"""

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.clients import (
    BrokerHttp,
    EgdReader,
    FifoFeeder,
    metric_value,
    poll_until,
    running_daemon,
)
from tests.integration.daemon import Daemon, default_config

FIFO = "fifo"


def fifo_sources(path: Path, *, fallback: bool, watchdog: str | None = None) -> str:
    """
    The FIFO at tier 0, with ``watchdog`` if given (else the default, 30 s),
    and optionally getrandom at tier 1.
    """
    sources = f"""
        [[sources]]
        name = "{FIFO}"
        kind = "device"
        path = "{path}"
        priority = 0
        credit = 8
        """
    if watchdog is not None:
        sources += f"""watchdog = "{watchdog}"
        """
    if fallback:
        sources += """
        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        priority = 1
        """
    return textwrap.dedent(sources)


@pytest.fixture
def feeder(tmp_path: Path) -> Iterator[FifoFeeder]:
    """
    The FIFO the broker reads, fed with random bytes from the start.
    """
    fifo = FifoFeeder(tmp_path / "drill")
    fifo.feed("random")
    try:
        yield fifo
    finally:
        fifo.close()


@pytest.fixture
def watchdog() -> str | None:
    """
    The FIFO's watchdog; a test parametrizes it to override the default.
    """
    return None


@pytest.fixture
def daemon(
    tmp_path: Path, feeder: FifoFeeder, watchdog: str | None
) -> Iterator[Daemon]:
    """
    A broker reading the FIFO at tier 0 with getrandom as tier 1.
    """
    config = default_config(
        tmp_path / "state",
        fifo_sources(feeder.path, fallback=True, watchdog=watchdog),
        pool_size="16 KiB",
    )
    with running_daemon(tmp_path, config) as running:
        yield running


def is_state(state: str) -> Any:
    return lambda source: source["state"] == state


def health_is(value: str) -> Any:
    """
    A predicate on a source entry: the broker's health is ``value``.

    Health is polled, not read once: a reader draining faster than the
    sources deliver empties the pool for an instant now and then, and the
    broker reports an empty pool as unhealthy even with a healthy source.
    """
    return lambda source: value == source["_health"]["status"]


def healthy_and_feeding(source: dict[str, Any]) -> bool:
    return bool(
        "healthy" == source["state"]
        and source["feeding"]
        and 0 == source["_tiers"]["active_tier"]
    )


async def test_healthy_fifo_feeds_tier_zero(daemon: Daemon) -> None:
    """
    A FIFO fed random bytes passes its start-up test, becomes healthy and
    feeds the pool: tier 0 is active and the broker reports "ok".
    """
    async with BrokerHttp(daemon) as http:
        source = await poll_until(lambda: http.source(FIFO), healthy_and_feeding)
        assert "ok" == source["_health"]["status"]
        assert 1 == source["health"]["startups_passed"]
        assert 0 < source["credited_bits"]
        status = await http.status()
        assert {"active_tier": 0, "best_tier": 0, "degraded": False} == {
            key: status["tiers"][key]
            for key in ("active_tier", "best_tier", "degraded")
        }
        code, body = await http.healthz()
        assert (200, "ok") == (code, body.strip())


async def test_stuck_source_is_quarantined_and_fails_back(
    daemon: Daemon, feeder: FifoFeeder
) -> None:
    """
    A source that turns stuck mid-stream is quarantined by the RCT: nothing
    more is credited from it, tier 1 takes over (the broker is degraded but
    serving), the state shows in metrics and logs, and an EGD client reading
    throughout is answered in full. Fed random bytes again it passes a fresh
    start-up test and tier 0 takes over again.
    """
    async with BrokerHttp(daemon) as http, EgdReader(daemon) as reader:
        await poll_until(lambda: http.source(FIFO), healthy_and_feeding)
        await reader.answered(100)

        feeder.feed("zeros")
        stuck = await poll_until(lambda: http.source(FIFO), is_state("quarantined"))
        assert "RCT" in stuck["reason"]
        assert not stuck["feeding"]
        credited = stuck["credited_bits"]
        # The source keeps being read (zeros, mixed in without credit) ...
        later = await poll_until(
            lambda: http.source(FIFO),
            lambda source: source["bytes_in"] >= stuck["bytes_in"] + 16384,
        )
        # ... but nothing it delivers is credited any more.
        assert "quarantined" == later["state"]
        assert credited == later["credited_bits"]
        assert 1 == later["_tiers"]["active_tier"]
        assert later["_tiers"]["degraded"]

        # Polled for the reason `health_is` gives.
        _, body = await poll_until(http.healthz, lambda answer: 200 == answer[0])
        assert body.startswith("degraded")

        metrics = await http.metrics()
        labels = {"source": FIFO, "kind": "device"}
        assert 1.0 == metric_value(
            metrics, "ebroker_source_state", **labels, state="quarantined"
        )
        assert 0.0 == metric_value(
            metrics, "ebroker_source_state", **labels, state="healthy"
        )
        rct_failures = metric_value(
            metrics, "ebroker_source_test_failures_total", **labels, test="rct"
        )
        assert rct_failures is not None
        assert rct_failures > 0
        assert 1.0 == metric_value(metrics, "ebroker_degraded")

        transitions = [
            entry
            for entry in daemon.logs()
            if entry.get("event") == "health_transition"
            and entry.get("source") == FIFO
            and entry.get("state") == "quarantined"
        ]
        # One transition, logged once: failing again in every APT window
        # while quarantined is not logged as a transition.
        assert 1 == len(transitions)
        assert "RCT" in str(transitions[0]["reason"])

        await reader.answered(100)
        feeder.feed("random")
        back = await poll_until(lambda: http.source(FIFO), healthy_and_feeding)
        assert 2 == back["health"]["startups_passed"]
        assert not back["_tiers"]["degraded"]
        await poll_until(lambda: http.source(FIFO), health_is("ok"))
        assert back["_tiers"]["failovers"] >= 2

        # Tier 1 may have filled the pool while the key was out; what clients
        # draw from now on is credited to the recovered source again.
        await reader.answered(100)
        assert 64 * reader.requests == reader.received
        await poll_until(
            lambda: http.source(FIFO),
            lambda source: source["credited_bits"] > credited,
        )


async def test_biased_source_trips_the_apt(daemon: Daemon, feeder: FifoFeeder) -> None:
    """
    Bytes carrying only four random bits each (16 values) are quarantined by
    the Adaptive Proportion Test, and tier 1 takes over.
    """
    async with BrokerHttp(daemon) as http, EgdReader(daemon) as reader:
        await poll_until(lambda: http.source(FIFO), healthy_and_feeding)
        feeder.feed("biased")
        biased = await poll_until(lambda: http.source(FIFO), is_state("quarantined"))
        assert "APT" in biased["reason"]
        assert 0 == biased["health"]["rct_failures"]
        assert 0 < biased["health"]["apt_failures"]
        assert 1 == biased["_tiers"]["active_tier"]
        metrics = await http.metrics()
        apt_failures = metric_value(
            metrics,
            "ebroker_source_test_failures_total",
            source=FIFO,
            kind="device",
            test="apt",
        )
        assert apt_failures is not None
        assert apt_failures > 0
        await reader.answered(10)


@pytest.mark.parametrize("watchdog", ["1 s"])
async def test_silent_source_is_stalled_restarted_and_recovers(
    daemon: Daemon, feeder: FifoFeeder
) -> None:
    """
    A feeder that stops writing leaves the source silent: after its one-second
    watchdog it is reported stalled and reopened, tier 1 covers, and an EGD
    client reading throughout is answered in full; a stalled source reports
    a rate of 0. When writing resumes the source passes its start-up test and
    tier 0 feeds again.
    """
    async with BrokerHttp(daemon) as http, EgdReader(daemon) as reader:
        await poll_until(lambda: http.source(FIFO), healthy_and_feeding)
        await reader.answered(100)

        feeder.pause()
        stalled = await poll_until(lambda: http.source(FIFO), is_state("stalled"))
        assert "watchdog" in stalled["reason"]
        # Closed by its watchdog, it delivers nothing: whatever it read in the
        # last rate window does not count.
        assert 0 == stalled["rate"]
        assert 1 == stalled["_tiers"]["active_tier"]
        await poll_until(lambda: http.source(FIFO), health_is("degraded"))
        restarted = await poll_until(
            lambda: http.source(FIFO), lambda source: source["restarts"] > 0
        )
        assert restarted["health"]["stalls"] >= 1
        metrics = await http.metrics()
        restarts = metric_value(
            metrics, "ebroker_source_restarts_total", source=FIFO, kind="device"
        )
        assert restarts is not None
        assert restarts > 0
        await reader.answered(100)

        feeder.feed("random")
        back = await poll_until(lambda: http.source(FIFO), healthy_and_feeding)
        assert not back["_tiers"]["degraded"]
        await poll_until(lambda: http.source(FIFO), health_is("ok"))
        stalls = [
            entry
            for entry in daemon.logs()
            if entry.get("event") == "source_state_changed"
            and entry.get("source") == FIFO
            and entry.get("state") == "stalled"
        ]
        assert stalls, "no source_state_changed to stalled in the log"

        await reader.answered(100)
        assert 64 * reader.requests == reader.received


async def test_healthz_fails_only_when_nothing_trustworthy_is_left(
    tmp_path: Path, feeder: FifoFeeder
) -> None:
    """
    With the FIFO as the only source and a tiny pool, /healthz is 200 while
    the source is healthy; once it is quarantined and a reader has drained
    the pool below the low watermark it is 503 and says why; when the source
    is healthy again it is 200 again.
    """
    config = default_config(
        tmp_path / "state",
        fifo_sources(feeder.path, fallback=False),
        pool_size="4 KiB",
    )
    with running_daemon(tmp_path, config) as daemon:
        async with BrokerHttp(daemon) as http:
            await poll_until(lambda: http.source(FIFO), healthy_and_feeding)
            code, body = await poll_until(http.healthz, lambda answer: 200 == answer[0])
            assert "ok" == body.strip()

            feeder.feed("zeros")

            async def draw_then_look() -> dict[str, Any]:
                # The source only reads while the pool has room: make some.
                await http.entropy(256)
                return await http.source(FIFO)

            quarantined = await poll_until(draw_then_look, is_state("quarantined"))
            assert "RCT" in quarantined["reason"] or "APT" in quarantined["reason"]
            assert quarantined["_tiers"]["active_tier"] is None

            async def drain_then_probe() -> tuple[int, str]:
                await http.entropy(256)
                return await http.healthz()

            code, body = await poll_until(
                drain_then_probe, lambda answer: 503 == answer[0]
            )
            assert 503 == code
            assert body.startswith("unhealthy")
            assert "no healthy source" in body
            assert "below low watermark 1024" in body
            status = await http.status()
            assert status["pool"]["level"] < 1024
            assert not status["health"]["serving"]

            feeder.feed("random")
            await poll_until(lambda: http.source(FIFO), healthy_and_feeding)
            answer = await poll_until(http.healthz, lambda answer: 200 == answer[0])
            assert (200, "ok") == (answer[0], answer[1].strip())
