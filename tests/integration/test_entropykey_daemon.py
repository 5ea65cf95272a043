"""
Entropy Keys through the real daemon: three simulated keys at tier 0 with
getrandom as the fallback, as in ``config/multi-key-ha.toml``, driven through
the HTTP simulator controls (unplug, replug, fail, heal) and ``ebroker keys``.
"""

import asyncio
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sources.entropykey.sim.keypairs import new_key_pair, write_keyring
from tests.integration.clients import (
    BrokerHttp,
    EgdReader,
    metric_value,
    poll_until,
    running_daemon,
)
from tests.integration.daemon import REPO, Daemon

KEY_DEADLINE = 90.0
"""
Seconds to wait for what the keys report. Status records come every 10 s, and
on a loaded machine the broker decrypts more slowly than the keys send; a
condition that holds ends the wait at once.
"""

# Every wait below may take up to KEY_DEADLINE, several in a row.
pytestmark = pytest.mark.timeout(600)

T = TypeVar("T")


async def until(fetch: Callable[[], Awaitable[T]], predicate: Callable[[T], bool]) -> T:
    """
    `poll_until` with the deadline of this module.
    """
    return await poll_until(fetch, predicate, timeout=KEY_DEADLINE)


# The serials of config/multi-key-ha.toml: '+' and '/' are legal in serials
# and must survive the simulator-control URL.
KEYS = {
    "ekey-a": "KO2SYaMsVZBC9AXq",
    "ekey-b": "VPCJJ9dURANo+GFX",
    "ekey-c": "HxDEByAM+Mo8L/5b",
}


def key_config(tmp_path: Path, keyring: Path, keys: dict[str, str]) -> str:
    """
    Simulated keys at 20,000 bytes/s at tier 0, getrandom at tier 1, EGD and
    tenant- and operator-plane HTTP (simulator control on the operator one) on
    ephemeral loopback ports.
    """
    text = f"""
        [broker]
        state_dir = "{tmp_path / "state"}"
        pool_size = "16 KiB"
        low_watermark = "1 KiB"
        drain = "0 s"
        shutdown_grace = "2 s"

        [logging]
        level = "info"
        format = "json"
        """
    for name, serial in keys.items():
        # A one-second response timeout makes a key that stops talking (a
        # latched failure) get reset, and so report the failure, quickly.
        text += f"""
        [[sources]]
        name = "{name}"
        kind = "entropykey"
        serial = "{serial}"
        transport = "simulated"
        keyring = "{keyring}"
        simulated_rate = 20000
        response_timeout = "1 s"
        priority = 0
        """
    text += """
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
    return textwrap.dedent(text)


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    """
    Where the broker keeps its keyring; absent, so the broker provisions the
    simulated keys itself.
    """
    return tmp_path / "keys" / "keyring"


@pytest.fixture
def daemon(tmp_path: Path, keyring: Path) -> Iterator[Daemon]:
    """
    A broker with three simulated Entropy Keys and a getrandom fallback.
    """
    with running_daemon(tmp_path, key_config(tmp_path, keyring, KEYS)) as running:
        yield running


@pytest.fixture
async def http(daemon: Daemon) -> AsyncIterator[BrokerHttp]:
    async with BrokerHttp(daemon) as client:
        yield client


@pytest.fixture
async def reader(daemon: Daemon) -> AsyncIterator[EgdReader]:
    """
    A client drawing continuously, as VMs do, so that the keys are read at
    their full rate and their credit keeps growing.
    """
    async with EgdReader(daemon) as client:
        yield client


def by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {source["name"]: source for source in status["sources"]}


def keys_state(*states: str) -> Any:
    """
    A predicate on /v1/status: every key in one of ``states``.
    """

    def check(status: dict[str, Any]) -> bool:
        sources = by_name(status)
        return all(sources[name]["state"] in states for name in KEYS)

    return check


def all_keys_feeding(status: dict[str, Any]) -> bool:
    sources = by_name(status)
    return 0 == status["tiers"]["active_tier"] and all(
        "healthy" == sources[name]["state"] and sources[name]["feeding"]
        for name in KEYS
    )


def health_is(value: str) -> Any:
    """
    A predicate on /v1/status: the broker's health is ``value``.

    Health is polled, not read once: a client draining faster than the keys
    deliver empties the pool for an instant now and then, and the broker
    reports an empty pool as unhealthy even with healthy sources.
    """
    return lambda status: value == status["health"]["status"]


def source_state(name: str, *states: str) -> Any:
    return lambda status: by_name(status)[name]["state"] in states


async def ebroker_keys(keyring: Path, url: str) -> str:
    """
    Run ``ebroker keys`` and return what it printed.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.cli",
        "keys",
        "--keyring",
        str(keyring),
        "--url",
        url,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    assert 0 == process.returncode, stderr.decode()
    return stdout.decode()


