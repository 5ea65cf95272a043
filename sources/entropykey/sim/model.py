"""
A sans-I/O model of the Entropy Key itself, for simulators and tests.

`DeviceModel` takes host command bytes (`receive_data`) and the time
(`advance`), and produces exactly the frames a key would send
(`data_to_send`): ``S!`` on reset, ``K!`` for session keying, ``E!`` entropy in
bursts of 78 per FIPS block, periodic ``I>`` status, ``k>`` when it has no
usable session, ``W>`` for unknown input and the long-term re-key exchange
(``M>``, ``L!``, ``l>``). Time is always an argument; randomness comes from an
injectable ``random_bytes``.

Fault injection, for exercising the host: `fail_generator` (latched, survives
reset, cleared by `power_cycle`), ``plaintext_fault`` (stuck or biased output,
still correctly encrypted), ``corrupt_macs``, ``garbage`` written after every
frame, and ``mute`` (never answers).

Assumptions where the spec says [UNKNOWN]: an ``S!`` frame is sent at power-on;
sequence numbers restart at 0 after every ``K!``; a FIPS block arrives every
``block_interval`` seconds and status every ``info_interval``; a failed key
keeps sending ``I>`` but neither ``E!`` nor ``k>``; a non-PEM byte inside a
command abandons it with ``W>``; an ``L`` command consumes the preceding ``M``
whatever its outcome, and without one it is "locked-out".
"""

import enum
import os
from collections.abc import Callable
from typing import Final

from ..encoding import ALPHABET, encode_subcode, pem_decode, pem_encode
from ..skein import (
    SessionCrypto,
    derive_long_term_key,
    derive_session_key,
    lt_nonce_mac,
)
from ..wire import (
    FailureMode,
    FipsCounters,
    FrameType,
    GeneratorStats,
    Info,
    build_binary_frame,
    build_text_frame,
    format_info,
)

BLOCKS_PER_FIPS: Final = 78
SEQUENCE_LIMIT: Final = 4096
MAX_NONCE: Final = 4095

TEXT_KEYREQ: Final = "Unable to send entropy. Please re-key session."
TEXT_LT_UNLOCKED: Final = "Long-term rekey unlocked"
TEXT_LT_LOCKED: Final = "Long-term rekey locked-out"
TEXT_LT_BAD_MAC: Final = "Nonce MAC does not match"
TEXT_GONE_BAD: Final = "Generators have gone bad, rekeying abandoned."

_PEM_CHARS: Final = frozenset(ALPHABET + b"=")


class PlaintextFault(enum.Enum):
    """
    What the generators feed into the (correctly encrypted) ``E!`` frames.
    """

    NONE = "none"
    STUCK = "stuck"
    """Every block is the same 32 bytes."""
    BIASED = "biased"
    """Each bit is 1 with probability 1/4."""


