"""
The simulated Entropy Key: in real time, behind pyusb and behind a Unix socket.
"""

import array
import asyncio
import errno
import os
import random
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Unpack

import pytest
import usb.control
import usb.core
import usb.util

from sources.entropykey.keyring import KeyringError, KeyringPermissionError
from sources.entropykey.session import (
    Anomaly,
    EntropyBlock,
    Event,
    Health,
    Session,
    SessionState,
    StatusReport,
)
from sources.entropykey.sim_usb import EP_IN, EP_OUT, SimulatedBus
from sources.entropykey.simulator import (
    BLOCK_BYTES,
    MAX_BACKLOG,
    MAX_STATUS_BACKLOG,
    STATUS_BYTES,
    KeyOptions,
    SimulatedKey,
    SimulatedUnplugged,
    UnixKeyServer,
    aread,
    awrite,
    new_key_pair,
    serve_unix,
    write_keyring,
)
from sources.entropykey.skein import derive_long_term_key, lt_nonce_mac
from sources.entropykey.wire import (
    FailureMode,
    FrameType,
    encode_lt_mac,
    encode_lt_rekey,
    parse_packet,
)
from tests.helpers import eventually

SERIAL = bytes.fromhex("37006F065837393049391143")
SERIAL_TEXT = "NwBvBlg3OTBJORFD"
LTK = bytes(range(32))
TICK = 0.05
SLOW = KeyOptions(rate=1e-3, info_interval=1e9)
"""A key that, once reset, says nothing until spoken to."""