def row_of(table: str, serial: str) -> str:
    [row] = [line for line in table.splitlines() if line.startswith(serial)]
    return row


async def test_keys_feed_the_pool_and_report_details(
    daemon: Daemon, http: BrokerHttp, reader: EgdReader
) -> None:
    """
    Three simulated keys become healthy and feed tier 0; EGD and HTTP serve
    entropy; each key's status details carry its serial, attachment and frame
    counters, and the frame counters are exported as metrics.
    """
    await until(
        http.status,
        lambda status: (
            all_keys_feeding(status)
            and all(by_name(status)[name]["credited_bits"] > 0 for name in KEYS)
        ),
    )
    await until(http.status, health_is("ok"))
    await reader.answered(100, timeout=KEY_DEADLINE)
    assert 64 * reader.requests == reader.received
    async with http.session.get(
        daemon.http_url + "/v1/entropy", params={"bytes": "64", "wait": "5"}
    ) as resp:
        assert 200 == resp.status
        assert 64 == len(await resp.read())

    sources = by_name(await http.status())
    metrics = await http.metrics()
    for name, serial in KEYS.items():
        details = sources[name]["details"]
        assert serial == details["serial"]
        assert f"simulated {serial}" == details["attachment"]
        assert 0 < details["frames_ok"]
        assert 0 == details["mac_failures"]
        assert 0 < details["bytes_delivered"]
        # Filled from the key's I> status records, sent every 10 s.
        assert {"temperature_c", "voltage_v"} <= details.keys()
        assert 0 < sources[name]["credited_bits"]
        frames = metric_value(
            metrics, "ebroker_device_frames_ok_total", source=name, kind="entropykey"
        )
        assert frames is not None
        assert frames > 0


async def test_keys_report_temperature_and_voltage(
    http: BrokerHttp, reader: EgdReader
) -> None:
    """
    The keys' periodic status records (every 10 s) bring temperature and
    supply voltage into /v1/status and the metrics.
    """
    status = await until(
        http.status,
        lambda status: all(
            by_name(status)[name]["details"]["temperature_c"] is not None
            and by_name(status)[name]["details"]["voltage_v"] is not None
            for name in KEYS
        ),
    )
    # The simulator reports 315.0 K (41.85 C) and 3,254 mV.
    details = by_name(status)["ekey-a"]["details"]
    assert 41.9 == details["temperature_c"]
    assert 3.254 == details["voltage_v"]
    metrics = await http.metrics()
    assert 41.9 == metric_value(
        metrics, "ebroker_device_temperature_celsius", source="ekey-b"
    )
    assert 3.254 == metric_value(
        metrics, "ebroker_device_supply_voltage_volts", source="ekey-c"
    )


