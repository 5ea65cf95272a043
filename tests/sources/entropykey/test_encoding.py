"""
PEM64, 12-bit sub-codes and CRC-8 (spec section 4 and 17).
"""

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sources.entropykey.encoding import (
    crc8,
    decode_subcode,
    encode_subcode,
    pem_decode,
    pem_decode_exact,
    pem_encode,
    serial_from_text,
    serial_to_text,
)


@pytest.mark.parametrize(
    "data",
    [b"123", b"\x01\x02\x03", b"\x01\x02", b"1234", b"12345", b"123456"],
)
def test_pem_self_test_round_trips(data: bytes) -> None:
    """
    The upstream PEM self-test inputs survive encode then decode.
    """
    assert data == pem_decode(pem_encode(data))


@given(st.binary(max_size=100))
def test_pem_round_trip_and_standard_base64(data: bytes) -> None:
    """
    Encoding is standard base64 and the lenient decoder inverts it.
    """
    text = pem_encode(data)
    assert base64.b64encode(data) == text
    assert data == pem_decode(text)


@pytest.mark.parametrize(
    ("size", "chars", "pads"), [(12, 16, 0), (32, 44, 1), (33, 44, 0), (6, 8, 0)]
)
def test_pem_sizes(size: int, chars: int, pads: int) -> None:
    """
    Serial, key, master-key card and MAC sizes encode to the spec lengths.
    """
    text = pem_encode(bytes(size))
    assert (chars, pads) == (len(text), text.count(b"="))


def test_serial_example_decodes() -> None:
    """
    The doc serial NwBvBlg3OTBJORFD is 37 00 6F 06 58 37 39 30 49 39 11 43.
    """
    expected = bytes.fromhex("37006F065837393049391143")
    assert expected == pem_decode(b"NwBvBlg3OTBJORFD")


def test_decoder_stops_at_space_padding() -> None:
    """
    A 32-byte payload padded with spaces decodes to exactly 32 bytes.
    """
    text = pem_encode(bytes(range(32))) + b"    "
    assert bytes(range(32)) == pem_decode(text)


def test_decoder_stops_at_first_bad_group_and_ignores_partial_groups() -> None:
    """
    Decoding returns the bytes of the complete, valid groups before a bad one.
    """
    assert pem_decode(b"YWJj" + b"ZG\x00l" + b"ZGVm") == b"abc"
    assert pem_decode(b"YWJjZGV") == b"abc"


def test_decoder_equals_rules() -> None:
    """
    '=' counts as 0; in position 3 it drops byte 2, in position 4 byte 3.
    """
    assert pem_decode(b"YQ==") == b"a"
    assert pem_decode(b"YWI=") == b"ab"
    assert pem_decode(b"A=AA") == b"\x00\x00\x00"
    assert pem_decode(b"YQ==YWJj") == b"a" + b"abc"


def test_decode_exact_rejects_wrong_length_or_non_canonical() -> None:
    """
    The strict decoder wants canonical text of exactly the expected length.
    """
    assert pem_decode_exact(b"YWJj", 3) == b"abc"
    with pytest.raises(ValueError, match="expected 4 bytes"):
        pem_decode_exact(b"YWJj", 4)
    with pytest.raises(ValueError, match="expected"):
        pem_decode_exact(b"YWJj ", 3)


@pytest.mark.parametrize(
    ("value", "chars"),
    [(0, b"AA"), (1, b"BA"), (12, b"MA"), (64, b"AB"), (1556, b"UY"), (4095, b"//")],
)
def test_subcode_table(value: int, chars: bytes) -> None:
    """
    Sub-codes are two base64 digits, least significant first (spec 4.2).
    """
    assert chars == encode_subcode(value)
    assert value == decode_subcode(chars)


def test_subcode_out_of_range_and_undecodable() -> None:
    """
    Encoding rejects values past 4095; bad characters decode to 0.
    """
    with pytest.raises(ValueError, match="outside"):
        encode_subcode(4096)
    with pytest.raises(ValueError, match="outside"):
        encode_subcode(-1)
    assert decode_subcode(b"A ") == 0
    assert decode_subcode(b"=B") == 0
    assert decode_subcode(b"A") == 0


@given(st.integers(0, 4095))
def test_subcode_round_trip(value: int) -> None:
    """
    Every 12-bit value survives encode then decode.
    """
    assert value == decode_subcode(encode_subcode(value))


@pytest.mark.parametrize(
    ("data", "crc"),
    [(b"123456789", 0xF7), (bytes(32), 0xAF), (bytes(range(32)), 0x50)],
)
def test_crc8_vectors(data: bytes, crc: int) -> None:
    """
    CRC-8/NRSC-5 (poly 0x31, init 0xFF) gives the spec's check values.
    """
    assert crc == crc8(data)


def test_serials_convert_between_text_and_bytes() -> None:
    """
    A 12-byte serial is 16 PEM64 characters; the conversion round-trips.
    """
    serial = bytes.fromhex("37006F065837393049391143")
    assert "NwBvBlg3OTBJORFD" == serial_to_text(serial)
    assert serial == serial_from_text("NwBvBlg3OTBJORFD")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "NwBvBlg3OTBJORF",
        "NwBvBlg3OTBJORFDAAAA",
        "NwBvBlg3OTBJORF ",
        "NwBvBlg3OTBJORFé",
    ],
)
def test_malformed_serial_text_is_refused(text: str) -> None:
    """
    Anything but 16 canonical PEM64 characters is a ValueError, non-ASCII too.
    """
    with pytest.raises(ValueError, match="PEM64"):
        serial_from_text(text)
