"""
`SimulatedKey`: the simulated Entropy Key in real time, with a host session.
"""

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
from sources.entropykey.sim.key import (
    BLOCK_BYTES,
    MAX_BACKLOG,
    MAX_STATUS_BACKLOG,
    STATUS_BYTES,
    KeyOptions,
    SimulatedKey,
    SimulatedUnplugged,
    aread,
    awrite,
)
from sources.entropykey.sim.keypairs import new_key_pair, write_keyring
from sources.entropykey.skein import derive_long_term_key, lt_nonce_mac
from sources.entropykey.wire import (
    FailureMode,
    FrameType,
    encode_lt_mac,
    encode_lt_rekey,
    parse_packet,
)
from tests.sources.entropykey.sim.support import (
    LTK,
    SERIAL,
    SERIAL_TEXT,
    TICK,
    slow_key,
)


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
