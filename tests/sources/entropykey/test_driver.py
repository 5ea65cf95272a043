"""
The Entropy Key source end to end against the simulator: every transport,
several keys on one bus, unplug and replug, and each failure state.
"""

import asyncio
import os
import pty
import select
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.errors import SourceError, SourceQuarantined
from broker.pool import EntropyPool
from broker.status import SourceState
from broker.supervisor import Supervisor
from sources.entropykey.driver import EntropyKeySource
from sources.entropykey.keyring import KeyringPermissionError
from sources.entropykey.sim.key import SimulatedKey
from sources.entropykey.sim.keypairs import KeyPair, new_key_pair, write_keyring
from sources.entropykey.sim.unix_server import UnixKeyServer
from sources.entropykey.sim.usb_bus import SimulatedBus
from sources.entropykey.transport import (
    KeyTransport,
    SimulatedTransport,
    TtyTransport,
    UnixTransport,
    UsbTransport,
)
from sources.entropykey.wire import FailureMode
from tests.helpers import eventually

FAST = 40_000.0  # simulated bytes per second: fast keys keep tests short


@pytest.fixture
def pair() -> KeyPair:
    return new_key_pair()


@pytest.fixture
def keyring(tmp_path: Path, pair: KeyPair) -> Path:
    path = tmp_path / "keyring"
    write_keyring(path, [pair])
    return path


def make_source(
    pair: KeyPair, keyring: Path, transport: KeyTransport, name: str = "ekey"
) -> EntropyKeySource:
    return EntropyKeySource(
        name=name,
        serial=pair.serial_text,
        keyring=keyring,
        transport=transport,
        response_timeout=1.0,
    )


async def read_entropy(source: EntropyKeySource, wanted: int) -> bytes:
    data = bytearray()
    async with asyncio.timeout(20):
        while len(data) < wanted:
            data += await source.read()
    return bytes(data)


@pytest.fixture
def tty_key(pair: KeyPair) -> Iterator[tuple[SimulatedKey, Path]]:
    """
    A simulated key behind a pseudo-terminal, as cdc_acm would present it.
    """
    key = SimulatedKey(pair.serial, pair.long_term_key, rate=FAST)
    master, slave = pty.openpty()
    path = Path(os.ttyname(slave))
    stop = threading.Event()

    def device_to_host() -> None:
        while not stop.is_set():
            data = key.read(4096, 0.05)
            if data and not stop.is_set():
                os.write(master, data)

    def host_to_device() -> None:
        while not stop.is_set():
            readable, _, _ = select.select([master], [], [], 0.05)
            if readable and not stop.is_set():
                key.write(os.read(master, 4096))

    threads = [
        threading.Thread(target=f, daemon=True)
        for f in (device_to_host, host_to_device)
    ]
    for thread in threads:
        thread.start()
    try:
        yield key, path
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        os.close(slave)
        os.close(master)


@pytest.fixture
async def unix_key(
    pair: KeyPair, tmp_path: Path
) -> AsyncIterator[tuple[SimulatedKey, Path]]:
    """
    A simulated key behind a Unix socket, as ekey-ulusbd presents one.
    """
    key = SimulatedKey(pair.serial, pair.long_term_key, rate=FAST)
    path = tmp_path / "key.sock"
    async with UnixKeyServer(key, path):
        yield key, path


async def test_session_over_usb(pair: KeyPair, keyring: Path) -> None:
    """
    Over pyusb: the key is found by serial, cdc_acm is detached, the session is
    keyed and decrypted entropy flows.
    """
    bus = SimulatedBus([SimulatedKey(pair.serial, pair.long_term_key, rate=FAST)])
    source = make_source(pair, keyring, UsbTransport(pair.serial_text, backend=bus))
    async with source:
        data = await read_entropy(source, 4096)
    assert 4096 <= len(data)
    assert (pair.serial_text, 1) in bus.detached
    details = source.details()
    assert details["attachment"].startswith("usb 1-")
    assert 0 == details["mac_failures"]


