"""
Routine events are logged at info, problems at warning: a passed start-up
test and an absent optional device are routine; a quarantine and a device
that is there but unusable are not.
"""

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from broker.pool import EntropyPool
from broker.supervisor import Supervisor
from sources.device import DeviceSource, DeviceSourceConfig
from sources.entropykey.driver import EntropyKeySource
from sources.entropykey.sim.key import SimulatedKey
from sources.entropykey.sim.keypairs import new_key_pair, write_keyring
from sources.entropykey.transport import SimulatedTransport
from tests.broker.test_supervisor import FakeSource, deliver, pass_startup
from tests.fakeclock import FakeClock
from tests.helpers import eventually


def levels(logs: list[MutableMapping[str, Any]], event: str) -> list[tuple[str, str]]:
    return [
        (str(entry.get("state", "")), entry["log_level"])
        for entry in logs
        if entry["event"] == event
    ]


async def test_passed_startup_test_is_info_and_quarantine_a_warning() -> None:
    """
    startup -> healthy is logged at info; healthy -> quarantined at warning.
    """
    supervisor = Supervisor(EntropyPool(1 << 20), clock=FakeClock())
    source = FakeSource()
    supervisor.add(source)
    with capture_logs() as logs:
        supervisor.start()
        try:
            await pass_startup(source)
            await deliver(source, bytes(4096))
        finally:
            await supervisor.stop()
    assert [("healthy", "info"), ("quarantined", "warning")] == levels(
        logs, "health_transition"
    )


async def test_absent_optional_device_is_info(tmp_path: Path) -> None:
    """
    An optional device that is not there is skipped at info: that is what
    optional means.
    """
    supervisor = Supervisor(EntropyPool(1 << 20), clock=FakeClock())
    config = DeviceSourceConfig(
        name="hwrng", kind="hwrng", path=tmp_path / "hwrng", optional=True
    )
    runner = supervisor.add(DeviceSource(config), optional=True)
    fallback = FakeSource("fallback", 1)
    supervisor.add(fallback)
    with capture_logs() as logs:
        supervisor.start()
        try:
            await pass_startup(fallback)
            await eventually(lambda: runner.skipped)
        finally:
            await supervisor.stop()
    assert [("", "info")] == levels(logs, "source_skipped")


async def test_unusable_optional_device_is_a_warning(tmp_path: Path) -> None:
    """
    An optional device path that exists but cannot be read as a device (a
    directory here) is skipped with a warning: something is misconfigured.
    """
    supervisor = Supervisor(EntropyPool(1 << 20), clock=FakeClock())
    config = DeviceSourceConfig(
        name="hwrng", kind="hwrng", path=tmp_path, optional=True
    )
    runner = supervisor.add(DeviceSource(config), optional=True)
    fallback = FakeSource("fallback", 1)
    supervisor.add(fallback)
    with capture_logs() as logs:
        supervisor.start()
        try:
            await pass_startup(fallback)
            # The directory opens; its first read, in a thread, fails.
            await eventually(lambda: runner.skipped)
        finally:
            await supervisor.stop()
    assert [("", "warning")] == levels(logs, "source_skipped")


async def test_entropy_key_opening_reset_is_info(tmp_path: Path) -> None:
    """
    Every Entropy Key session begins with a reset: logged at info as the
    session opening, never as an anomaly warning.
    """
    pair = new_key_pair()
    keyring = tmp_path / "keyring"
    write_keyring(keyring, [pair])
    key = SimulatedKey(pair.serial, pair.long_term_key, rate=40_000.0)
    source = EntropyKeySource(
        name="ekey",
        serial=pair.serial_text,
        keyring=keyring,
        transport=SimulatedTransport(pair.serial_text, key),
        response_timeout=1.0,
    )
    with capture_logs() as logs:
        async with source:
            await source.read()
    opening = [e for e in logs if e["event"] == "entropykey_session_opening"]
    assert [("connection opened", "info")] == [
        (e["reset"], e["log_level"]) for e in opening
    ]
    assert [] == [e for e in logs if e["event"] == "entropykey_anomaly"]
    assert str(keyring) == source.details()["keyring"]
