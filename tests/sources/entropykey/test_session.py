"""
The host session state machine, alone and paired with the device model.
"""

import random
from collections.abc import Callable

import pytest

from sources.entropykey.encoding import encode_subcode
from sources.entropykey.session import (
    NEED_DATA,
    Anomaly,
    EntropyBlock,
    Event,
    Health,
    SerialNumber,
    Session,
    SessionState,
    StateChanged,
    StatusReport,
)
from sources.entropykey.sim.model import DeviceModel
from sources.entropykey.skein import SessionCrypto
from sources.entropykey.wire import (
    FailureMode,
    FrameType,
    build_binary_frame,
    build_text_frame,
)

SERIAL = bytes.fromhex("37006F065837393049391143")
LTK = bytes(range(32))
ZERO = SessionCrypto(SERIAL)
S_FRAME = build_binary_frame(FrameType.SERIAL, b"AA", SERIAL, ZERO)
K_REQ = build_text_frame(FrameType.KEY_REQUEST, "Please re-key session.", ZERO)
K_FRAME_17_3 = b"* K!MA6XxLwelzehWDH8ofVA7moL76KiQj0ruKmqs9T7ygW/Q=    SstvMUTe\r\n"
E_FRAME_17_3 = b"* E!AA6LSUT/i551ppmCmVLrk3oeIS8rKhLko2BM2U8qC+FE0=    Jq/CatHV\r\n"
I_FRAME_17_3 = b"* I>T03150 V03254" + b" " * 37 + b"4SE9vbTh\r\n"
TICK = 0.05


def nonce_17_3(n: int) -> bytes:
    """
    The random part of the spec 17.3 host nonce.
    """
    assert n == 8
    return bytes(range(0xA1, 0xA9))


class Pair:
    """
    A session wired to a device model in memory, with a simulated clock.
    """

    def __init__(
        self,
        keyring: dict[bytes, bytes] | None = None,
        device_ltk: bytes = LTK,
        **session_kwargs: object,
    ) -> None:
        self.draws: list[bytes] = []
        rng = random.Random(7)

        def device_random(n: int) -> bytes:
            data = rng.randbytes(n)
            self.draws.append(data)
            return data

        self.device = DeviceModel(SERIAL, device_ltk, random_bytes=device_random)
        self.session = Session(
            {SERIAL: LTK} if keyring is None else keyring,
            random_bytes=random.Random(8).randbytes,
            **session_kwargs,  # type: ignore[arg-type]
        )
        self.now = 0.0
        self.events: list[Event] = []
        self.device.data_to_send()  # drop the power-on serial frame
        self.session.start(self.now)

    def step(self) -> None:
        """
        Exchange bytes once in each direction, then advance the clock.
        """
        self.device.receive_data(self.session.data_to_send())
        self.device.advance(self.now)
        data = self.device.data_to_send()
        if data:
            self.session.receive_data(data, self.now)
        timer = self.session.get_timer()
        if timer is not None and timer <= self.now:
            self.session.handle_timer(self.now)
        self.events.extend(self.session.events())
        self.now += TICK

    def run(self, seconds: float) -> None:
        """
        Run the pair for ``seconds`` of simulated time.
        """
        for _ in range(round(seconds / TICK)):
            self.step()

    def run_until(self, done: Callable[[], bool], limit: float = 30.0) -> None:
        """
        Run until ``done()`` or fail after ``limit`` simulated seconds.
        """
        end = self.now + limit
        while not done():
            assert self.now < end, self.session.status
            self.step()

    def blocks(self) -> list[EntropyBlock]:
        """
        The entropy blocks delivered so far.
        """
        return [e for e in self.events if isinstance(e, EntropyBlock)]

    def healths(self) -> list[Health]:
        """
        The sequence of health values reported through StateChanged.
        """
        return [e.new.health for e in self.events if isinstance(e, StateChanged)]


def drain(session: Session) -> list[Event]:
    """
    Remove and return every pending event.
    """
    return list(session.events())