async def test_session_over_unix_socket(
    pair: KeyPair, keyring: Path, unix_key: tuple[SimulatedKey, Path]
) -> None:
    """
    Over a Unix stream socket (ekey-ulusbd style).
    """
    _key, path = unix_key
    source = make_source(pair, keyring, UnixTransport(path))
    async with source:
        assert 1024 <= len(await read_entropy(source, 1024))


async def test_session_over_tty(
    pair: KeyPair, keyring: Path, tty_key: tuple[SimulatedKey, Path]
) -> None:
    """
    Over a tty in raw mode (/dev/ttyACM* style).
    """
    _key, path = tty_key
    source = make_source(pair, keyring, TtyTransport(path))
    async with source:
        assert 1024 <= len(await read_entropy(source, 1024))


async def test_session_over_simulated_transport(pair: KeyPair, keyring: Path) -> None:
    """
    The in-process simulated transport used by `transport = "simulated"`,
    with status records (temperature, voltage) reported.
    """
    key = SimulatedKey(pair.serial, pair.long_term_key, rate=FAST, info_interval=0.1)
    source = make_source(pair, keyring, SimulatedTransport(pair.serial_text, key))
    async with source:
        await read_entropy(source, 2048)
        await eventually(lambda: source.details()["temperature_c"] is not None)
        details = source.details()
    assert 30 < details["temperature_c"] < 50
    assert 3.0 < details["voltage_v"] < 3.6


async def test_key_left_unread_is_not_reset(pair: KeyPair, keyring: Path) -> None:
    """
    A key the supervisor leaves unread for longer than the response timeout
    (a full pool) is not taken for silent: reading resumes under the same
    session key, without a reset or a MAC failure.
    """
    key = SimulatedKey(pair.serial, pair.long_term_key, rate=FAST)
    source = EntropyKeySource(
        name="ekey",
        serial=pair.serial_text,
        keyring=keyring,
        transport=SimulatedTransport(pair.serial_text, key),
        response_timeout=0.5,
    )
    async with source:
        await read_entropy(source, 1024)
        before = source.details()
        # The pause is the behaviour under test, not a wait for something:
        # the supervisor does not call read() while the pool is full.
        await asyncio.sleep(1.5)
        await read_entropy(source, 16384)
        after = source.details()
    assert (before["resets"], before["rekeys"]) == (after["resets"], after["rekeys"])
    assert 0 == after["mac_failures"]


async def test_output_queued_before_opening_is_dropped(
    pair: KeyPair, keyring: Path
) -> None:
    """
    A key nobody read for a while (replugged, its driver waiting to restart)
    has queued a key request per block; the simulated transport drops them on
    open, as a tty and ekey-ulusbd do, so the new session is keyed after its
    one opening reset, with no crossed replies and no MAC failure.
    """
    unread = 0.0
    key = SimulatedKey(
        pair.serial,
        pair.long_term_key,
        rate=FAST,
        clock=lambda: time.monotonic() + unread,
    )
    unread = 5.0
    source = EntropyKeySource(
        name="ekey",
        serial=pair.serial_text,
        keyring=keyring,
        transport=SimulatedTransport(pair.serial_text, key),
    )
    async with source:
        await read_entropy(source, 1024)
        details = source.details()
    assert (1, 0) == (details["resets"], details["mac_failures"])


async def test_unknown_serial_is_refused(tmp_path: Path, pair: KeyPair) -> None:
    """
    A key the keyring does not know is refused with the way to fix it.
    """
    other = tmp_path / "other-keyring"
    write_keyring(other, [new_key_pair()])
    key = SimulatedKey(pair.serial, pair.long_term_key, rate=FAST)
    source = make_source(pair, other, SimulatedTransport(pair.serial_text, key))
    with pytest.raises(SourceError, match=r"no long-term key.*ebroker rekey"):
        async with source:
            pass


