"""
PROXY headers for tests: the bytes haproxy sends, and a v2 builder that
follows the spec field by field.
"""

import ipaddress
import itertools
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

LOCAL = 0x20
PROXY = 0x21
TCP4 = 0x11
TCP6 = 0x21
UNIX = 0x31
UNSPEC = 0x00


def v2(
    command: int,
    family: int,
    block: bytes = b"",
    tlvs: bytes = b"",
    *,
    length: int | None = None,
) -> bytes:
    """
    A v2 header: signature, version/command, family/transport, big-endian
    length (of address block and TLVs unless given), then both.
    """
    payload = block + tlvs
    size = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + payload


def inet_block(source: str, destination: str, sport: int, dport: int) -> bytes:
    """
    The INET or INET6 address block: both addresses, then both ports.
    """
    return (
        ipaddress.ip_address(source).packed
        + ipaddress.ip_address(destination).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    """
    One TLV: type byte, big-endian length, value.
    """
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def unix_block(source: bytes, destination: bytes) -> bytes:
    """
    The UNIX address block: two NUL-padded 108-byte paths.
    """
    return source.ljust(108, b"\x00") + destination.ljust(108, b"\x00")


# Captured from haproxy 2.6 on loopback, clients 127.0.0.2 and ::1:
# v1 (send-proxy) to a frontend on port 43705: 127.0.0.2:48067, [::1]:57815;
# v2 (send-proxy-v2) to port 56785: 127.0.0.2:52943, [::1]:40419.
HAPROXY_V1_TCP4 = b"PROXY TCP4 127.0.0.2 127.0.0.1 48067 43705\r\n"
HAPROXY_V1_TCP6 = b"PROXY TCP6 ::1 ::1 57815 43705\r\n"
HAPROXY_V2_TCP4 = (
    V2_SIGNATURE + b"!\x11\x00\x0c\x7f\x00\x00\x02\x7f\x00\x00\x01\xce\xcf\xdd\xd1"
)
HAPROXY_V2_TCP6 = (
    V2_SIGNATURE
    + b"!!\x00$"
    + b"\x00" * 15
    + b"\x01"
    + b"\x00" * 15
    + b"\x01\x9d\xe3\xdd\xd1"
)
# proxy-v2-options crc32c,unique-id, client 127.0.0.3:51123 to port 38525: a
# CRC32C TLV (0x03) and a UNIQUE_ID (0x05).
HAPROXY_V2_TLVS = (
    V2_SIGNATURE
    + b"!\x11\x00\x1c\x7f\x00\x00\x03\x7f\x00\x00\x01\xc7\xb3\x96}"
    + b"\x03\x00\x04\x80#\xa4\xff\x05\x00\x06abc123"
)
# A check-send-proxy health check: LOCAL, UNSPEC, with the CRC32C TLV.
HAPROXY_V2_LOCAL_CHECK = V2_SIGNATURE + b" \x00\x00\x07\x03\x00\x04\xa9\xb8~\x8f"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    ``data`` cut at each of ``cuts`` (taken modulo its length + 1).
    """
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