def test_full_session_from_reset_to_entropy() -> None:
    """
    Reset, serial, key request, keying and encrypted entropy: the host ends up
    HEALTHY and delivers exactly the plaintext the device generated.
    """
    pair = Pair()
    pair.run_until(lambda: len(pair.blocks()) >= 100)
    states = [e.new.state for e in pair.events if isinstance(e, StateChanged)]
    assert states[:4] == [
        SessionState.SESSION,
        SessionState.SESSION_SENT,
        SessionState.KEYED_FIRST,
        SessionState.KEYED,
    ]
    serials = [e for e in pair.events if isinstance(e, SerialNumber)]
    assert [(s.serial, s.protocol_version, s.text) for s in serials] == [
        (SERIAL, 0, "NwBvBlg3OTBJORFD")
    ]
    blocks = pair.blocks()
    assert list(range(len(blocks))) == [b.sequence for b in blocks]
    assert all(b.creditable for b in blocks)
    draws = set(pair.draws)
    assert all(b.data in draws for b in blocks)
    status = pair.session.status
    assert (
        status.health,
        status.reason,
        status.creditable,
    ) == (Health.HEALTHY, "running ok", True)
    counters = pair.session.counters
    assert (
        counters.resets,
        counters.nonces,
        counters.rekeys,
        counters.packet_errors,
    ) == (1, 1, 1, 0)
    assert 32 * len(blocks) == counters.total_entropy


def test_spec_17_3_exchange_and_exact_key_switch() -> None:
    """
    With the 17.3 nonce the host sends the documented K command, switches its
    MAC key exactly at K!, and decrypts the documented E! frame to 00..1F.
    """
    session = Session({SERIAL: LTK}, random_bytes=nonce_17_3)
    session.start(0.0)
    assert session.data_to_send() == b"\x03"
    session.receive_data(S_FRAME + K_REQ)
    assert session.data_to_send() == b"KAAAAAKGio6Slpqeo."
    session.receive_data(K_FRAME_17_3)
    assert session.state == SessionState.KEYED_FIRST
    drain(session)
    session.receive_data(I_FRAME_17_3 + E_FRAME_17_3)
    events = drain(session)
    reports = [e for e in events if isinstance(e, StatusReport)]
    assert [(r.info.temperature_dk, r.info.voltage_mv) for r in reports] == [
        (3150, 3254)
    ]
    blocks = [e for e in events if isinstance(e, EntropyBlock)]
    assert [EntropyBlock(bytes(range(32)), 0, True)] == blocks
    assert [session.state] == [SessionState.KEYED]


def test_zero_key_frame_after_key_switch_means_wrong_key() -> None:
    """
    A frame MAC'd with the old key after K! is a MAC failure: BADKEY (reset and
    KEYED_BAD), reported as FAILED with a wrong-key reason.
    """
    session = Session({SERIAL: LTK}, random_bytes=nonce_17_3)
    session.start(0.0)
    session.receive_data(S_FRAME + K_REQ + K_FRAME_17_3)
    session.data_to_send()
    session.receive_data(K_REQ)
    assert session.state == SessionState.KEYED_BAD
    assert session.data_to_send() == b"\x03"
    assert session.status.health == Health.FAILED
    assert "long-term key" in session.status.reason


def test_wrong_long_term_key() -> None:
    """
    A keyring LTK that differs from the device's gives KEYED_BAD / FAILED, no
    entropy, and after 50 key requests a retry that still reports FAILED.
    """
    pair = Pair(device_ltk=bytes(32))
    pair.run_until(lambda: pair.session.state is SessionState.KEYED_BAD)
    assert pair.session.status.health == Health.FAILED
    resets = pair.session.counters.resets
    pair.run_until(lambda: pair.session.counters.resets > resets, limit=60)
    pair.run(5)
    assert pair.blocks() == []
    assert pair.session.status.health == Health.FAILED


def test_unknown_serial_is_untrusted() -> None:
    """
    A serial with no keyring entry is FAILED (untrusted) and terminal.
    """
    pair = Pair(keyring={})
    pair.run(3)
    status = pair.session.status
    assert (status.health, status.state) == (Health.FAILED, SessionState.UNTRUSTED)
    assert "no long-term key for serial NwBvBlg3OTBJORFD" in status.reason
    assert pair.session.data_to_send() == b""
    assert pair.session.get_timer() is None
    assert pair.blocks() == []


def test_expected_serial_mismatch_is_untrusted() -> None:
    """
    A key reporting a serial other than the configured one is untrusted.
    """
    other = bytes(12)
    session = Session({SERIAL: LTK, other: LTK}, expected_serial=other)
    session.start(0.0)
    session.receive_data(S_FRAME)
    assert session.state == SessionState.UNTRUSTED
    assert "expected AAAAAAAAAAAAAAAA" in session.status.reason


