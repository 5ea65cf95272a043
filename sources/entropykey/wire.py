"""
Entropy Key wire format, sans-I/O (spec sections 5, 6 and 10).

Device to host: fixed 64-byte frames ``* T C <50-byte payload> <8-char MAC> CR LF``.
`FrameSynchroniser` cuts them out of a byte stream and resynchronises on garbage,
`parse_packet` classifies and decodes one, `verify_mac` checks it against a
`SessionCrypto`, and `parse_info` reads the ``I>`` status records. The
``build_*_frame`` functions produce frames (the device model uses them).

Host to device: a plain byte stream of short commands, see the ``encode_*``
functions and `RESET`.
"""

import enum
import hmac
from dataclasses import dataclass
from typing import Final

from .encoding import decode_subcode, pem_decode, pem_encode
from .skein import SessionCrypto

FRAME_LEN: Final = 64
PAYLOAD_LEN: Final = 50
MAX_BINARY_PAYLOAD: Final = 36
RESET: Final = b"\x03"

_SOF: Final = b"* "
_EOF: Final = b"\r\n"


class FrameError(ValueError):
    """
    A synchronised frame has an unknown type or payload class.
    """


class InfoError(ValueError):
    """
    An ``I>`` payload does not follow the record grammar.
    """


class FrameType(enum.StrEnum):
    """
    The frame type character at offset 2 (spec table 6.1).
    """

    SERIAL = "S"
    KEY_REQUEST = "k"
    INFO = "I"
    KEY = "K"
    ENTROPY = "E"
    LT_UNLOCKED = "M"
    LT_REKEY = "L"
    LT_REFUSED = "l"
    WARNING = "W"
    GONE_BAD = "B"


class FrameSynchroniser:
    """
    Cut 64-byte frames out of a device byte stream, as ekeyd's frame.c does.

    A frame starts with ``* `` and has CR LF at offsets 62-63. Bytes before a
    ``*`` are dropped; a ``*`` that does not start a well-formed frame counts as
    a framing error and the search restarts after it. Whatever the split of the
    input, the same frames come out. At most 63 bytes are ever buffered.
    """

    __slots__ = ("_buf", "bytes_discarded", "frames_ok", "framing_errors")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.frames_ok = 0
        self.framing_errors = 0
        self.bytes_discarded = 0

    def feed(self, data: bytes) -> list[bytes]:
        """
        Add bytes from the device and return the complete frames now available.
        """
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        while True:
            start = buf.find(b"*")
            if start < 0:
                self.bytes_discarded += len(buf)
                buf.clear()
                break
            if start:
                self.bytes_discarded += start
                del buf[:start]
            if len(buf) < FRAME_LEN:
                break
            if buf[1] == 0x20 and buf[62:64] == _EOF:
                frames.append(bytes(buf[:FRAME_LEN]))
                del buf[:FRAME_LEN]
                self.frames_ok += 1
            else:
                self.framing_errors += 1
                self.bytes_discarded += 1
                del buf[:1]
        return frames


@dataclass(frozen=True, slots=True)
class Packet:
    """
    One decoded frame.

    Attributes:
        type: the frame type.
        binary: True for ``!`` frames, False for ``>`` text frames.
        text: the text payload without trailing spaces ("" for binary frames).
        subcode_chars: the two raw sub-code characters (b"" for text frames).
        data: the PEM-decoded binary payload (b"" for text frames).
        body: frame bytes 2..53, the part covered by the MAC.
        mac: the 8 MAC characters at offsets 54..61.
    """

    type: FrameType
    binary: bool
    text: str
    subcode_chars: bytes
    data: bytes
    body: bytes
    mac: bytes

    @property
    def subcode(self) -> int:
        """
        The decoded 12-bit sub-code (0 for text frames or undecodable characters).
        """
        return decode_subcode(self.subcode_chars)


def parse_packet(frame: bytes) -> Packet:
    """
    Classify and decode one 64-byte frame from `FrameSynchroniser` (no MAC check).

    Raises:
        FrameError: the type character or payload class is unknown.
    """
    try:
        ftype = FrameType(chr(frame[2]))
    except ValueError:
        raise FrameError(f"unknown frame type {frame[2:3]!r}") from None
    body, mac = frame[2:54], frame[54:62]
    cls = frame[3:4]
    if cls == b"!":
        return Packet(ftype, True, "", frame[4:6], pem_decode(frame[6:54]), body, mac)
    if cls == b">":
        text = frame[4:54].rstrip(b" ").decode("ascii", "replace")
        return Packet(ftype, False, text, b"", b"", body, mac)
    raise FrameError(f"unknown payload class {cls!r} in {ftype.value} frame")


