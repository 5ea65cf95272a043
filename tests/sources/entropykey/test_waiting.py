"""
A ``serial = "*"`` entry with no key attached is a source that says why, and
takes the first key the rescan finds; keys after it get sources of their own.
"""

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.errors import SourceError
from broker.pool import EntropyPool
from broker.status import SourceState
from broker.supervisor import Supervisor
from sources.base import Source
from sources.entropykey.config import EntropyKeySourceConfig
from sources.entropykey.factory import (
    ClaimedSerials,
    SimulatedFleet,
    stand_in,
    waiting_reason,
    watch_for_keys,
)
from sources.entropykey.sim.keypairs import new_key_pair, write_keyring
from sources.entropykey.waiting import WAITING
from tests.helpers import eventually


def wildcard(keyring: Path) -> EntropyKeySourceConfig:
    return EntropyKeySourceConfig(
        name="ekeys",
        kind="entropykey",
        serial="*",
        transport="simulated",
        keyring=keyring,
        simulated_rate=20000,
        rescan_interval=0.05,
    )


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(EntropyPool(1 << 20))
    try:
        yield supervisor
    finally:
        await supervisor.stop()


def test_reason_says_what_is_wrong_with_the_keyring(tmp_path: Path) -> None:
    """
    The reason names the keyring when it is missing, too widely readable or
    empty, and is the bare waiting message when the keyring is fine.
    """
    keyring = tmp_path / "keyring"
    config = wildcard(keyring)
    missing = waiting_reason(config)
    assert missing.startswith(WAITING)
    assert f"keyring {keyring}: No such file or directory" in missing
    write_keyring(keyring, [])
    assert f"{WAITING} (keyring {keyring} lists no keys)" == waiting_reason(config)
    write_keyring(keyring, [new_key_pair()])
    os.chmod(keyring, 0o644)
    assert "chmod 600" in waiting_reason(config)
    os.chmod(keyring, 0o600)
    assert WAITING == waiting_reason(config)


async def test_first_open_fails_with_the_reason_then_waits(tmp_path: Path) -> None:
    """
    The first open fails with the reason (so status shows it); the next one
    waits for a key instead of failing again.
    """
    waiting = stand_in(wildcard(tmp_path / "keyring"))
    assert waiting.unavailable is not None
    with pytest.raises(SourceError, match=WAITING):
        await waiting.__aenter__()
    second = asyncio.create_task(waiting.__aenter__())
    await asyncio.sleep(0)
    assert not second.done()
    second.cancel()
    await asyncio.wait([second])
    assert second.cancelled()


async def test_stand_in_takes_the_first_key_and_the_rest_get_sources(
    tmp_path: Path, supervisor: Supervisor
) -> None:
    """
    Supervised, the stand-in is ``failed`` with the reason while no keyring
    exists; once one appears the rescan hands its first key to the stand-in,
    which turns healthy under the entry's name, and the second key gets a
    source of its own.
    """
    keyring = tmp_path / "keyring"
    config = wildcard(keyring)
    waiting = stand_in(config)
    runner = supervisor.add(waiting)
    supervisor.start()
    await eventually(lambda: SourceState.FAILED == runner.state)
    assert runner.reason.startswith(WAITING)

    added: list[Source] = []
    known = ClaimedSerials(stand_in=waiting)
    watcher = asyncio.create_task(
        watch_for_keys(
            config,
            usb_backend=None,
            fleet=SimulatedFleet(),
            known=known,
            add=added.append,
        )
    )
    try:
        pairs = [new_key_pair(), new_key_pair()]
        write_keyring(keyring, pairs)
        await eventually(lambda: SourceState.HEALTHY == runner.state)
        await eventually(lambda: 1 == len(added))
    finally:
        watcher.cancel()
        await asyncio.wait([watcher])
    assert waiting.unavailable is None
    assert "ekeys" == runner.name
    serials = {pair.serial_text for pair in pairs}
    assert serials == set(known)
    assert waiting.details()["serial"] in serials
    assert added[0].name.startswith("ekeys-")