class FakeClock:
    """
    A clock that moves only when a test moves it.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Host:
    """
    A `Session` wired to a `SimulatedKey` on a fake clock, without threads.
    """

    def __init__(self, **key_kwargs: Unpack[KeyOptions]) -> None:
        self.clock = FakeClock()
        options = KeyOptions(clock=self.clock, random_bytes=random.Random(1).randbytes)
        options.update(key_kwargs)
        self.key = SimulatedKey(SERIAL, LTK, **options)
        self.session = Session({SERIAL: LTK}, random_bytes=random.Random(2).randbytes)
        self.session.start(self.clock.now)
        self.events: list[Event] = []

    def step(self) -> None:
        """
        Exchange everything pending in both directions, then advance the clock.
        """
        if out := self.session.data_to_send():
            self.key.write(out)
        if data := self.key.read(1 << 20, 0.0):
            self.session.receive_data(data, self.clock.now)
        timer = self.session.get_timer()
        if timer is not None and timer <= self.clock.now:
            self.session.handle_timer(self.clock.now)
        self.events.extend(self.session.events())
        self.clock.now += TICK

    def run(self, seconds: float) -> None:
        """
        Run for ``seconds`` of simulated time.
        """
        for _ in range(round(seconds / TICK)):
            self.step()

    def run_until(self, done: Callable[[], bool], limit: float = 30.0) -> None:
        """
        Run until ``done()``, failing after ``limit`` simulated seconds.
        """
        end = self.clock.now + limit
        while not done():
            assert self.clock.now < end, self.session.status
            self.step()

    def blocks(self, since: int = 0) -> list[EntropyBlock]:
        """
        Entropy blocks among the events from index ``since`` on.
        """
        return [e for e in self.events[since:] if isinstance(e, EntropyBlock)]


def slow_key(serial: bytes = SERIAL) -> SimulatedKey:
    """
    A real-time key that has been reset and has no output pending.
    """
    key = SimulatedKey(serial, LTK, **SLOW)
    key.discard_pending()
    return key


# ---- SimulatedKey with the host session ----


def test_session_keys_and_gets_entropy_at_the_configured_rate() -> None:
    """
    Paired with a Session on a fake clock, the key is keyed, re-keyed as
    sequence numbers run out, and delivers creditable entropy at ``rate``.
    """
    rate = 4000.0
    host = Host(rate=rate)
    host.run_until(lambda: bool(host.blocks()))
    start, since = host.clock.now, len(host.events)
    host.run(40.0)
    blocks = host.blocks(since)
    assert SessionState.KEYED == host.session.state
    assert all(b.creditable for b in blocks)
    assert host.session.counters.rekeys >= 2
    measured = 32 * len(blocks) / (host.clock.now - start)
    assert rate == pytest.approx(measured, rel=0.05)
    assert BLOCK_BYTES / rate == host.key.block_interval


def test_backlog_is_capped_when_nobody_reads() -> None:
    """
    A reader that returns after an hour gets at most about two blocks of
    output and a few status bursts, not an hour's worth.
    """
    host = Host()
    host.run_until(lambda: bool(host.blocks()))
    host.clock.now += 3600.0
    backlog = host.key.read(1 << 24, 0.0)
    assert MAX_BACKLOG <= len(backlog) < MAX_STATUS_BACKLOG + STATUS_BYTES


def test_status_gets_through_a_full_backlog() -> None:
    """
    A host that reads half as fast as the key produces keeps the key's buffer
    at its limit, so blocks are dropped; every status burst that falls due
    meanwhile is still delivered.
    """
    host = Host()
    host.run_until(lambda: bool(host.blocks()))
    half_block = BLOCK_BYTES
    chunks = []
    while host.clock.now < 35.0:
        host.clock.now += host.key.block_interval
        chunks.append(host.key.read(half_block, 0.0))
    chunks.append(host.key.read(1 << 24, 0.0))
    data = b"".join(chunks)
    types = [parse_packet(data[i : i + 64]).type for i in range(0, len(data), 64)]
    assert all(half_block == len(chunk) for chunk in chunks[20:-1])
    assert 3 * int(host.clock.now // 10.0) == types.count(FrameType.INFO)


def test_next_due_and_pending_follow_the_block_schedule() -> None:
    """
    ``next_due`` is the next block or status time; ``pending`` turns true
    when it passes.
    """
    clock = FakeClock()
    key = SimulatedKey(SERIAL, LTK, rate=2496.0, info_interval=10.0, clock=clock)
    assert key.pending()
    assert 64 == key.discard_pending()  # the power-on S! frame, once
    assert (1.0, False) == (key.next_due(), key.pending())
    clock.now = 1.0
    assert key.pending()
    assert 2.0 == key.next_due()


def test_write_wakes_a_blocked_reader() -> None:
    """
    A reader waiting in another thread gets the S! frame as soon as a reset
    is written, long before its timeout.
    """
    key = slow_key()
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(key.read(64, 30.0)))
    reader.start()
    key.write(b"\x03")
    reader.join(10.0)
    assert not reader.is_alive()
    assert [FrameType.SERIAL] == [parse_packet(r).type for r in result]


def test_read_times_out_empty() -> None:
    """
    With nothing to say, ``read`` returns ``b""`` once its timeout expires.
    """
    assert b"" == slow_key().read(64, 0.01)


def test_unplug_wakes_reader_and_replug_power_cycles() -> None:
    """
    Unplugging raises ENODEV in a blocked reader and in writers; replugging
    clears a latched failure and the key announces itself again.
    """
    key = slow_key()
    key.fail(FailureMode.RAW_LEFT_BAD)
    errors: list[OSError] = []

    def blocked_read() -> None:
        try:
            key.read(64, 30.0)
        except SimulatedUnplugged as exc:
            errors.append(exc)

    reader = threading.Thread(target=blocked_read)
    reader.start()
    key.unplug()
    reader.join(10.0)
    assert [errno.ENODEV] == [e.errno for e in errors]
    assert not key.plugged
    with pytest.raises(SimulatedUnplugged):
        key.write(b"\x03")
    key.replug()
    assert (True, 1, FailureMode.OK) == (key.plugged, key.generation, key.failure_mode)
    assert FrameType.SERIAL == parse_packet(key.read(64, 0.0)).type


async def test_async_adapter_reads_without_blocking_the_loop() -> None:
    """
    ``aread`` wakes on ``awrite``'s reply and on a block falling due.
    """
    key = slow_key()
    reply = asyncio.create_task(aread(key, 64))
    await asyncio.sleep(0)
    assert 1 == await awrite(key, b"\x03")
    async with asyncio.timeout(10):
        assert FrameType.SERIAL == parse_packet(await reply).type
    fast = SimulatedKey(SERIAL, LTK, rate=2496 / 0.02)
    fast.discard_pending()
    async with asyncio.timeout(10):
        frame = await aread(fast, 64)
    assert FrameType.KEY_REQUEST == parse_packet(frame).type


async def test_aread_raises_when_unplugged() -> None:
    """
    A pending ``aread`` fails with `SimulatedUnplugged` when the key is pulled.
    """
    key = slow_key()
    reply = asyncio.create_task(aread(key, 64))
    await asyncio.sleep(0)
    key.unplug()
    async with asyncio.timeout(10):
        with pytest.raises(SimulatedUnplugged):
            await reply


def test_long_term_rekey_replaces_the_ltk_and_survives_replug() -> None:
    """
    The ekey-setkey exchange (M, then L) gives the key a new LTK, which a
    power cycle keeps, as flash would.
    """
    master = bytes(range(100, 132))
    key = SimulatedKey(SERIAL, LTK, master_key=master, rate=1e-3, info_interval=1e9)
    key.discard_pending()
    nonce = bytes(12)
    key.write(encode_lt_mac(lt_nonce_mac(SERIAL, master, nonce)))
    assert FrameType.LT_UNLOCKED == parse_packet(key.read(64, 0.0)).type
    key.write(encode_lt_rekey(nonce))
    reply = parse_packet(key.read(64, 0.0))
    assert FrameType.LT_REKEY == reply.type
    expected = derive_long_term_key(SERIAL, master, reply.data, nonce)
    key.replug()
    assert expected == key.long_term_key != LTK


# ---- faults ----


def test_generator_failure_is_reported_and_stops_entropy() -> None:
    """
    After ``fail`` the key's I>S record carries the failure, the session is
    quarantined, and no E! frame arrives; a replug brings entropy back.
    """
    host = Host(info_interval=1.0)
    host.run_until(lambda: bool(host.blocks()))
    since = len(host.events)
    host.key.fail(FailureMode.RAW_XOR_BAD)
    host.run(3.0)
    reports = [
        e.info.generator.failure_mode
        for e in host.events[since:]
        if isinstance(e, StatusReport) and e.info.generator is not None
    ]
    assert FailureMode.RAW_XOR_BAD in reports
    assert [] == host.blocks(since)
    assert (FailureMode.RAW_XOR_BAD, Health.QUARANTINED) == (
        host.session.failure_mode,
        host.session.status.health,
    )
    host.key.replug()
    since = len(host.events)
    host.run(3.0)
    assert host.blocks(since)


def test_stuck_plaintext_decrypts_to_repeats_and_heal_cures_it() -> None:
    """
    A stuck generator still encrypts correctly, so the host decrypts the same
    32 bytes again and again; ``heal`` restores varied output.
    """
    host = Host()
    host.key.set_fault(stuck=True)
    host.run_until(lambda: len(host.blocks()) >= 100)
    assert 1 == len({b.data for b in host.blocks()})
    host.key.heal()
    since = len(host.events)
    host.run_until(lambda: len(host.blocks(since)) >= 100)
    assert 100 <= len({b.data for b in host.blocks(since)})


def test_corrupt_macs_fail_verification() -> None:
    """
    With every MAC corrupted the session reports MAC failures and never
    delivers entropy.
    """
    host = Host()
    host.key.set_fault(corrupt_macs=True)
    host.run(5.0)
    macs = [e for e in host.events if isinstance(e, Anomaly) and e.kind == "mac"]
    assert macs
    assert [] == host.blocks()
    assert host.session.counters.packet_errors >= len(macs)


def test_garbage_between_frames_is_resynchronised() -> None:
    """
    Line noise after every frame costs framing errors but no entropy.
    """
    host = Host()
    host.key.set_fault(garbage=b"\x00* x")
    host.run_until(lambda: len(host.blocks()) >= 100)
    assert host.session.counters.framing_errors > 0


def test_mute_key_is_silent_and_stuck_and_biased_conflict() -> None:
    """
    A mute key ignores resets; asking for stuck and biased at once is refused.
    """
    key = slow_key()
    key.set_fault(mute=True)
    key.write(b"\x03")
    assert not key.pending()
    with pytest.raises(ValueError, match="both"):
        key.set_fault(stuck=True, biased=True)


# ---- keyring helpers ----


def test_from_keyring_uses_the_key_file(tmp_path: Path) -> None:
    """
    ``from_keyring`` takes the LTK for the serial, with the keyring's own
    permission check, and refuses unknown or malformed serials.
    """
    pair, other = new_key_pair(), new_key_pair()
    path = tmp_path / "keyring"
    write_keyring(path, [pair, other])
    assert 0o600 == stat.S_IMODE(os.stat(path).st_mode)
    key = SimulatedKey.from_keyring(path, pair.serial_text, rate=1000.0)
    assert (pair.serial, pair.long_term_key) == (key.serial, key.long_term_key)
    assert pair.serial_text in pair.keyring_text()
    with pytest.raises(KeyringError, match="no long-term key"):
        SimulatedKey.from_keyring(path, SERIAL_TEXT)
    with pytest.raises(KeyringError, match="PEM"):
        SimulatedKey.from_keyring(path, "short")
    path.chmod(0o644)
    with pytest.raises(KeyringPermissionError):
        SimulatedKey.from_keyring(path, pair.serial_text)


# ---- pyusb backend ----


@pytest.fixture
def bus() -> SimulatedBus:
    """
    A bus with three quiet keys.
    """
    keys = [slow_key(bytes([n]) * 12) for n in (1, 2, 3)]
    return SimulatedBus(keys)


def find(bus: SimulatedBus) -> list[usb.core.Device]:
    """
    Every Entropy Key pyusb sees on ``bus``.
    """
    return list(
        usb.core.find(backend=bus, idVendor=0x20DF, idProduct=0x0001, find_all=True)
    )


def open_data(dev: usb.core.Device) -> None:
    """
    Take the key from cdc_acm and claim its data interface, as a driver would.
    """
    for interface in (0, 1):
        if dev.is_kernel_driver_active(interface):
            dev.detach_kernel_driver(interface)
    dev.set_configuration()
    usb.util.claim_interface(dev, 1)


def test_pyusb_enumerates_keys_with_their_identity(bus: SimulatedBus) -> None:
    """
    find() lists each key with its PEM serial, Simtec strings, bus position,
    and the CDC layout with bulk endpoints 0x81/0x03 on interface 1.
    """
    devices = find(bus)
    assert sorted(bus.keys) == sorted(d.serial_number for d in devices)
    dev = devices[0]
    assert dev.serial_number == usb.util.get_string(dev, dev.iSerialNumber)
    assert ("Simtec Electronics", "Entropy Key") == (dev.manufacturer, dev.product)
    assert (0x0200, 0x0200, 1) == (dev.bcdUSB, dev.bcdDevice, dev.bus)
    assert [(1,), (2,), (3,)] == sorted(d.port_numbers for d in devices)
    assert 3 == len({d.address for d in devices})
    cfg = dev[0]
    layout = [
        (i.bInterfaceNumber, i.bInterfaceClass, [e.bEndpointAddress for e in i])
        for i in cfg
    ]
    assert [(0, 0x02, [0x82]), (1, 0x0A, [EP_IN, EP_OUT])] == layout
    data_eps = [(e.bmAttributes, e.wMaxPacketSize) for e in cfg[(1, 0)]]
    assert [(2, 64), (2, 64)] == data_eps
    raw = usb.control.get_descriptor(dev, 255, usb.util.DESC_TYPE_CONFIG, 0)
    assert cfg.wTotalLength == len(raw)


def test_pyusb_claim_needs_cdc_acm_detached(bus: SimulatedBus) -> None:
    """
    cdc_acm holds both interfaces until detached (EBUSY before); every
    detach is recorded.
    """
    dev = find(bus)[0]
    assert [True, True] == [dev.is_kernel_driver_active(i) for i in (0, 1)]
    with pytest.raises(usb.core.USBError) as busy:
        usb.util.claim_interface(dev, 1)
    assert errno.EBUSY == busy.value.errno
    open_data(dev)
    assert [(dev.serial_number, 0), (dev.serial_number, 1)] == bus.detached
    assert [False, False] == [dev.is_kernel_driver_active(i) for i in (0, 1)]


def test_pyusb_reset_returns_serial_frame_and_reads_time_out(
    bus: SimulatedBus,
) -> None:
    """
    Writing ^C to 0x03 makes the key answer S! on 0x81; a read with nothing
    to deliver raises USBTimeoutError (ETIMEDOUT), and a buffer that cannot
    hold a whole packet overflows.
    """
    dev = find(bus)[0]
    open_data(dev)
    assert 1 == dev.write(EP_OUT, b"\x03")
    packet = parse_packet(bytes(dev.read(EP_IN, 64, timeout=1000)))
    assert (FrameType.SERIAL, bus.keys[dev.serial_number].serial) == (
        packet.type,
        packet.data,
    )
    with pytest.raises(usb.core.USBTimeoutError) as timeout:
        dev.read(EP_IN, 64, timeout=10)
    assert (errno.ETIMEDOUT, -7) == (
        timeout.value.errno,
        timeout.value.backend_error_code,
    )
    dev.write(EP_OUT, b"\x03")
    buffer = array.array("B", bytes(10))
    with pytest.raises(usb.core.USBError) as overflow:
        dev.read(EP_IN, buffer, timeout=1000)
    assert errno.EOVERFLOW == overflow.value.errno


def test_pyusb_unplug_and_replug(bus: SimulatedBus) -> None:
    """
    An unplugged key leaves enumeration and its handle fails with ENODEV;
    after a replug it is back with a new address and cdc_acm bound again,
    while the old handle stays dead.
    """
    dev = find(bus)[0]
    serial = dev.serial_number
    open_data(dev)
    bus.unplug(serial)
    assert serial not in {d.serial_number for d in find(bus)}
    with pytest.raises(usb.core.USBError) as gone:
        dev.read(EP_IN, 64, 100)
    assert (errno.ENODEV, -4) == (gone.value.errno, gone.value.backend_error_code)
    with pytest.raises(usb.core.USBError) as gone:
        dev.write(EP_OUT, b"R")
    assert errno.ENODEV == gone.value.errno
    bus.replug(serial)
    (again,) = [d for d in find(bus) if d.serial_number == serial]
    assert again.address != dev.address
    assert again.is_kernel_driver_active(1)
    with pytest.raises(usb.core.USBError) as stale:
        dev.read(EP_IN, 64, 100)
    assert errno.ENODEV == stale.value.errno
    open_data(again)
    packet = parse_packet(bytes(again.read(EP_IN, 64, timeout=1000)))
    assert FrameType.SERIAL == packet.type  # the power-on announcement


# ---- Unix socket relay ----


async def read_frame(reader: asyncio.StreamReader) -> FrameType:
    """
    Read one 64-byte frame and return its type.
    """
    async with asyncio.timeout(10):
        return parse_packet(await reader.readexactly(64)).type


async def test_unix_server_relays_one_client_at_a_time(tmp_path: Path) -> None:
    """
    The socket is private; a client's ^C gets an S! frame; a second client is
    closed at once while the first is connected; the slot frees on hang-up and
    the socket file is removed on close.
    """
    key = slow_key()
    path = tmp_path / "key.sock"
    server = UnixKeyServer(key, path)
    await server.start()
    try:
        assert 0o600 == stat.S_IMODE(os.lstat(path).st_mode)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"\x03")
        assert FrameType.SERIAL == await read_frame(reader)
        reader2, writer2 = await asyncio.open_unix_connection(path)
        async with asyncio.timeout(10):
            assert b"" == await reader2.read()
        writer2.close()
        writer.close()
        await eventually(lambda: not server.busy)
        reader3, writer3 = await asyncio.open_unix_connection(path)
        writer3.write(b"\x03")
        assert FrameType.SERIAL == await read_frame(reader3)
        writer3.close()
    finally:
        await server.close()
    assert not path.exists()


async def test_unix_client_is_closed_when_key_is_unplugged(tmp_path: Path) -> None:
    """
    Unplugging the key ends the client's connection (EOF), as ekey-ulusbd's
    exit would.
    """
    key = slow_key()
    path = tmp_path / "key.sock"
    async with UnixKeyServer(key, path):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"\x03")
        assert FrameType.SERIAL == await read_frame(reader)
        key.unplug()
        async with asyncio.timeout(10):
            assert b"" == await reader.read()
        writer.close()
    assert not path.exists()


async def test_serve_unix_runs_until_stopped(tmp_path: Path) -> None:
    """
    ``serve_unix`` replaces a stale socket file, serves until ``stop`` is set
    and removes its socket; a non-socket at the path is refused.
    """
    path = tmp_path / "key.sock"
    stale = UnixKeyServer(slow_key(), path)
    await stale.start()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_unix(slow_key(), path, stop=stop))

    def replaced() -> bool:
        try:
            return os.lstat(path).st_ino != stale.inode
        except FileNotFoundError:
            return False

    await eventually(replaced)
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"\x03")
    assert FrameType.SERIAL == await read_frame(reader)
    stop.set()
    async with asyncio.timeout(10):
        await task
    writer.close()
    assert not path.exists()
    await stale.close()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await serve_unix(slow_key(), path, stop=stop)