def verify_mac(packet: Packet, crypto: SessionCrypto) -> bool:
    """
    Return True if the packet's MAC verifies under ``crypto``'s session key.
    """
    expected = pem_encode(crypto.mac(packet.body))
    return hmac.compare_digest(expected, packet.mac)


def _seal(body: bytes, crypto: SessionCrypto) -> bytes:
    return _SOF + body + pem_encode(crypto.mac(body)) + _EOF


def build_text_frame(ftype: FrameType, text: str, crypto: SessionCrypto) -> bytes:
    """
    Return a complete ``>`` frame carrying ``text``, MAC'd under ``crypto``.

    Raises:
        ValueError: the text is longer than 50 characters or not printable ASCII.
    """
    raw = text.encode("ascii")
    if len(raw) > PAYLOAD_LEN or not text.isprintable():
        raise ValueError(f"text payload must be <= 50 printable characters: {text!r}")
    return _seal(ftype.value.encode() + b">" + raw.ljust(PAYLOAD_LEN), crypto)


def build_binary_frame(
    ftype: FrameType, subcode_chars: bytes, data: bytes, crypto: SessionCrypto
) -> bytes:
    """
    Return a complete ``!`` frame with raw sub-code characters and ``data``.

    Raises:
        ValueError: the sub-code is not 2 characters or ``data`` exceeds 36 bytes.
    """
    if len(subcode_chars) != 2 or len(data) > MAX_BINARY_PAYLOAD:
        raise ValueError("binary frames take a 2-character sub-code and <= 36 bytes")
    payload = subcode_chars + pem_encode(data).ljust(PAYLOAD_LEN - 2)
    return _seal(ftype.value.encode() + b"!" + payload, crypto)


class FailureMode(enum.StrEnum):
    """
    The failure-mode character ending an ``I>S`` record (spec 6.3).
    """

    OK = "0"
    RAW_LEFT_BAD = "1"
    RAW_RIGHT_BAD = "2"
    RAW_XOR_BAD = "3"
    DEBIAS_LEFT_BAD = "4"
    DEBIAS_RIGHT_BAD = "5"
    TEMP_TOO_LOW = "7"
    TEMP_TOO_HIGH = "8"
    FIPS_THRESHOLD_EXCEEDED = "9"
    VOLT_TOO_LOW = "A"
    VOLT_TOO_HIGH = "B"
    UNDEFINED = "?"
    """Any other character: still a failure, of a kind the spec does not name."""

    @property
    def description(self) -> str:
        """
        A short human explanation of the failure mode.
        """
        return _FAILURE_TEXT[self]


_FAILURE_TEXT: Final = {
    FailureMode.OK: "no failure",
    FailureMode.RAW_LEFT_BAD: "left generator no longer random",
    FailureMode.RAW_RIGHT_BAD: "right generator no longer random",
    FailureMode.RAW_XOR_BAD: "generators have become correlated",
    FailureMode.DEBIAS_LEFT_BAD: "left generator strongly biased",
    FailureMode.DEBIAS_RIGHT_BAD: "right generator strongly biased",
    FailureMode.TEMP_TOO_LOW: "temperature below threshold",
    FailureMode.TEMP_TOO_HIGH: "temperature above threshold",
    FailureMode.FIPS_THRESHOLD_EXCEEDED: "too many failed FIPS 140-2 blocks",
    FailureMode.VOLT_TOO_LOW: "voltage too low",
    FailureMode.VOLT_TOO_HIGH: "voltage too high",
    FailureMode.UNDEFINED: "undefined failure code",
}


@dataclass(frozen=True, slots=True)
class FipsCounters:
    """
    The ``F`` record: FIPS 140-2 block counters since the last counter reset.
    """

    blocks_tested: int
    blocks_failed: int
    monobit_failures: int
    poker_failures: int
    runs_failures: int