async def test_wrong_long_term_key_fails(tmp_path: Path, pair: KeyPair) -> None:
    """
    A keyring holding the wrong key for this serial: frames after keying fail
    their MAC and the key is reported failed, nothing credited.
    """
    wrong = tmp_path / "wrong-keyring"
    write_keyring(wrong, [KeyPair(pair.serial, os.urandom(32))])
    key = SimulatedKey(pair.serial, pair.long_term_key, rate=FAST)
    source = EntropyKeySource(
        name="ekey",
        serial=pair.serial_text,
        keyring=wrong,
        transport=SimulatedTransport(pair.serial_text, key),
        response_timeout=0.5,
    )
    async with source:
        with pytest.raises(SourceError) as caught:
            await read_entropy(source, 32)
    assert not isinstance(caught.value, SourceQuarantined)
    assert "key" in str(caught.value).lower()


async def test_generator_failure_quarantines(pair: KeyPair, keyring: Path) -> None:
    """
    A key that reports a latched generator failure is quarantined and its data
    never returned.
    """
    key = SimulatedKey(pair.serial, pair.long_term_key, rate=FAST, info_interval=0.1)
    source = make_source(pair, keyring, SimulatedTransport(pair.serial_text, key))
    async with source:
        await read_entropy(source, 256)
        key.fail(FailureMode.RAW_XOR_BAD)
        with pytest.raises(SourceQuarantined, match="generator"):
            await read_entropy(source, 1 << 20)


async def test_vanished_key_is_reported(pair: KeyPair, keyring: Path) -> None:
    """
    Unplugging the key ends the read with a clear reason.
    """
    bus = SimulatedBus([SimulatedKey(pair.serial, pair.long_term_key, rate=FAST)])
    source = make_source(pair, keyring, UsbTransport(pair.serial_text, backend=bus))
    async with source:
        await read_entropy(source, 256)
        bus.unplug(pair.serial_text)
        with pytest.raises(SourceError, match=r"vanished|unplugged"):
            await read_entropy(source, 1 << 20)


def test_world_readable_keyring_is_refused(pair: KeyPair, keyring: Path) -> None:
    """
    A keyring others can read is refused with the fix in the message.
    """
    keyring.chmod(0o644)
    key = SimulatedKey(pair.serial, pair.long_term_key, rate=FAST)
    source = make_source(pair, keyring, SimulatedTransport(pair.serial_text, key))

    async def open_source() -> None:
        async with source:
            pass

    with pytest.raises(SourceError, match="chmod 600"):
        asyncio.run(open_source())
    with pytest.raises(KeyringPermissionError):
        SimulatedKey.from_keyring(keyring, pair.serial_text)


async def test_three_keys_one_unplugged_and_replugged(tmp_path: Path) -> None:
    """
    Three keys on one bus feed the pool; one unplugged mid-stream is reported
    failed while the others keep delivering, and comes back by itself when
    replugged.
    """
    pairs = [new_key_pair() for _ in range(3)]
    keyring = tmp_path / "keyring"
    write_keyring(keyring, pairs)
    bus = SimulatedBus(
        [SimulatedKey(p.serial, p.long_term_key, rate=FAST) for p in pairs]
    )
    pool = EntropyPool(1 << 22)
    supervisor = Supervisor(pool, backoff_initial=0.05, backoff_max=0.2)
    runners = [
        supervisor.add(
            make_source(
                p, keyring, UsbTransport(p.serial_text, backend=bus), name=f"k{index}"
            )
        )
        for index, p in enumerate(pairs)
    ]
    supervisor.start()
    try:
        await eventually(lambda: all(r.healthy for r in runners), timeout=30)
        bus.unplug(pairs[1].serial_text)
        await eventually(lambda: runners[1].state == SourceState.FAILED, timeout=30)
        assert "unplugged" in runners[1].reason or "vanished" in runners[1].reason
        before = [r.credited_bits for r in runners]
        await eventually(
            lambda: (
                runners[0].credited_bits > before[0]
                and runners[2].credited_bits > before[2]
            ),
            timeout=30,
        )
        bus.replug(pairs[1].serial_text)
        await eventually(lambda: runners[1].healthy, timeout=30)
        assert runners[1].restarts >= 1
    finally:
        await supervisor.stop()