async def test_keys_command_lists_the_keys(
    daemon: Daemon, http: BrokerHttp, keyring: Path
) -> None:
    """
    ``ebroker keys`` lists each key with its simulated attachment, whether the
    keyring knows it, its source and its state.
    """
    await until(http.status, all_keys_feeding)
    table = await ebroker_keys(keyring, daemon.operator_url)
    for name, serial in KEYS.items():
        row = row_of(table, serial).split()
        assert ["simulated", serial, "yes", name] == row[1:5]
        assert "healthy" == row[-1]


async def test_unplugged_key_fails_and_comes_back(
    daemon: Daemon, http: BrokerHttp, reader: EgdReader, keyring: Path
) -> None:
    """
    Unplugging one key fails its source with the reason, while the other two
    keep feeding tier 0 (no failover, not degraded); replugged, it comes back
    by itself.
    """
    feeding = await until(http.status, all_keys_feeding)
    failovers = feeding["tiers"]["failovers"]
    serial = KEYS["ekey-b"]
    await http.simulator(serial, "unplug")
    status = await until(http.status, source_state("ekey-b", "failed"))
    unplugged = by_name(status)["ekey-b"]
    assert "vanished" in unplugged["reason"]
    assert "unplugged" in unplugged["reason"]
    assert not unplugged["feeding"]

    before = {name: by_name(status)[name]["credited_bits"] for name in KEYS}
    later = await until(
        http.status,
        lambda status: all(
            by_name(status)[name]["credited_bits"] > before[name] + 8 * 4096
            for name in ("ekey-a", "ekey-c")
        ),
    )
    assert 0 == later["tiers"]["active_tier"]
    assert not later["tiers"]["degraded"]
    assert failovers == later["tiers"]["failovers"]
    await until(http.status, health_is("ok"))

    table = await ebroker_keys(keyring, daemon.operator_url)
    assert "failed (key vanished from the USB bus (unplugged?))" in row_of(
        table, serial
    )

    await http.simulator(serial, "replug")
    back = await until(http.status, all_keys_feeding)
    assert by_name(back)["ekey-b"]["restarts"] > 0
    assert 0 == by_name(back)["ekey-b"]["details"]["mac_failures"]
    await reader.answered(100, timeout=KEY_DEADLINE)
    assert 64 * reader.requests == reader.received


async def test_failed_generator_is_quarantined_until_healed(
    http: BrokerHttp, reader: EgdReader
) -> None:
    """
    A key that latches a generator failure is quarantined (none of its data
    is credited) and the others carry on; healed, it is readmitted.
    """
    feeding = await until(http.status, all_keys_feeding)
    failovers = feeding["tiers"]["failovers"]
    await http.simulator(KEYS["ekey-c"], "fail")
    # The key stops sending entropy at once but reports the failure only in
    # its next status record, sent every 10 s.
    status = await until(http.status, source_state("ekey-c", "quarantined"))
    failed = by_name(status)["ekey-c"]
    assert "generator" in failed["reason"]
    assert not failed["feeding"]
    assert 0 == status["tiers"]["active_tier"]
    credited = failed["credited_bits"]
    other = by_name(status)["ekey-a"]["credited_bits"]
    # The other keys keep feeding; the failed one is credited nothing more.
    later = await until(
        http.status,
        lambda status: by_name(status)["ekey-a"]["credited_bits"] > other + 8 * 4096,
    )
    quarantined = by_name(later)["ekey-c"]
    assert "healthy" != quarantined["state"]
    assert credited == quarantined["credited_bits"]

    await http.simulator(KEYS["ekey-c"], "heal")
    healed = await until(
        http.status,
        lambda status: (
            all_keys_feeding(status)
            and by_name(status)["ekey-c"]["credited_bits"] > credited
        ),
    )
    assert failovers == healed["tiers"]["failovers"]
    await reader.answered(100, timeout=KEY_DEADLINE)


