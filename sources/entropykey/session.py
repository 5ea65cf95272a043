"""
The host side of one Entropy Key connection, sans-I/O (spec section 9).

Theory of operation
-------------------
`Session` is fed device bytes (`receive_data`) and the time (`now` arguments);
it never reads a clock or touches a file descriptor. It produces events
(`next_event`) and bytes to write to the key (`data_to_send`).

States (`SessionState`) follow ekeyd's connection.c:

* INIT: reset sent, waiting for the ``S!`` serial frame.
* SESSION: serial accepted and a long-term key (LTK) found; waiting for ``k>``.
* SESSION_SENT: ``K<nonce>.`` sent, waiting for ``K!``.
* KEYED_FIRST: new session key installed, waiting for the first ``E!`` under it.
* KEYED: entropy flowing. ``k>`` or ``E!`` sequence 4095 starts a re-key.
* KEYED_BAD: the first frame after keying failed its MAC (wrong LTK); only
  ``k>`` frames are counted, and after 50 the whole keying is retried.
* UNTRUSTED: unknown serial, no LTK or serial mismatch. Terminal.
* CLOSED: end of stream or `close`. Terminal.

Only frames whose MAC verifies move the machine; a MAC failure is its own
column of the table (`_TABLE`), where ekeyd resets the key. The MAC key is the
zero key after every reset and switches to the new session key exactly when
``K!`` is processed (the ``K!`` frame itself is still under the old key).

Deviations from ekeyd, all towards robustness:

* `start` sends a reset at once instead of waiting for the key to talk.
* In INIT a reset is already outstanding, so further bad frames are ignored
  rather than answered with one reset each (which caused reset storms); a timer
  re-sends the reset if no ``S!`` arrives within ``response_timeout``.
* In INIT, frames the key queued before it saw the reset are stale, not
  failures: the key answers a reset with ``S!`` first, so what comes before
  it was sent earlier. Those that verify under the session key in force before
  the reset, and, before the first ``S!`` of a fresh session (no MAC key yet),
  all but ``S!``, are skipped without counting towards ``max_mac_failures``. A
  key that was not read for a while can have a few FIPS blocks queued (a
  paused source), and counting them failed a healthy key after every reset.
* The response timer only runs while the host listens: `extend_timer` pushes
  it back by the time the driver spent not reading.
* A valid ``S!`` in SESSION re-runs the serial check instead of resetting.
* Unknown frame types reset the key instead of closing the connection;
  ``B>`` (generators gone bad) latches a failure instead of closing.
* ``E!`` sequence numbers must strictly increase under one session key; a
  repeated or out-of-order one is dropped and the key is reset.
* A failure mode reported by ``I>S`` (or ``B>``) is latched for the life of
  the object: the key is QUARANTINED and no later block is creditable.

`status` folds all this into a `Health` whose values match the broker's source
states, a human reason, and a ``creditable`` flag.
"""

import enum
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Final

from .encoding import serial_to_text
from .events import (
    NEED_DATA,
    Anomaly,
    Counters,
    EntropyBlock,
    Event,
    Health,
    NeedData,
    SerialNumber,
    SessionState,
    StateChanged,
    Status,
    StatusReport,
)
from .skein import PERS_RS, SessionCrypto, Skein256, keyed_hash, prepare
from .wire import (
    RESET,
    FailureMode,
    FrameError,
    FrameSynchroniser,
    FrameType,
    InfoError,
    Packet,
    encode_session_rekey,
    parse_info,
    parse_packet,
    verify_mac,
)

NONCE_LEN: Final = 12
SEQUENCE_MAX: Final = 4095
KEYREQ_REPEAT_LIMIT: Final = 5
BADKEY_LIMIT: Final = 50
OPENING_RESET: Final = "connection opened"
"""The reason of the reset every session begins with (routine, unlike the rest)."""

# The event types are defined in `events` and re-exported: tests and tools
# import them together with `Session` from here.
__all__ = [
    "BADKEY_LIMIT",
    "KEYREQ_REPEAT_LIMIT",
    "NEED_DATA",
    "NONCE_LEN",
    "OPENING_RESET",
    "SEQUENCE_MAX",
    "Anomaly",
    "Counters",
    "EntropyBlock",
    "Event",
    "Health",
    "NeedData",
    "SerialNumber",
    "Session",
    "SessionState",
    "StateChanged",
    "Status",
    "StatusReport",
]