@dataclass(frozen=True, slots=True)
class GeneratorStats:
    """
    The ``S`` record: raw generator statistics for the current 80 kbit window.

    ``failure_code`` is the raw character; use `failure_mode` to interpret it.
    """

    raw_bytes: int
    raw_left_shannons: int
    raw_right_shannons: int
    raw_xor_shannons: int
    debiased_left_bytes: int
    debiased_left_shannons: int
    debiased_right_bytes: int
    debiased_right_shannons: int
    failure_code: str

    @property
    def failure_mode(self) -> FailureMode:
        """
        The failure mode; any character outside the table is `FailureMode.UNDEFINED`.
        """
        try:
            return FailureMode(self.failure_code)
        except ValueError:
            return FailureMode.UNDEFINED


@dataclass(frozen=True, slots=True)
class Info:
    """
    What one ``I>`` frame reported; fields it did not carry are None.

    Attributes:
        temperature_dk: core temperature in tenths of a kelvin.
        voltage_mv: supply voltage in millivolts.
        fips: the FIPS 140-2 counters.
        generator: the raw generator statistics and failure mode.
    """

    temperature_dk: int | None = None
    voltage_mv: int | None = None
    fips: FipsCounters | None = None
    generator: GeneratorStats | None = None

    @property
    def temperature_c(self) -> float | None:
        """
        Core temperature in degrees Celsius.
        """
        if self.temperature_dk is None:
            return None
        return self.temperature_dk / 10 - 273.15


def _numbers(record: str, fields: list[str], count: int) -> list[int]:
    if len(fields) != count or not all(f.isdigit() for f in fields):
        raise InfoError(f"malformed {record[:1]!r} record {record!r}")
    return [int(f) for f in fields]


def parse_info(text: str) -> Info:
    """
    Parse the records of an ``I>`` payload.

    Records are separated by single spaces; unknown record letters are skipped,
    and parsing stops after an ``F`` or ``S`` record (as in ekeyd).

    Raises:
        InfoError: a ``T``, ``V``, ``F`` or ``S`` record is malformed.
    """
    temperature = voltage = None
    fips = generator = None
    for record in text.split():
        letter, fields = record[0], record[1:].split(":")
        if letter == "T":
            (temperature,) = _numbers(record, fields, 1)
        elif letter == "V":
            (voltage,) = _numbers(record, fields, 1)
        elif letter == "F":
            fips = FipsCounters(*_numbers(record, fields, 5))
            break
        elif letter == "S":
            if len(fields) != 9 or len(fields[8]) != 1:
                raise InfoError(f"malformed 'S' record {record!r}")
            n = _numbers(record, fields[:8], 8)
            generator = GeneratorStats(
                n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7], fields[8]
            )
            break
    return Info(temperature, voltage, fips, generator)


def format_info(info: Info) -> str:
    """
    Return the ``I>`` payload text for ``info`` in the key's 5-digit style.
    """
    records = []
    if info.temperature_dk is not None:
        records.append(f"T{info.temperature_dk:05d}")
    if info.voltage_mv is not None:
        records.append(f"V{info.voltage_mv:05d}")
    if info.fips is not None:
        f = info.fips
        counters = (
            f.blocks_tested,
            f.blocks_failed,
            f.monobit_failures,
            f.poker_failures,
            f.runs_failures,
        )
        records.append("F" + ":".join(f"{n:05d}" for n in counters))
    if info.generator is not None:
        g = info.generator
        numbers = (
            g.raw_bytes,
            g.raw_left_shannons,
            g.raw_right_shannons,
            g.raw_xor_shannons,
            g.debiased_left_bytes,
            g.debiased_left_shannons,
            g.debiased_right_bytes,
            g.debiased_right_shannons,
        )
        digits = ":".join(f"{n:05d}" for n in numbers)
        records.append(f"S{digits}:{g.failure_code}")
    return " ".join(records)


def encode_session_rekey(nonce: bytes) -> bytes:
    """
    Return the host's session keying command ``K<PEM nonce>.``.
    """
    return b"K" + pem_encode(nonce) + b"."


def encode_lt_mac(nonce_mac: bytes) -> bytes:
    """
    Return ``M<8 PEM chars>``, announcing the 6-byte long-term nonce MAC.
    """
    if len(nonce_mac) != 6:
        raise ValueError("the long-term nonce MAC is 6 bytes")
    return b"M" + pem_encode(nonce_mac)


def encode_lt_rekey(nonce: bytes) -> bytes:
    """
    Return the long-term re-key command ``L<PEM nonce>.``.
    """
    return b"L" + pem_encode(nonce) + b"."