def test_generator_failure_quarantines_and_never_credits() -> None:
    """
    An I>S failure code latches QUARANTINED; later blocks are not creditable,
    even after the device is power-cycled and delivers again.
    """
    pair = Pair()
    pair.run_until(lambda: len(pair.blocks()) > 0)
    pair.device.fail_generator(FailureMode.RAW_LEFT_BAD)
    pair.device.send_info()
    pair.step()
    status = pair.session.status
    assert (status.health, status.creditable) == (Health.QUARANTINED, False)
    assert "left generator no longer random" in status.reason
    assert pair.session.failure_mode == FailureMode.RAW_LEFT_BAD
    count = len(pair.blocks())
    pair.device.power_cycle(pair.now)
    pair.run_until(lambda: len(pair.blocks()) > count + 10)
    assert not any(b.creditable for b in pair.blocks()[count:])
    assert pair.session.status.health == Health.QUARANTINED


def test_gone_bad_during_rekey_quarantines() -> None:
    """
    A failed key answers K with B>; the host latches a failure (QUARANTINED).
    """
    pair = Pair()
    pair.run_until(lambda: pair.session.state is SessionState.SESSION)
    pair.device.fail_generator(FailureMode.TEMP_TOO_HIGH)
    pair.device.send_key_request()
    pair.run(1)
    assert pair.session.status.health == Health.QUARANTINED
    assert "generators have gone bad" in pair.session.status.reason


def test_corrupted_macs_fail_the_key() -> None:
    """
    A key whose MACs never verify is reset, retried on timeouts, and reported
    FAILED with a MAC reason; nothing is delivered.
    """
    pair = Pair()
    pair.device.corrupt_macs = True
    pair.run(30)
    status = pair.session.status
    assert status.health == Health.FAILED
    assert "MAC" in status.reason
    assert pair.session.counters.packet_errors > 0
    assert any(isinstance(e, Anomaly) and e.kind == "mac" for e in pair.events)
    assert pair.blocks() == []


def test_many_consecutive_mac_failures_fail_the_key() -> None:
    """
    max_mac_failures bad frames in a row give FAILED at once; a good frame heals.
    """
    pair = Pair(max_mac_failures=5)
    pair.run_until(lambda: len(pair.blocks()) > 0)
    pair.device.corrupt_macs = True
    pair.device.produce_entropy_frames(10)
    pair.step()
    assert pair.session.status.health == Health.FAILED
    assert "frames in a row failed their MAC" in pair.session.status.reason
    pair.device.corrupt_macs = False
    pair.run_until(lambda: pair.session.status.health is Health.HEALTHY)


def test_mute_key_stalls() -> None:
    """
    A key that never answers is reset on each timeout and reported STALLED.
    """
    pair = Pair()
    pair.device.mute = True
    pair.run(20)
    status = pair.session.status
    assert (status.health, status.state) == (Health.STALLED, SessionState.INIT)
    assert "not answering" in status.reason
    assert pair.session.counters.timeouts >= 3