class DeviceModel:
    """
    One simulated key.

    Args:
        serial: the 12-byte binary serial number.
        long_term_key: the 32-byte LTK in the key's flash.
        master_key: the 32-byte MK, needed only for long-term re-keying.
        random_bytes: the key's noise source (``os.urandom``).
        now: power-on time.
        block_interval: seconds per FIPS block (78 ``E!`` frames or one ``k>``).
        info_interval: seconds between ``I>`` status bursts.
    """

    def __init__(
        self,
        serial: bytes,
        long_term_key: bytes,
        *,
        master_key: bytes | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        now: float = 0.0,
        block_interval: float = 0.75,
        info_interval: float = 10.0,
    ) -> None:
        if len(serial) != 12 or len(long_term_key) != 32:
            raise ValueError("serial must be 12 bytes and the long-term key 32")
        self.serial = serial
        self.long_term_key = long_term_key
        self.master_key = master_key
        self.random_bytes = random_bytes
        self.block_interval = block_interval
        self.info_interval = info_interval
        self.temperature_dk = 3150
        self.voltage_mv = 3254
        self.plaintext_fault = PlaintextFault.NONE
        self.corrupt_macs = False
        self.garbage = b""
        self.mute = False
        self._zero = SessionCrypto(serial)
        self._crypto = self._zero
        self._out = bytearray()
        self._cmd: int | None = None
        self._arg = bytearray()
        self._lt_mac: bytes | None = None
        self._keyed = False
        self._seq = 0
        self._failure = FailureMode.OK
        self._fips_tested = 0
        self._next_block = self._next_info = now
        self.power_cycle(now)

    # -- state visible to tests ---------------------------------------------

    @property
    def session_key(self) -> bytes:
        """
        The current session key (32 zero bytes when unkeyed).
        """
        return self._crypto.key

    @property
    def keyed(self) -> bool:
        """
        Whether a session key has been negotiated since the last reset.
        """
        return self._keyed

    @property
    def next_sequence(self) -> int:
        """
        The sequence number the next ``E!`` frame will carry.
        """
        return self._seq

    @property
    def failure_mode(self) -> FailureMode:
        """
        The latched failure mode (`FailureMode.OK` when healthy).
        """
        return self._failure

    # -- control ------------------------------------------------------------

    def power_cycle(self, now: float) -> None:
        """
        Power the key on afresh: clears a latched failure, then resets.
        """
        self._failure = FailureMode.OK
        self._fips_tested = 0
        self._next_block = now + self.block_interval
        self._next_info = now + self.info_interval
        self._reset()

    def fail_generator(self, mode: FailureMode) -> None:
        """
        Latch a generator failure: no more entropy until `power_cycle`.
        """
        if mode is FailureMode.OK:
            raise ValueError("use power_cycle() to clear a failure")
        self._failure = mode

    def data_to_send(self) -> bytes:
        """
        Return, and forget, the bytes the key has written to the host.
        """
        out = bytes(self._out)
        self._out.clear()
        return out

    def advance(
        self, now: float, *, send_blocks: bool = True, send_status: bool = True
    ) -> None:
        """
        Run the key up to time ``now``: FIPS blocks and status frames that are due.

        Args:
            now: the time to run to.
            send_blocks: False drops the FIPS blocks (and ``k>``) that fall due,
                as a key does whose host has stopped reading.
            send_status: likewise for ``I>`` status bursts.
        """
        while self._next_block <= now:
            self._next_block += self.block_interval
            if send_blocks and not self.mute:
                self._fips_block()
        while self._next_info <= now:
            self._next_info += self.info_interval
            if send_status and not self.mute:
                self.send_info()

    def produce_entropy_frames(self, count: int) -> int:
        """
        Emit up to ``count`` ``E!`` frames now, if the key is keyed and healthy.

        Returns:
            How many frames were emitted (fewer once sequence numbers run out).
        """
        if self.mute or not self._keyed or self._failure is not FailureMode.OK:
            return 0
        count = min(count, SEQUENCE_LIMIT - self._seq)
        for _ in range(count):
            chars = encode_subcode(self._seq)
            plain = self._plaintext()
            pad = self._crypto.pad(chars)
            cipher = bytes(a ^ b for a, b in zip(plain, pad, strict=True))
            self._emit(
                build_binary_frame(FrameType.ENTROPY, chars, cipher, self._crypto)
            )
            self._seq += 1
        return count

    def send_info(self) -> None:
        """
        Emit the three status frames: temperature/voltage, FIPS, generator.
        """
        infos = (
            Info(temperature_dk=self.temperature_dk, voltage_mv=self.voltage_mv),
            Info(fips=FipsCounters(self._fips_tested % 100000, 0, 0, 0, 0)),
            Info(
                generator=GeneratorStats(
                    8052, 23751, 23792, 23584, 7112, 20876, 8063, 24150,
                    self._failure.value,
                )
            ),
        )  # fmt: skip
        for info in infos:
            self._text(FrameType.INFO, format_info(info))

    def send_key_request(self) -> None:
        """
        Emit a ``k>`` frame now.
        """
        self._text(FrameType.KEY_REQUEST, TEXT_KEYREQ)

    # -- host input ---------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """
        Process command bytes from the host (one USB packet's worth).
        """
        if self.mute:
            return
        for byte in data:
            if byte == 0x03:
                self._reset()
                continue
            cmd = self._cmd
            if cmd is None:
                if not self._start_command(byte):
                    # The key throws the rest of the USB packet away.
                    return
            elif cmd in b"KL" and byte == ord("."):
                self._cmd = None
                self._finish_nonce(cmd, bytes(self._arg))
            elif byte not in _PEM_CHARS or len(self._arg) >= 4 * 1366:
                self._cmd = None
                self._warn(byte)
                return
            else:
                self._arg.append(byte)
                if cmd == ord("M") and len(self._arg) == 8:
                    self._cmd = None
                    self._lt_mac = pem_decode(bytes(self._arg))
                    self._text(FrameType.LT_UNLOCKED, TEXT_LT_UNLOCKED)

    def _start_command(self, byte: int) -> bool:
        upper = chr(byte).upper()
        if upper == "R":
            self._reset()
        elif upper in ("K", "M", "L"):
            self._cmd = ord(upper)
            self._arg = bytearray()
        else:
            self._warn(byte)
            return False
        return True

    def _warn(self, byte: int) -> None:
        self._text(FrameType.WARNING, f"Unknown Input Character 0x{byte:02x}")

    def _finish_nonce(self, cmd: int, text: bytes) -> None:
        nonce = pem_decode(text)
        if len(nonce) > MAX_NONCE:
            self._warn(ord("."))
            return
        if cmd == ord("K"):
            self._session_rekey(nonce)
        else:
            self._lt_rekey(nonce)

    def _session_rekey(self, nonce: bytes) -> None:
        if self._failure is not FailureMode.OK:
            self._text(FrameType.GONE_BAD, TEXT_GONE_BAD)
            return
        entropy = self.random_bytes(32)
        chars = encode_subcode(len(nonce))
        # K! goes out under the old key; everything after it uses the new one.
        self._emit(build_binary_frame(FrameType.KEY, chars, entropy, self._crypto))
        key = derive_session_key(self.serial, self.long_term_key, entropy, nonce)
        self._crypto = SessionCrypto(self.serial, key)
        self._keyed = True
        self._seq = 0

    def _lt_rekey(self, nonce: bytes) -> None:
        expected, self._lt_mac = self._lt_mac, None
        if expected is None or self.master_key is None:
            self._text(FrameType.LT_REFUSED, TEXT_LT_LOCKED)
            return
        if lt_nonce_mac(self.serial, self.master_key, nonce) != expected:
            self._text(FrameType.LT_REFUSED, TEXT_LT_BAD_MAC)
            return
        if self._failure is not FailureMode.OK:
            self._text(FrameType.GONE_BAD, TEXT_GONE_BAD)
            return
        entropy = self.random_bytes(32)
        chars = encode_subcode(len(nonce))
        self._emit(build_binary_frame(FrameType.LT_REKEY, chars, entropy, self._crypto))
        self.long_term_key = derive_long_term_key(
            self.serial, self.master_key, entropy, nonce
        )

    # -- internals ----------------------------------------------------------

    def _reset(self) -> None:
        self._cmd = None
        self._arg = bytearray()
        self._lt_mac = None
        self._crypto = self._zero
        self._keyed = False
        self._seq = 0
        if not self.mute:
            self._emit(
                build_binary_frame(FrameType.SERIAL, b"AA", self.serial, self._crypto)
            )

    def _fips_block(self) -> None:
        if self._failure is not FailureMode.OK:
            return
        self._fips_tested += 1
        if self.produce_entropy_frames(BLOCKS_PER_FIPS) == 0:
            self.send_key_request()

    def _plaintext(self) -> bytes:
        if self.plaintext_fault is PlaintextFault.STUCK:
            return b"\x5a" * 32
        raw = self.random_bytes(32)
        if self.plaintext_fault is PlaintextFault.BIASED:
            other = self.random_bytes(32)
            return bytes(a & b for a, b in zip(raw, other, strict=True))
        return raw

    def _text(self, ftype: FrameType, text: str) -> None:
        self._emit(build_text_frame(ftype, text, self._crypto))

    def _emit(self, frame: bytes) -> None:
        if self.corrupt_macs:
            mac = frame[54:62]
            flipped = pem_encode(bytes(b ^ 0x55 for b in pem_decode(mac)))
            frame = frame[:54] + flipped + frame[62:]
        self._out += frame
        self._out += self.garbage
