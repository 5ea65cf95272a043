"""
Text encodings used by the Entropy Key protocol (spec section 4).

* PEM64: standard base64 on encode; on decode the lenient rules of ekeyd, which
  stop silently at the first group holding a character outside the alphabet.
* 12-bit sub-codes: two base64 digits, least significant digit first.
* CRC-8 (poly 0x31, init 0xFF): only checks the master key typed from its card.
* Serial numbers: 12 bytes on the wire, 16 PEM64 characters everywhere a person
  or a file sees them (USB iSerialNumber, keyrings, config, logs).
"""

import binascii
from typing import Final

ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# Value of each byte in the alphabet, -1 for bytes outside it. '=' is handled
# separately because it is only a digit for the decoder, never for sub-codes.
_VALUE: Final = tuple(ALPHABET.find(bytes([b])) for b in range(256))
_PAD: Final = ord("=")

SUBCODE_MAX: Final = 4095
SERIAL_BYTES: Final = 12


def pem_encode(data: bytes) -> bytes:
    """
    Return the PEM64 text for ``data`` (``4 * ceil(n / 3)`` characters, ``=`` padded).
    """
    return binascii.b2a_base64(data, newline=False)


def pem_decode(text: bytes) -> bytes:
    """
    Decode PEM64 text the way the ekeyd host does.

    Only complete 4-character groups are processed, and decoding stops silently at
    the first group that contains a byte outside the alphabet (space, CR, NUL...).
    ``=`` counts as the digit 0; in the third position it drops the group's second
    output byte and in the fourth position its third output byte.

    Args:
        text: the characters to decode; anything after a bad group is ignored.

    Returns:
        The bytes decoded before the first bad or incomplete group.
    """
    out = bytearray()
    for off in range(0, len(text) - 3, 4):
        group = text[off : off + 4]
        value = 0
        for ch in group:
            digit = 0 if ch == _PAD else _VALUE[ch]
            if digit < 0:
                return bytes(out)
            value = (value << 6) | digit
        out.append(value >> 16)
        if group[2] != _PAD:
            out.append((value >> 8) & 0xFF)
        if group[3] != _PAD:
            out.append(value & 0xFF)
    return bytes(out)


def pem_decode_exact(text: bytes, length: int) -> bytes:
    """
    Decode PEM64 text that must be canonical and hold exactly ``length`` bytes.

    Raises:
        ValueError: the text does not encode exactly ``length`` bytes canonically.
    """
    data = pem_decode(text)
    if len(data) != length or pem_encode(data) != text:
        raise ValueError(f"expected {length} bytes of PEM64, got {text!r}")
    return data


def serial_to_text(serial: bytes) -> str:
    """
    Return the 16-character text of a 12-byte binary serial number.
    """
    return pem_encode(serial).decode("ascii")


def serial_from_text(text: str) -> bytes:
    """
    Return the 12-byte binary serial number written as ``text``.

    Raises:
        ValueError: ``text`` is not 16 canonical PEM64 characters.
    """
    return pem_decode_exact(text.encode("ascii", "replace"), SERIAL_BYTES)


def encode_subcode(value: int) -> bytes:
    """
    Return the two characters for a 12-bit sub-code (bits 0-5 first).

    Raises:
        ValueError: ``value`` is outside 0..4095.
    """
    if not 0 <= value <= SUBCODE_MAX:
        raise ValueError(f"sub-code {value} is outside 0..{SUBCODE_MAX}")
    return bytes((ALPHABET[value & 63], ALPHABET[value >> 6]))


def decode_subcode(chars: bytes) -> int:
    """
    Return the value of two sub-code characters, or 0 if either is not a digit.
    """
    if len(chars) != 2:
        return 0
    low, high = _VALUE[chars[0]], _VALUE[chars[1]]
    if low < 0 or high < 0:
        return 0
    return low + 64 * high


def _crc8_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_CRC8: Final = _crc8_table()


def crc8(data: bytes) -> int:
    """
    Return the CRC-8 (poly 0x31, init 0xFF, no reflection, no final XOR) of ``data``.
    """
    crc = 0xFF
    for byte in data:
        crc = _CRC8[crc ^ byte]
    return crc
