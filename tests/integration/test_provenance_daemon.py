"""
Provenance of served bytes through the real daemon.

A ``device`` source reads a FIFO at tier 0 that the test leaves silent at first,
so the source sits in its start-up test; ``getrandom`` at tier 1 is healthy at
once. The fallback may keep only the low watermark (1 KiB here, plus one read)
buffered until the FIFO is fed and passes its start-up test; from then on the
bytes served are the FIFO's, after at most what the fallback left buffered.
``/v1/status`` counts every byte served and buffered by the tier that backed it.

The FIFO's watchdog is long: the test decides when the source stops starting,
by feeding it, and a loaded machine must not stall it first.
"""

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DEADLINE
from tests.integration.clients import (
    BrokerHttp,
    FifoFeeder,
    metric_value,
    poll_until,
    running_daemon,
)
from tests.integration.daemon import Daemon, default_config

FIFO = "fifo"
LOW_WATERMARK = 1024
"""What `default_config` sets."""
READ = 4096
"""Slack past the watermark for one read: getrandom asks only for what the room
backs (plus the start-up test's headroom), so its output stays well within."""
FALLBACK_BOUND = LOW_WATERMARK + READ
DRAW = 4096


@pytest.fixture
def feeder(tmp_path: Path) -> Iterator[FifoFeeder]:
    """
    The FIFO the broker reads, silent until the test feeds it.
    """
    fifo = FifoFeeder(tmp_path / "device")
    try:
        yield fifo
    finally:
        fifo.close()


@pytest.fixture
def daemon(tmp_path: Path, feeder: FifoFeeder) -> Iterator[Daemon]:
    """
    A broker with the FIFO at tier 0 and getrandom at tier 1, a 64 KiB pool.
    """
    sources = f"""
        [[sources]]
        name = "{FIFO}"
        kind = "device"
        path = "{feeder.path}"
        priority = 0
        credit = 8
        watchdog = "600 s"

        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        priority = 1
        """
    config = default_config(
        tmp_path / "state", textwrap.dedent(sources), pool_size="64 KiB"
    )
    with running_daemon(tmp_path, config) as running:
        yield running


def states(document: dict[str, Any]) -> dict[str, str]:
    return {source["name"]: source["state"] for source in document["sources"]}


def fallback_gated(document: dict[str, Any]) -> bool:
    """
    The FIFO is starting, getrandom healthy, and it has filled the pool to
    the low watermark.
    """
    return bool(
        {FIFO: "starting", "getrandom": "healthy"} == states(document)
        and document["tiers"]["buffered_by_tier"].get("1", 0) >= LOW_WATERMARK
    )


def fifo_took_over(document: dict[str, Any]) -> bool:
    """
    The FIFO is healthy, its tier active, and some of its output is buffered.
    """
    tiers = document["tiers"]
    return bool(
        "healthy" == states(document)[FIFO]
        and 0 == tiers["active_tier"]
        and tiers["buffered_by_tier"].get("0", 0) > 0
    )


async def draw(http: BrokerHttp, daemon: Daemon, count: int) -> None:
    """
    Draw ``count`` bytes over HTTP, waiting for them as a guest would.
    """
    async with http.session.get(
        daemon.http_url + "/v1/entropy",
        params={"bytes": str(count), "wait": str(int(DEADLINE))},
    ) as resp:
        assert 200 == resp.status, await resp.text()
        assert count == len(await resp.read())


async def test_fallback_is_held_at_the_low_watermark_until_hardware_is_healthy(
    daemon: Daemon, feeder: FifoFeeder
) -> None:
    """
    While the FIFO is in its start-up test the fallback keeps at most the low
    watermark plus one read buffered, refilling it as clients draw; once the
    FIFO is healthy, exactly what the fallback left buffered is served before
    the FIFO's output, and the bytes served per tier add up to the sinks'
    bytes out.
    """
    async with BrokerHttp(daemon) as http:
        gated = await poll_until(http.status, fallback_gated)
        assert gated["tiers"]["buffered_by_tier"]["1"] <= FALLBACK_BOUND
        assert gated["pool"]["level"] <= FALLBACK_BOUND

        # Clients are served from the fallback meanwhile: each draw is more
        # than the gate holds, so the fallback has to refill.
        for _ in range(3):
            await draw(http, daemon, DRAW)
        refilled = await poll_until(http.status, fallback_gated)
        assert {"1": 3 * DRAW} == refilled["tiers"]["served_by_tier"]
        assert refilled["tiers"]["buffered_by_tier"]["1"] <= FALLBACK_BOUND

        # Nobody draws from here on, so what the fallback has buffered when
        # the FIFO takes over is what it had buffered while gated.
        feeder.feed("random")
        switched = await poll_until(http.status, fifo_took_over)
        left = switched["tiers"]["buffered_by_tier"]["1"]
        assert left <= FALLBACK_BOUND
        assert 3 * DRAW == switched["tiers"]["served_by_tier"]["1"]

        await draw(http, daemon, left + DRAW)
        served = await http.status()
        assert {"0": DRAW, "1": 3 * DRAW + left} == served["tiers"]["served_by_tier"]
        sinks_out = sum(sink["bytes_out"] for sink in served["sinks"])
        assert served["pool"]["bytes_out"] == sinks_out
        assert sinks_out == sum(served["tiers"]["served_by_tier"].values())

        metrics = await http.metrics()
        assert DRAW == metric_value(
            metrics, "ebroker_tier_output_bytes_total", tier="0"
        )
        assert 3 * DRAW + left == metric_value(
            metrics, "ebroker_tier_output_bytes_total", tier="1"
        )
        buffered = metric_value(metrics, "ebroker_tier_buffered_bytes", tier="0")
        assert buffered is not None
        assert 0 < buffered
