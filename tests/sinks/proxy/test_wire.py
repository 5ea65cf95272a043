"""
The PROXY header parser: every form haproxy sends, any split of the input,
streams without a header, and every way a header can be wrong.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.proxy.wire import (
    NEED_DATA,
    V1_MAX_LINE,
    V2_MAX_PAYLOAD,
    Address,
    Event,
    Header,
    HeaderStarted,
    LocalProtocolError,
    NoHeader,
    ParserState,
    ProxyHeaderParser,
    RemoteProtocolError,
)
from tests.sinks.proxy.headers import (
    HAPROXY_V1_TCP4,
    HAPROXY_V1_TCP6,
    HAPROXY_V2_LOCAL_CHECK,
    HAPROXY_V2_TCP4,
    HAPROXY_V2_TCP6,
    HAPROXY_V2_TLVS,
    LOCAL,
    PROXY,
    TCP4,
    TCP6,
    UNIX,
    UNSPEC,
    V2_SIGNATURE,
    inet_block,
    split,
    tlv,
    unix_block,
    v2,
)

FFFF6 = ":".join(["ffff"] * 8)
LONGEST_V1 = f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode()
_TCP4_BLOCK = inet_block("192.0.2.7", "198.51.100.1", 40000, 8888)
_TCP6_BLOCK = inet_block("2001:db8::7", "2001:db8::1", 65535, 0)


def _proxy(
    version: int, source: tuple[str, int], destination: tuple[str, int], length: int
) -> Header:
    return Header(
        1 if version == 1 else 2,
        "proxy",
        Address(*source),
        Address(*destination),
        length,
    )


def _anonymous(version: int, command: str, length: int) -> Header:
    return Header(
        1 if version == 1 else 2,
        "local" if command == "local" else "proxy",
        None,
        None,
        length,
    )


HEADERS: list[tuple[str, bytes, Header]] = [
    (
        "haproxy v1 TCP4",
        HAPROXY_V1_TCP4,
        _proxy(1, ("127.0.0.2", 48067), ("127.0.0.1", 43705), len(HAPROXY_V1_TCP4)),
    ),
    (
        "haproxy v1 TCP6",
        HAPROXY_V1_TCP6,
        _proxy(1, ("::1", 57815), ("::1", 43705), len(HAPROXY_V1_TCP6)),
    ),
    (
        "v1 TCP6 with IPv4-mapped addresses",
        b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:198.51.100.1 1 0\r\n",
        _proxy(1, ("192.0.2.7", 1), ("198.51.100.1", 0), 53),
    ),
    (
        "v1 TCP6 in full, upper case",
        b"PROXY TCP6 2001:0DB8:0:0:0:0:0:7 2001:db8::1 65535 65535\r\n",
        _proxy(1, ("2001:db8::7", 65535), ("2001:db8::1", 65535), 58),
    ),
    ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n", _anonymous(1, "proxy", 15)),
    ("v1 UNKNOWN, the longest line", LONGEST_V1, _anonymous(1, "proxy", V1_MAX_LINE)),
    (
        "haproxy v2 TCP4",
        HAPROXY_V2_TCP4,
        _proxy(2, ("127.0.0.2", 52943), ("127.0.0.1", 56785), 28),
    ),
    (
        "haproxy v2 TCP6",
        HAPROXY_V2_TCP6,
        _proxy(2, ("::1", 40419), ("::1", 56785), 52),
    ),
    (
        "haproxy v2 TCP4 with CRC32C and UNIQUE_ID TLVs",
        HAPROXY_V2_TLVS,
        _proxy(2, ("127.0.0.3", 51123), ("127.0.0.1", 38525), 44),
    ),
    (
        "haproxy v2 LOCAL health check",
        HAPROXY_V2_LOCAL_CHECK,
        _anonymous(2, "local", 23),
    ),
    (
        "v2 TCP6 with ports 65535 and 0",
        v2(PROXY, TCP6, _TCP6_BLOCK),
        _proxy(2, ("2001:db8::7", 65535), ("2001:db8::1", 0), 52),
    ),
    (
        "v2 TCP6 with IPv4-mapped addresses",
        v2(PROXY, TCP6, inet_block("::ffff:192.0.2.7", "::1", 5, 6)),
        _proxy(2, ("192.0.2.7", 5), ("::1", 6), 52),
    ),
    (
        "v2 TCP4 with an empty TLV",
        v2(PROXY, TCP4, _TCP4_BLOCK, tlv(0x04, b"")),
        _proxy(2, ("192.0.2.7", 40000), ("198.51.100.1", 8888), 31),
    ),
    ("v2 LOCAL, bare", v2(LOCAL, UNSPEC), _anonymous(2, "local", 16)),
    (
        "v2 LOCAL ignores whatever block it carries",
        v2(LOCAL, 0xFF, b"\xff" * 5),
        _anonymous(2, "local", 21),
    ),
    (
        "v2 UNIX stream",
        v2(PROXY, UNIX, unix_block(b"/run/client", b"/run/egd.sock")),
        _anonymous(2, "proxy", 16 + 216),
    ),
    ("v2 PROXY over UNSPEC", v2(PROXY, UNSPEC), _anonymous(2, "proxy", 16)),
    (
        "v2 INET over DGRAM",
        v2(PROXY, 0x12, _TCP4_BLOCK),
        _anonymous(2, "proxy", 28),
    ),
    (
        "v2 INET6 over an unspecified transport",
        v2(PROXY, 0x20, _TCP6_BLOCK),
        _anonymous(2, "proxy", 52),
    ),
    (
        "v2 at the longest accepted",
        v2(PROXY, TCP4, _TCP4_BLOCK, tlv(0xEA, b"x" * (V2_MAX_PAYLOAD - 12 - 3))),
        _proxy(2, ("192.0.2.7", 40000), ("198.51.100.1", 8888), 16 + V2_MAX_PAYLOAD),
    ),
]
IDS = [name for name, _, _ in HEADERS]
SIGNATURE_LENGTH = {1: len(b"PROXY "), 2: len(V2_SIGNATURE)}


def feed(chunks: list[bytes]) -> tuple[list[Event], ProxyHeaderParser]:
    """
    Feed ``chunks`` in turn and collect every event until the parser is done.
    """
    parser = ProxyHeaderParser()
    events: list[Event] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while parser.state not in (ParserState.DONE, ParserState.ERROR):
            event = parser.next_event()
            if event is NEED_DATA:
                break
            assert not isinstance(event, type(NEED_DATA))
            events.append(event)
        if parser.state is ParserState.DONE:
            break
    return events, parser


@pytest.mark.parametrize(("raw", "header"), [h[1:] for h in HEADERS], ids=IDS)
def test_header_whole(raw: bytes, header: Header) -> None:
    """
    A header in one piece parses to its signature and its fields, and nothing
    is left over.
    """
    events, parser = feed([raw])
    assert [HeaderStarted(header.version), header] == events
    assert len(raw) == header.length
    assert b"" == parser.trailing_data


@pytest.mark.parametrize(("raw", "header"), [h[1:] for h in HEADERS], ids=IDS)
def test_header_byte_by_byte(raw: bytes, header: Header) -> None:
    """
    Fed one byte at a time, the signature is announced on its last byte and
    the header on the header's last byte, not before.
    """
    parser = ProxyHeaderParser()
    signature = SIGNATURE_LENGTH[header.version]
    for index, byte in enumerate(raw, start=1):
        parser.receive_data(bytes([byte]))
        if index == signature:
            assert HeaderStarted(header.version) == parser.next_event()
        if index == len(raw):
            assert header == parser.next_event()
        else:
            assert NEED_DATA is parser.next_event()
    assert ParserState.DONE is parser.state
    assert b"" == parser.trailing_data


@pytest.mark.parametrize(("raw", "header"), [h[1:] for h in HEADERS], ids=IDS)
def test_trailing_bytes_are_the_clients(raw: bytes, header: Header) -> None:
    """
    Bytes after the header (an EGD request, an HTTP request line, even what
    looks like another header) are left for the client's protocol.
    """
    for tail in (b"\x02\xff", b"GET /healthz HTTP/1.0\r\n\r\n", raw):
        events, parser = feed([raw + tail])
        assert header == events[-1]
        assert tail == parser.trailing_data


@given(
    index=st.integers(0, len(HEADERS) - 1),
    tail=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 1200), max_size=8),
)
def test_any_split_parses_the_same(index: int, tail: bytes, cuts: list[int]) -> None:
    """
    However a header and the client bytes after it are split into reads, the
    events are the same and the trailing bytes plus the unread ones are the
    client's bytes.
    """
    _, raw, header = HEADERS[index]
    data = raw + tail
    chunks = split(data, cuts)
    events, parser = feed(chunks)
    assert [HeaderStarted(header.version), header] == events
    fed = sum(len(chunk) for chunk in chunks[: _chunks_fed(chunks, len(raw))])
    assert tail == parser.trailing_data + data[fed:]


def _chunks_fed(chunks: list[bytes], header_length: int) -> int:
    total = 0
    for count, chunk in enumerate(chunks, start=1):
        total += len(chunk)
        if total >= header_length:
            return count
    return len(chunks)


NOT_HEADERS: list[tuple[bytes, int]] = [
    (b"\x00", 1),
    (b"\x02\xff", 1),
    (b"\x04", 1),
    (b"GET / HTTP/1.1\r\n", 1),
    (b"POST / HTTP/1.1\r\n", 2),
    (b"PUT / HTTP/1.1\r\n", 2),
    (b"PROXY\r\n", 6),
    (b"PROXz", 5),
    (b"\r\n\r\nX", 5),
    (b"\r\n\r\n\x00\r\nQUIT\r", 12),
    (b"\n", 1),
]


@pytest.mark.parametrize(("data", "decisive"), NOT_HEADERS)
def test_no_header_is_decided_at_the_first_byte_that_rules_one_out(
    data: bytes, decisive: int
) -> None:
    """
    A stream that is not a header is handed back whole, and the parser says so
    at the first byte that fits neither signature.
    """
    parser = ProxyHeaderParser()
    for byte in data[: decisive - 1]:
        parser.receive_data(bytes([byte]))
        assert NEED_DATA is parser.next_event()
    parser.receive_data(data[decisive - 1 :])
    assert NoHeader() == parser.next_event()
    assert data == parser.trailing_data


@pytest.mark.parametrize(
    "data", [b"", b"P", b"PROXY", b"\r\n\r\n\x00\r\nQUIT"], ids=repr
)
def test_end_of_file_before_a_signature_is_complete_is_no_header(
    data: bytes,
) -> None:
    """
    A connection that closes before a signature is complete carried no
    header: its bytes are the client's.
    """
    parser = ProxyHeaderParser()
    if data:
        parser.receive_data(data)
        assert NEED_DATA is parser.next_event()
    parser.receive_data(b"")
    assert NoHeader() == parser.next_event()
    assert data == parser.trailing_data


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY ",
        b"PROXY TCP4 127.0.0.2 127.0.0.1 1 2\r",
        V2_SIGNATURE,
        HAPROXY_V2_TCP4[:15],
        HAPROXY_V2_TCP4[:-1],
    ],
    ids=repr,
)
def test_end_of_file_inside_a_header(data: bytes) -> None:
    """
    End of file after a complete signature but before the header's end is an
    error of reason ``eof``.
    """
    parser = ProxyHeaderParser()
    parser.receive_data(data)
    assert isinstance(parser.next_event(), HeaderStarted)
    assert NEED_DATA is parser.next_event()
    parser.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="end of file") as caught:
        parser.next_event()
    assert "eof" == caught.value.reason


V1_MALFORMED: list[tuple[str, bytes]] = [
    ("LF without CR", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
    ("unknown family", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("UDP4 is not v1", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("UNKNOWN glued to more", b"PROXY UNKNOWNX\r\n"),
    ("lower-case family", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("empty line", b"PROXY \r\n"),
    ("four fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
    ("six fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
    ("two spaces", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
    ("trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
    ("tab for space", b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n"),
    ("not ASCII", "PROXY TCP4 1.2.3.4 5.6.7.8 1 ²\r\n".encode()),
    ("IPv4 with a leading zero", b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n"),
    ("IPv4 out of range", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"),
    ("IPv4 in three parts", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"),
    ("host name", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n"),
    ("IPv6 under TCP4", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n"),
    ("IPv4 under TCP6", b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n"),
    ("IPv6 zone", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
    ("port with a leading zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"),
    ("port past 65535", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n"),
    ("negative port", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
    ("port with a sign", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"),
    ("empty port", b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n"),
    ("non-ASCII digit port", "PROXY TCP4 1.2.3.4 5.6.7.8 1 ٢\r\n".encode()),
    ("CR inside", b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n"),
]

V2_MALFORMED: list[tuple[str, bytes]] = [
    ("version 1", V2_SIGNATURE + b"\x11\x11\x00\x0c" + _TCP4_BLOCK),
    ("version 3", V2_SIGNATURE + b"\x31\x11\x00\x0c" + _TCP4_BLOCK),
    ("command 2", v2(0x22, TCP4, _TCP4_BLOCK)),
    ("command 0xf", v2(0x2F, TCP4, _TCP4_BLOCK)),
    ("family 4", v2(PROXY, 0x41, _TCP4_BLOCK)),
    ("transport 3", v2(PROXY, 0x13, _TCP4_BLOCK)),
    ("INET block cut short", v2(PROXY, TCP4, _TCP4_BLOCK[:11])),
    ("INET6 block cut short", v2(PROXY, TCP6, _TCP6_BLOCK[:35])),
    ("INET6 length with an INET block", v2(PROXY, TCP6, _TCP4_BLOCK)),
    ("UNIX block cut short", v2(PROXY, UNIX, b"\x00" * 215)),
    ("TLV header cut short", v2(PROXY, TCP4, _TCP4_BLOCK, b"\x04\x00")),
    ("TLV value past the end", v2(PROXY, TCP4, _TCP4_BLOCK, b"\x04\x00\x02x")),
    (
        "second TLV past the end",
        v2(PROXY, TCP4, _TCP4_BLOCK, tlv(1, b"h2") + b"\x05\x01\x00"),
    ),
]


@pytest.mark.parametrize(
    "data",
    [raw for _, raw in V1_MALFORMED + V2_MALFORMED],
    ids=[name for name, _ in V1_MALFORMED + V2_MALFORMED],
)
def test_malformed_header(data: bytes) -> None:
    """
    Each way a header can break the spec is an error of reason ``malformed``,
    after which the parser refuses use; the message quotes none of the bytes.
    """
    parser = ProxyHeaderParser()
    parser.receive_data(data + b"\x02\x10")
    assert isinstance(parser.next_event(), HeaderStarted)
    with pytest.raises(RemoteProtocolError) as caught:
        parser.next_event()
    assert "malformed" == caught.value.reason
    assert not any(quoted in str(caught.value) for quoted in ("1.2", "::", "\\x"))
    assert ParserState.ERROR is parser.state
    with pytest.raises(LocalProtocolError):
        parser.next_event()
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"x")


@pytest.mark.parametrize(
    ("data", "decisive"),
    [
        (b"PROXY TCP4 " + b"1" * 200, V1_MAX_LINE),
        (b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", V1_MAX_LINE),
        (v2(PROXY, TCP4, length=V2_MAX_PAYLOAD + 1), 16),
        (v2(LOCAL, UNSPEC, length=0xFFFF), 16),
    ],
    ids=["v1 without CRLF", "v1 of 108 bytes", "v2 of 1025 bytes", "v2 LOCAL 64K"],
)
def test_header_too_long(data: bytes, decisive: int) -> None:
    """
    A v1 line with no LF in its first 107 bytes, or a v2 length past 1024, is
    an error of reason ``too_long`` as soon as that is known.
    """
    parser = ProxyHeaderParser()
    parser.receive_data(data[: decisive - 1])
    assert isinstance(parser.next_event(), HeaderStarted)
    assert NEED_DATA is parser.next_event()
    parser.receive_data(data[decisive - 1 : decisive])
    with pytest.raises(RemoteProtocolError) as caught:
        parser.next_event()
    assert "too_long" == caught.value.reason


def test_finished_parser_refuses_use() -> None:
    """
    After a header the parser takes no more bytes and yields no more events;
    it has no trailing data to give before it finishes.
    """
    parser = ProxyHeaderParser()
    parser.receive_data(HAPROXY_V1_TCP4[:10])
    with pytest.raises(LocalProtocolError):
        _ = parser.trailing_data
    parser.receive_data(HAPROXY_V1_TCP4[10:])
    assert isinstance(parser.next_event(), HeaderStarted)
    assert isinstance(parser.next_event(), Header)
    with pytest.raises(LocalProtocolError):
        parser.next_event()
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"\x00")


def test_no_data_after_end_of_file() -> None:
    """
    Bytes fed after end of file are a caller's bug.
    """
    parser = ProxyHeaderParser()
    parser.receive_data(b"PRO")
    parser.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of file"):
        parser.receive_data(b"XY ")