class _A(enum.Enum):
    IGNORE = enum.auto()
    RESET = enum.auto()
    SNUM = enum.auto()
    INFO = enum.auto()
    KEYREQ = enum.auto()
    KEYREQ_REPEAT = enum.auto()
    KEY = enum.auto()
    ENTROPY = enum.auto()
    BADKEY = enum.auto()
    BADKEY_COUNT = enum.auto()
    GONE_BAD = enum.auto()


# Columns are frame types that passed their MAC; None is "MAC failed". Columns
# not listed take the row's default.
_S, _T = SessionState, FrameType
_TABLE: Final[dict[SessionState, tuple[_A, dict[FrameType | None, _A]]]] = {
    _S.INIT: (_A.IGNORE, {_T.SERIAL: _A.SNUM, _T.INFO: _A.INFO}),
    _S.SESSION: (
        _A.RESET,
        {
            _T.SERIAL: _A.SNUM,
            _T.KEY_REQUEST: _A.KEYREQ,
            _T.INFO: _A.INFO,
            _T.GONE_BAD: _A.GONE_BAD,
        },
    ),
    _S.SESSION_SENT: (
        _A.RESET,
        {
            _T.KEY_REQUEST: _A.KEYREQ_REPEAT,
            _T.INFO: _A.INFO,
            _T.KEY: _A.KEY,
            _T.GONE_BAD: _A.GONE_BAD,
        },
    ),
    _S.KEYED_FIRST: (
        _A.RESET,
        {
            _T.INFO: _A.INFO,
            _T.ENTROPY: _A.ENTROPY,
            _T.GONE_BAD: _A.GONE_BAD,
            None: _A.BADKEY,
        },
    ),
    _S.KEYED: (
        _A.RESET,
        {
            _T.KEY_REQUEST: _A.KEYREQ,
            _T.INFO: _A.INFO,
            _T.ENTROPY: _A.ENTROPY,
            _T.GONE_BAD: _A.GONE_BAD,
        },
    ),
    _S.KEYED_BAD: (_A.IGNORE, {_T.KEY_REQUEST: _A.BADKEY_COUNT, _T.INFO: _A.INFO}),
    _S.UNTRUSTED: (_A.IGNORE, {}),
    _S.CLOSED: (_A.IGNORE, {}),
}

_WAITING: Final = {
    _S.INIT: "waiting for the serial number",
    _S.SESSION: "serial ok, waiting for a key request",
    _S.SESSION_SENT: "keying the session",
    _S.KEYED_FIRST: "keyed, waiting for the first entropy frame",
}


