"""
``GET /v1/history`` from the real daemon: points appear, an unplugged Entropy
Key shows as a ``source_state`` event, and a restart on the same state
directory shows the time the broker was down as nulls and a ``gap`` event.

The daemon samples every 0.2 s (``EBROKER_HISTORY_STEP``) so that points come
within a test's patience; everything else is as in production.
"""

import signal
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.history_recorder import STEP_ENV
from broker.history_store import FILE_NAME
from tests.integration.clients import BrokerHttp, EgdReader, poll_until
from tests.integration.daemon import Daemon, start_daemon

STEP = 0.2
KEY_DEADLINE = 60.0
"""Seconds to wait for a simulated key to come up or to fail."""
SERIAL = "KO2SYaMsVZBC9AXq"

pytestmark = pytest.mark.timeout(300)


def config(tmp_path: Path) -> str:
    """
    One simulated Entropy Key at tier 0, getrandom at tier 1, a tenant and an
    operator HTTP sink (simulator control on the operator one).
    """
    return textwrap.dedent(
        f"""
        [broker]
        state_dir = "{tmp_path / "state"}"
        pool_size = "16 KiB"
        low_watermark = "1 KiB"
        drain = "0 s"
        shutdown_grace = "2 s"

        [logging]
        level = "info"
        format = "json"

        [[sources]]
        name = "ekey"
        kind = "entropykey"
        serial = "{SERIAL}"
        transport = "simulated"
        keyring = "{tmp_path / "keys" / "keyring"}"
        simulated_rate = 20000
        response_timeout = "1 s"
        priority = 0

        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        priority = 1

        [[sinks]]
        name = "egd"
        kind = "egd"
        listen = ["tcp://127.0.0.1:0"]

        [[sinks]]
        name = "http"
        kind = "http"
        plane = "tenant"
        listen = ["tcp://127.0.0.1:0"]

        [[sinks]]
        name = "operator"
        kind = "http"
        plane = "operator"
        listen = ["tcp://127.0.0.1:0"]
        simulator_control = true
        """
    )


def started(tmp_path: Path) -> Daemon:
    return start_daemon(tmp_path, config(tmp_path), env={STEP_ENV: str(STEP)})


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = started(tmp_path)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest.fixture
async def http(daemon: Daemon) -> AsyncIterator[BrokerHttp]:
    async with BrokerHttp(daemon) as client:
        yield client


async def history(daemon: Daemon, **query: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.operator_url + "/v1/history", params=query) as response,
    ):
        assert 200 == response.status, await response.text()
        document: dict[str, Any] = await response.json()
        return document


def key_is(state: str) -> Any:
    def check(document: dict[str, Any]) -> bool:
        states = document["sources"].get("ekey", {}).get("state", [])
        return bool(states) and states[-1] == state

    return check


async def test_points_and_an_unplugged_key(daemon: Daemon, http: BrokerHttp) -> None:
    """
    Points come every step with the pool, both sources and their kinds; the
    key's temperature and voltage are recorded, getrandom's are null; the
    broker's start is a phase event; unplugging the key is a source_state
    event to failed, with the reason the broker gives.
    """
    async with EgdReader(daemon):
        await unplugged_key_is_recorded(daemon, http)


async def unplugged_key_is_recorded(daemon: Daemon, http: BrokerHttp) -> None:
    # A client draws all along, as VMs do: a key whose output nobody takes is
    # paused, and sends no status records (temperature, voltage) either.
    document = await poll_until(
        lambda: history(daemon), key_is("healthy"), timeout=KEY_DEADLINE
    )
    assert "10s" == document["resolution"]
    assert STEP == document["step"]
    count = document["points"]
    assert all(len(values) == count for values in document["pool"].values())
    assert {"ekey", "getrandom"} <= set(document["sources"])
    ekey = document["sources"]["ekey"]
    assert (0, "entropykey") == (ekey["tier"], ekey["kind"])
    assert 1 == document["sources"]["getrandom"]["tier"]
    assert all(value is None for value in document["sources"]["getrandom"]["voltage_v"])
    assert {"kind": "phase", "from": "starting", "to": "serving"}.items() <= (
        document["events"][0].items()
    )
    document = await poll_until(
        lambda: history(daemon),
        lambda document: any(
            value is not None for value in document["sources"]["ekey"]["voltage_v"]
        ),
        timeout=KEY_DEADLINE,
    )

    await http.simulator(SERIAL, "unplug")
    document = await poll_until(
        lambda: history(daemon), key_is("failed"), timeout=KEY_DEADLINE
    )
    [failed] = [
        event
        for event in document["events"]
        if event["kind"] == "source_state" and event["to"] == "failed"
    ]
    assert "ekey" == failed["subject"]
    assert "unplugged" in failed["reason"]
    since = await history(daemon, since=str(failed["time"] - 0.001))
    assert failed in since["events"]
    assert since["points"] < document["points"]


async def test_restart_shows_the_gap(tmp_path: Path, daemon: Daemon) -> None:
    """
    A broker stopped and started again on the same state directory keeps the
    points from before, answers null for the time it was down, and says so
    with a gap event.
    """
    before = await poll_until(
        lambda: history(daemon), lambda document: document["points"] >= 3
    )
    assert 0 == daemon.stop(signal.SIGTERM)
    assert (daemon.state_dir / FILE_NAME).exists()

    again = started(tmp_path)
    try:
        after = await poll_until(
            lambda: history(again),
            lambda document: (
                document["points"] > before["points"] + 5
                and document["pool"]["level_bytes"][-1] is not None
            ),
        )
        assert 0 == again.stop(signal.SIGTERM)
    finally:
        if again.process.poll() is None:
            again.process.kill()
            again.process.wait()
    assert before["start"] == after["start"]
    levels = after["pool"]["level_bytes"]
    assert before["pool"]["level_bytes"] == levels[: before["points"]]
    # The longest run of nulls after the points seen before the stop: the
    # time the broker was down.
    runs: list[tuple[int, int]] = []
    for index in range(before["points"], len(levels)):
        if levels[index] is not None:
            continue
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    first, last = max(runs, key=lambda run: run[1] - run[0])
    assert last >= first
    [gap] = [event for event in after["events"] if event["kind"] == "gap"]
    assert "broker" == gap["subject"]
    assert "broker not running" in gap["reason"]
    assert after["start"] + last * STEP < gap["time"]
    assert gap["time"] < after["start"] + (last + 1 + 2 / STEP) * STEP
    assert ["closing"] == [
        event["to"]
        for event in after["events"]
        if event["kind"] == "phase" and event["time"] < gap["time"]
    ][-1:]