async def test_all_keys_unplugged_falls_back_to_tier_one(
    http: BrokerHttp, reader: EgdReader
) -> None:
    """
    With every key unplugged getrandom (tier 1) feeds the pool and the broker
    reports degraded, still serving a client that reads throughout;
    replugged, the keys take over again.
    """
    await until(http.status, all_keys_feeding)
    await reader.answered(100, timeout=KEY_DEADLINE)
    for serial in KEYS.values():
        await http.simulator(serial, "unplug")
    status = await until(http.status, keys_state("failed"))
    assert 1 == status["tiers"]["active_tier"]
    assert status["tiers"]["degraded"]
    assert by_name(status)["getrandom"]["feeding"]
    await until(http.status, health_is("degraded"))
    _, body = await until(http.healthz, lambda answer: 200 == answer[0])
    assert body.startswith("degraded")
    await reader.answered(100, timeout=KEY_DEADLINE)

    for serial in KEYS.values():
        await http.simulator(serial, "replug")
    back = await until(http.status, all_keys_feeding)
    assert not by_name(back)["getrandom"]["feeding"]
    await until(http.status, health_is("ok"))
    await reader.answered(100, timeout=KEY_DEADLINE)
    assert 64 * reader.requests == reader.received


async def test_world_readable_keyring_is_refused(tmp_path: Path) -> None:
    """
    A keyring that others may read is refused: every key source fails with a
    reason telling the operator to chmod 600 it, and getrandom keeps the
    broker serving.
    """
    keyring = tmp_path / "keyring"
    pairs = [new_key_pair() for _ in range(3)]
    write_keyring(keyring, pairs)
    os.chmod(keyring, 0o644)
    keys = {f"ekey-{n}": pair.serial_text for n, pair in enumerate(pairs)}
    with running_daemon(tmp_path, key_config(tmp_path, keyring, keys)) as daemon:
        async with BrokerHttp(daemon) as http:
            status = await until(
                http.status,
                lambda status: (
                    all(by_name(status)[name]["state"] == "failed" for name in keys)
                    and status["tiers"]["active_tier"] == 1
                ),
            )
            for name in keys:
                assert "chmod 600" in by_name(status)[name]["reason"]
            assert status["health"]["serving"]
            async with EgdReader(daemon) as reader:
                await reader.answered(10, timeout=KEY_DEADLINE)
    assert 0o644 == os.stat(keyring).st_mode & 0o777


IDLE_WINDOW = 75.0
"""
Seconds an idle broker is watched: several standby probes (every 10 s) and
status records (every 10 s), and well past the ~13 s period at which an idle
multi-key broker once flapped.
"""


def key_counters(status: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """
    Each key's resets and MAC failures.
    """
    sources = by_name(status)
    return {
        name: (
            sources[name]["details"]["resets"],
            sources[name]["details"]["mac_failures"],
        )
        for name in KEYS
    }


async def test_idle_keys_stay_healthy_for_minutes(http: BrokerHttp) -> None:
    """
    With no client drawing, the pool fills and the keys sit paused, read only
    by the standby probe; watched over more than a minute, health stays ok,
    no key leaves healthy, and no key is reset or sees a MAC failure.
    """
    await until(
        http.status,
        lambda status: (
            all_keys_feeding(status)
            and "ok" == status["health"]["status"]
            and status["pool"]["level"] >= status["pool"]["capacity"]
        ),
    )
    baseline = key_counters(await http.status())
    loop = asyncio.get_running_loop()
    end = loop.time() + IDLE_WINDOW
    samples = 0
    while loop.time() < end:
        status = await http.status()
        samples += 1
        states = {name: by_name(status)[name]["state"] for name in KEYS}
        assert ("ok", dict.fromkeys(KEYS, "healthy")) == (
            status["health"]["status"],
            states,
        ), status["health"]
        assert baseline == key_counters(status)
        # The sampling interval of the watch, not a wait for a condition.
        await asyncio.sleep(0.5)
    assert samples > 10
    assert 0 == (await http.status())["tiers"]["active_tier"]