class Session:
    """
    Host state machine for one key.

    Args:
        keyring: binary 12-byte serial -> 32-byte long-term key.
        expected_serial: if given, a key reporting any other serial is untrusted.
        random_bytes: source of the 8 random nonce bytes (``os.urandom``);
            inject a deterministic one in tests.
        response_timeout: seconds without a valid frame before the key is reset.
        stall_after: consecutive timeouts after which the key counts as stalled.
        max_mac_failures: consecutive MAC failures after which the key is failed.
    """

    def __init__(
        self,
        keyring: Mapping[bytes, bytes],
        *,
        expected_serial: bytes | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        response_timeout: float = 5.0,
        stall_after: int = 3,
        max_mac_failures: int = 50,
    ) -> None:
        self._keyring = keyring
        self._random_bytes = random_bytes
        self._response_timeout = response_timeout
        self._stall_after = stall_after
        self._max_mac_failures = max_mac_failures
        self._sync = FrameSynchroniser()
        self._events: deque[Event] = deque()
        self._out = bytearray()
        self._state = SessionState.INIT
        self._serial = expected_serial
        self._expected_serial = expected_serial
        self._serial_reported = False
        self._zero_crypto: SessionCrypto | None = None
        # None means "no MAC key yet": only then is an S! frame accepted unchecked.
        self._crypto: SessionCrypto | None = None
        # The session key in force before the last reset, until the key's S!
        # shows that everything it sent under that key has been read.
        self._stale_crypto: SessionCrypto | None = None
        self._rekey_state: Skein256 | None = None
        self._nonce = b""
        self._nonce_counter = 0
        self._last_seq: int | None = None
        self._repeat = 0
        self._flowing = False
        self._bad_key = False
        self._failure: FailureMode | None = None
        self._failure_reason = ""
        self._terminal_reason = ""
        self._reset_reason = OPENING_RESET
        self._now = 0.0
        self._deadline: float | None = None
        self._consecutive_mac_failures = 0
        self._timeouts = 0
        self._packets_ok = self._packet_errors = self._resets = 0
        self._stale_frames = 0
        self._nonces = self._rekeys = self._total_entropy = self._sequence_errors = 0
        self._status = self._compute_status()

    # -- public API ---------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """
        The current connection state.
        """
        return self._state

    @property
    def status(self) -> Status:
        """
        Health, reason and state, as of the last processed input.
        """
        return self._status

    @property
    def serial(self) -> bytes | None:
        """
        The key's binary serial number, once known.
        """
        return self._serial

    @property
    def failure_mode(self) -> FailureMode | None:
        """
        The latched generator failure, if the key has reported one.
        """
        return self._failure

    @property
    def counters(self) -> Counters:
        """
        A snapshot of the running totals.
        """
        return Counters(
            frames_ok=self._sync.frames_ok,
            framing_errors=self._sync.framing_errors,
            packets_ok=self._packets_ok,
            packet_errors=self._packet_errors,
            resets=self._resets,
            nonces=self._nonces,
            rekeys=self._rekeys,
            total_entropy=self._total_entropy,
            sequence_errors=self._sequence_errors,
            timeouts=self._timeouts,
            stale_frames=self._stale_frames,
        )

    def start(self, now: float) -> None:
        """
        Begin the connection: queue a reset for the key and arm the timer.
        """
        self._now = now
        self._reset(OPENING_RESET)
        self._update_status()

    def receive_data(self, data: bytes, now: float | None = None) -> None:
        """
        Feed bytes read from the key; ``b""`` means end of stream.

        Args:
            data: raw bytes from the device.
            now: the current time; if omitted the previous call's time is used.
        """
        if now is not None:
            self._now = now
        if self._state is SessionState.CLOSED:
            return
        if not data:
            self.close("key closed (end of stream)")
            return
        for frame in self._sync.feed(data):
            self._handle_frame(frame)
        self._update_status()

    def close(self, reason: str) -> None:
        """
        End the session for good (the driver lost or released the device).
        """
        if self._state is not SessionState.CLOSED:
            self._terminal_reason = reason
            self._state = SessionState.CLOSED
            self._deadline = None
            self._update_status()

    def next_event(self) -> Event | NeedData:
        """
        Return the next pending event, or `NEED_DATA` when there is none.
        """
        return self._events.popleft() if self._events else NEED_DATA

    def events(self) -> Iterator[Event]:
        """
        Yield and remove every pending event.
        """
        while self._events:
            yield self._events.popleft()

    def data_to_send(self) -> bytes:
        """
        Return, and forget, the bytes that must be written to the key.
        """
        out = bytes(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        """
        Return when `handle_timer` must next be called, or None.
        """
        return self._deadline

    def extend_timer(self, seconds: float) -> None:
        """
        Push the response deadline back by ``seconds`` in which the host did not
        read from the key.

        Frames the key sent meanwhile are waiting unread, so that time says
        nothing about whether the key answers.
        """
        if self._deadline is not None and seconds > 0:
            self._deadline += seconds

    def handle_timer(self, now: float) -> None:
        """
        Reset the key if it has not sent a valid frame within ``response_timeout``.
        """
        self._now = now
        if self._deadline is None or now < self._deadline:
            return
        self._timeouts += 1
        detail = f"no valid frame from the key for {self._response_timeout:g} s"
        self._events.append(Anomaly("timeout", detail))
        self._reset(detail)
        self._update_status()

    # -- frame dispatch -----------------------------------------------------

    def _handle_frame(self, frame: bytes) -> None:
        try:
            packet = parse_packet(frame)
        except FrameError as exc:
            self._packet_errors += 1
            self._events.append(Anomaly("protocol", str(exc)))
            if _TABLE[self._state][0] is _A.RESET:
                self._reset(f"protocol error: {exc}")
            return
        if self._crypto is None:
            valid = packet.type is FrameType.SERIAL
        else:
            valid = verify_mac(packet, self._crypto)
        if not valid and self._state is SessionState.INIT and self._stale(packet):
            self._stale_frames += 1
            return
        if valid:
            self._packets_ok += 1
            self._consecutive_mac_failures = 0
            self._timeouts = 0
            self._arm()
        else:
            self._packet_errors += 1
            self._consecutive_mac_failures += 1
            self._events.append(
                Anomaly(
                    "mac",
                    f"{packet.type.value} frame failed its MAC check "
                    f"in state {self._state.value}",
                )
            )
        default, row = _TABLE[self._state]
        action = row.get(packet.type if valid else None, default)
        self._dispatch(action, packet, valid)

    def _stale(self, packet: Packet) -> bool:
        # Only called in INIT for a frame that failed its check.
        if self._crypto is None:
            return True
        stale = self._stale_crypto
        return stale is not None and verify_mac(packet, stale)

    def _dispatch(self, action: _A, packet: Packet, valid: bool) -> None:
        match action:
            case _A.IGNORE:
                pass
            case _A.RESET:
                if packet.type is FrameType.WARNING:
                    self._events.append(Anomaly("warning", packet.text))
                kind = f"{packet.type.value} frame" if valid else "frame with bad MAC"
                self._reset(f"unexpected {kind} in state {self._state.value}")
            case _A.SNUM:
                self._on_serial(packet)
            case _A.INFO:
                self._on_info(packet)
            case _A.KEYREQ:
                self._send_nonce()
            case _A.KEYREQ_REPEAT:
                self._repeat += 1
                if self._repeat > KEYREQ_REPEAT_LIMIT:
                    self._reset("key kept asking for a session key")
            case _A.KEY:
                self._on_key(packet)
            case _A.ENTROPY:
                self._on_entropy(packet)
            case _A.BADKEY:
                self._bad_key = True
                self._reset("first frame after keying failed its MAC")
                self._state = SessionState.KEYED_BAD
                self._repeat = 0
            case _A.BADKEY_COUNT:
                self._repeat += 1
                if self._repeat >= BADKEY_LIMIT:
                    self._reset("retrying the keying process")
            case _A.GONE_BAD:
                self._latch_failure(FailureMode.UNDEFINED, "generators have gone bad")

    # -- actions ------------------------------------------------------------

    def _reset(self, reason: str) -> None:
        self._out += RESET
        self._resets += 1
        self._reset_reason = reason
        self._events.append(Anomaly("reset", reason))
        if self._crypto is not None and self._crypto is not self._zero_crypto:
            self._stale_crypto = self._crypto
        self._crypto = self._zero_crypto
        self._state = SessionState.INIT
        self._flowing = False
        self._last_seq = None
        self._arm()

    def _arm(self) -> None:
        if self._state in (SessionState.UNTRUSTED, SessionState.CLOSED):
            self._deadline = None
        else:
            self._deadline = self._now + self._response_timeout

    def _untrusted(self, reason: str) -> None:
        self._terminal_reason = reason
        self._state = SessionState.UNTRUSTED
        self._deadline = None

    def _on_serial(self, packet: Packet) -> None:
        if len(packet.data) < 12:
            self._reset("serial number frame too short")
            return
        serial = packet.data[:12]
        text = serial_to_text(serial)
        if self._serial is not None and serial != self._serial:
            known = serial_to_text(self._serial)
            self._untrusted(f"key reported serial {text}, expected {known}")
            return
        if self._serial is None or self._zero_crypto is None:
            self._serial = serial
            self._zero_crypto = SessionCrypto(serial)
        self._crypto = self._zero_crypto
        self._stale_crypto = None
        if not self._serial_reported:
            self._serial_reported = True
            self._events.append(SerialNumber(serial, packet.subcode))
        ltk = self._keyring.get(serial)
        if ltk is None:
            self._untrusted(f"no long-term key for serial {text} in the keyring")
            return
        if self._rekey_state is None:
            self._rekey_state = prepare(serial, ltk, PERS_RS)
        self._state = SessionState.SESSION

    def _on_info(self, packet: Packet) -> None:
        try:
            info = parse_info(packet.text)
        except InfoError as exc:
            self._events.append(Anomaly("info", str(exc)))
            return
        self._events.append(StatusReport(info))
        if info.generator is not None:
            mode = info.generator.failure_mode
            if mode is not FailureMode.OK:
                self._latch_failure(mode, mode.description)

    def _latch_failure(self, mode: FailureMode, description: str) -> None:
        if self._failure is None:
            self._failure = mode
            self._failure_reason = f"key reports generator failure: {description}"

    def _send_nonce(self) -> None:
        try:
            random = self._random_bytes(NONCE_LEN - 4)
        except OSError as exc:
            self._untrusted(f"cannot generate a nonce: {exc}")
            return
        if len(random) != NONCE_LEN - 4:
            self._untrusted("cannot generate a nonce: short random read")
            return
        counter = self._nonce_counter.to_bytes(4, "little")
        self._nonce_counter = (self._nonce_counter + 1) & 0xFFFFFFFF
        self._nonce = counter + random
        self._out += encode_session_rekey(self._nonce)
        self._nonces += 1
        self._repeat = 0
        self._state = SessionState.SESSION_SENT

    def _on_key(self, packet: Packet) -> None:
        if packet.subcode != NONCE_LEN or len(packet.data) != 32:
            self._reset(
                f"bad K! frame: echoed {packet.subcode} nonce bytes, "
                f"carried {len(packet.data)} data bytes"
            )
            return
        assert self._rekey_state is not None  # noqa: S101 -- set before SESSION
        assert self._serial is not None  # noqa: S101 -- likewise
        session_key = keyed_hash(self._rekey_state, packet.data, self._nonce)
        self._crypto = SessionCrypto(self._serial, session_key)
        self._rekeys += 1
        self._last_seq = None
        self._state = SessionState.KEYED_FIRST

    def _on_entropy(self, packet: Packet) -> None:
        assert self._crypto is not None  # noqa: S101 -- the MAC verified
        if len(packet.data) != 32:
            self._reset(f"E! frame carried {len(packet.data)} bytes, expected 32")
            return
        seq = packet.subcode
        if self._last_seq is not None and seq <= self._last_seq:
            self._sequence_errors += 1
            detail = f"E! sequence {seq} after {self._last_seq} under one session key"
            self._events.append(Anomaly("sequence", detail))
            self._reset(detail)
            return
        self._last_seq = seq
        pad = self._crypto.pad(packet.subcode_chars)
        plain = (
            int.from_bytes(packet.data, "little") ^ int.from_bytes(pad, "little")
        ).to_bytes(32, "little")
        self._state = SessionState.KEYED
        self._flowing = True
        self._bad_key = False
        self._total_entropy += 32
        self._update_status()
        self._events.append(EntropyBlock(plain, seq, self._status.creditable))
        if seq == SEQUENCE_MAX:
            self._send_nonce()

    # -- status -------------------------------------------------------------

    def _compute_status(self) -> Status:
        st = self._state
        if st is SessionState.CLOSED:
            return Status(Health.STOPPED, self._terminal_reason, st)
        if st is SessionState.UNTRUSTED:
            return Status(Health.FAILED, self._terminal_reason, st)
        if self._failure is not None:
            return Status(Health.QUARANTINED, self._failure_reason, st)
        if self._bad_key:
            reason = (
                "frames fail their MAC after keying: "
                "the long-term key in the keyring is probably wrong"
            )
            return Status(Health.FAILED, reason, st)
        if self._consecutive_mac_failures >= self._max_mac_failures:
            count = self._consecutive_mac_failures
            reason = f"{count} frames in a row failed their MAC"
            return Status(Health.FAILED, reason, st)
        if self._timeouts >= self._stall_after:
            if self._consecutive_mac_failures:
                reason = (
                    f"no valid frame in {self._timeouts} timeouts; "
                    f"{self._consecutive_mac_failures} frames failed their MAC"
                )
                return Status(Health.FAILED, reason, st)
            reason = f"key not answering ({self._timeouts} timeouts)"
            return Status(Health.STALLED, reason, st)
        rekeying = st in (SessionState.SESSION_SENT, SessionState.KEYED_FIRST)
        if st is SessionState.KEYED or (self._flowing and rekeying):
            return Status(Health.HEALTHY, "running ok", st)
        reason = _WAITING.get(st, st.value)
        if st is SessionState.INIT:
            reason = f"{reason} (reset: {self._reset_reason})"
        return Status(Health.STARTING, reason, st)

    def _update_status(self) -> None:
        new = self._compute_status()
        if new != self._status:
            old, self._status = self._status, new
            self._events.append(StateChanged(old, new))