def test_frames_queued_before_a_reset_are_skipped() -> None:
    """
    Frames a keyed key queued before it saw a reset (three FIPS blocks a
    paused host had not read) are skipped as stale, not counted as MAC
    failures; the key answers the reset, is keyed again and delivers.
    """
    pair = Pair()
    pair.run_until(lambda: len(pair.blocks()) > 0)
    pair.device.advance(pair.now + 3 * pair.device.block_interval)
    queued = pair.device.data_to_send()
    deadline = pair.session.get_timer()
    assert deadline is not None
    pair.now = deadline
    pair.session.handle_timer(pair.now)
    pair.device.receive_data(pair.session.data_to_send())
    pair.session.receive_data(queued + pair.device.data_to_send(), pair.now)
    counters = pair.session.counters
    assert (len(queued) // 64, 0) == (counters.stale_frames, counters.packet_errors)
    assert SessionState.SESSION == pair.session.state
    delivered = len(pair.blocks())
    pair.run_until(lambda: len(pair.blocks()) > delivered)
    assert Health.HEALTHY == pair.session.status.health
    assert 0 == pair.session.counters.packet_errors


def test_frames_before_the_first_serial_of_a_new_session_are_skipped() -> None:
    """
    A new session (a restarted driver) cannot check what the key queued under
    an earlier host's session key: those frames are skipped until the key's
    S! answers the reset, and do not count as MAC failures.
    """
    pair = Pair()
    pair.run_until(lambda: len(pair.blocks()) > 0)
    pair.device.advance(pair.now + 3 * pair.device.block_interval)
    queued = pair.device.data_to_send()
    session = Session({SERIAL: LTK})
    session.start(pair.now)
    pair.device.receive_data(session.data_to_send())
    session.receive_data(queued + pair.device.data_to_send(), pair.now)
    counters = session.counters
    assert (len(queued) // 64, 0) == (counters.stale_frames, counters.packet_errors)
    assert SessionState.SESSION == session.state
    assert Health.STARTING == session.status.health


def test_corrupted_serial_after_a_reset_is_not_stale() -> None:
    """
    Only frames that verify under the session key before the reset are
    stale: a key whose S! fails its MAC still counts towards failure.
    """
    pair = Pair(max_mac_failures=3)
    pair.run_until(lambda: len(pair.blocks()) > 0)
    pair.device.corrupt_macs = True
    pair.run_until(lambda: Health.FAILED == pair.session.status.health)
    assert 0 == pair.session.counters.stale_frames
    assert "MAC" in pair.session.status.reason


def test_garbage_between_frames_is_tolerated() -> None:
    """
    Garbage after every frame is skipped by the synchroniser; entropy flows.
    """
    pair = Pair()
    pair.device.garbage = b"**\r\n* junk\x00"
    pair.run_until(lambda: len(pair.blocks()) >= 50)
    assert pair.session.counters.framing_errors > 0
    assert pair.session.status.health == Health.HEALTHY


def test_rekey_after_sequence_4095_stays_healthy() -> None:
    """
    At sequence 4095 the host re-keys at once; sequences restart at 0 under
    the new key and the key never stops being HEALTHY.
    """
    pair = Pair()
    pair.run_until(lambda: len(pair.blocks()) > 0)
    healthy_at = len(pair.healths())
    assert 4096 - pair.device.next_sequence == pair.device.produce_entropy_frames(5000)
    pair.step()
    assert pair.blocks()[-1].sequence == 4095
    pair.run_until(lambda: 10 < pair.blocks()[-1].sequence < 4000)
    seqs = [b.sequence for b in pair.blocks()]
    restart = seqs.index(4095) + 1
    assert list(range(10)) == seqs[restart : restart + 10]
    assert pair.session.counters.rekeys == 2
    assert all(h is Health.HEALTHY for h in pair.healths()[healthy_at:])
    assert all(b.creditable for b in pair.blocks())


def test_key_request_while_keyed_rekeys() -> None:
    """
    A k> while KEYED (the key asks) triggers a new nonce and a new session key.
    """
    pair = Pair()
    pair.run_until(lambda: len(pair.blocks()) > 0)
    old_key = pair.device.session_key
    pair.device.send_key_request()
    pair.run(2)
    assert old_key != pair.device.session_key
    assert pair.session.counters.rekeys == 2
    assert pair.session.status.health == Health.HEALTHY


def test_replayed_or_reordered_entropy_is_rejected() -> None:
    """
    A repeated or lower sequence number under one key is dropped and resets.
    """
    pair = Pair()
    pair.run_until(lambda: pair.session.state is SessionState.KEYED)
    pair.device.produce_entropy_frames(3)
    frames = pair.device.data_to_send()
    pair.session.receive_data(frames)
    delivered = len(drain(pair.session))
    assert delivered > 0
    pair.session.receive_data(frames[64:128])
    events = drain(pair.session)
    assert not any(isinstance(e, EntropyBlock) for e in events)
    assert any(isinstance(e, Anomaly) and e.kind == "sequence" for e in events)
    assert pair.session.counters.sequence_errors == 1
    assert pair.session.state == SessionState.INIT


def test_end_of_stream_stops() -> None:
    """
    b"" means end of stream: STOPPED, terminal, later data ignored.
    """
    session = Session({SERIAL: LTK})
    session.start(0.0)
    session.receive_data(b"")
    assert (
        session.status.health,
        session.status.reason,
    ) == (Health.STOPPED, "key closed (end of stream)")
    session.receive_data(S_FRAME)
    assert session.state == SessionState.CLOSED
    assert session.get_timer() is None


def test_repeated_key_requests_while_waiting_for_k() -> None:
    """
    Up to five repeated k> frames are ignored in SESSION_SENT; the sixth resets.
    """
    session = Session({SERIAL: LTK})
    session.start(0.0)
    session.receive_data(S_FRAME + K_REQ)
    session.receive_data(K_REQ * 5)
    assert session.state == SessionState.SESSION_SENT
    session.receive_data(K_REQ)
    assert [session.state] == [SessionState.INIT]


def test_unexpected_frame_resets_with_warning_anomaly() -> None:
    """
    A W> frame in SESSION resets the key and surfaces the warning text.
    """
    session = Session({SERIAL: LTK})
    session.start(0.0)
    warn = build_text_frame(FrameType.WARNING, "Unknown Input Character 0x65", ZERO)
    session.receive_data(S_FRAME + warn)
    events = drain(session)
    assert Anomaly("warning", "Unknown Input Character 0x65") in events
    assert session.state == SessionState.INIT


def test_unknown_frame_type_resets() -> None:
    """
    A frame of unknown type in SESSION is a protocol error that resets.
    """
    session = Session({SERIAL: LTK})
    session.start(0.0)
    bogus = b"* A>hello".ljust(54) + b"AAAAAAAA\r\n"
    session.receive_data(S_FRAME + bogus)
    assert session.state == SessionState.INIT
    assert any(isinstance(e, Anomaly) and e.kind == "protocol" for e in drain(session))


def test_bad_key_frame_echo_length_resets() -> None:
    """
    A K! echoing a nonce length other than 12 resets the key.
    """
    session = Session({SERIAL: LTK})
    session.start(0.0)
    bad_k = build_binary_frame(FrameType.KEY, encode_subcode(11), bytes(32), ZERO)
    session.receive_data(S_FRAME + K_REQ + bad_k)
    assert session.state == SessionState.INIT


def test_nonce_failure_is_untrusted() -> None:
    """
    If random bytes cannot be had, the session becomes untrusted (FAILED).
    """

    def broken(n: int) -> bytes:
        raise OSError("no entropy")

    session = Session({SERIAL: LTK}, random_bytes=broken)
    session.start(0.0)
    session.receive_data(S_FRAME + K_REQ)
    assert session.state == SessionState.UNTRUSTED
    assert "cannot generate a nonce" in session.status.reason


def test_short_random_read_is_untrusted() -> None:
    """
    A random source returning too few bytes is treated like a failure.
    """
    session = Session({SERIAL: LTK}, random_bytes=lambda n: b"")
    session.start(0.0)
    session.receive_data(S_FRAME + K_REQ)
    assert session.state == SessionState.UNTRUSTED


def test_next_event_and_need_data() -> None:
    """
    next_event returns queued events in order, then NEED_DATA.
    """
    session = Session({SERIAL: LTK})
    assert NEED_DATA is session.next_event()
    session.start(0.0)
    first = session.next_event()
    assert isinstance(first, Anomaly)
    while session.next_event() is not NEED_DATA:
        pass


def test_timer_not_due_does_nothing() -> None:
    """
    handle_timer before the deadline neither resets nor counts a timeout.
    """
    session = Session({SERIAL: LTK}, response_timeout=5.0)
    session.start(0.0)
    session.data_to_send()
    assert session.get_timer() == 5.0
    session.handle_timer(4.9)
    assert (session.data_to_send(), session.counters.timeouts) == (b"", 0)
    session.handle_timer(5.0)
    assert (session.data_to_send(), session.counters.timeouts) == (b"\x03", 1)


def test_time_not_reading_is_taken_off_the_timer() -> None:
    """
    extend_timer pushes the deadline back by the time the host did not read,
    so a key left unread is not taken for silent; it does nothing without a
    deadline, nor for a negative time.
    """
    session = Session({SERIAL: LTK}, response_timeout=5.0)
    session.start(0.0)
    session.extend_timer(10.0)
    session.extend_timer(-3.0)
    assert 15.0 == session.get_timer()
    session.handle_timer(14.9)
    assert 0 == session.counters.timeouts
    session.close("driver stopped")
    session.extend_timer(10.0)
    assert session.get_timer() is None


def test_close_is_idempotent() -> None:
    """
    close() stops the session once, with the caller's reason.
    """
    session = Session({SERIAL: LTK})
    session.close("driver stopped")
    session.close("again")
    assert (
        session.status.health,
        session.status.reason,
    ) == (Health.STOPPED, "driver stopped")


@pytest.mark.parametrize("split", [1, 7, 64, 1000])
def test_session_is_split_independent(split: int) -> None:
    """
    Feeding the 17.3 byte stream in any chunk size gives the same plaintext.
    """
    session = Session({SERIAL: LTK}, random_bytes=nonce_17_3)
    session.start(0.0)
    session.receive_data(S_FRAME + K_REQ)
    stream = K_FRAME_17_3 + E_FRAME_17_3
    for i in range(0, len(stream), split):
        session.receive_data(stream[i : i + split])
    blocks = [e for e in drain(session) if isinstance(e, EntropyBlock)]
    assert [bytes(range(32))] == [b.data for b in blocks]
