"""
The PROXY gate: trusted proxies must name their clients, everyone else is taken at
their own address and refused if they try to name another.
"""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.proxy import (
    REFUSAL_REASONS,
    GateOutcome,
    ProxyGate,
    ProxyRefused,
)
from sinks.proxy.gate import is_trusted
from sinks.proxy.wire import LocalProtocolError
from tests.sinks.proxy.headers import (
    HAPROXY_V1_TCP4,
    HAPROXY_V1_TCP6,
    HAPROXY_V2_LOCAL_CHECK,
    HAPROXY_V2_TCP4,
    HAPROXY_V2_TCP6,
    HAPROXY_V2_TLVS,
    PROXY,
    TCP4,
    UNIX,
    UNSPEC,
    V2_SIGNATURE,
    split,
    unix_block,
    v2,
)

PROXY_HOST = "10.0.0.5"
PROXY_PORT = 41000
TRUSTED: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
    ipaddress.IPv4Network("10.0.0.0/29"),
    ipaddress.IPv6Network("2001:db8:1::/64"),
]
EGD_READ = b"\x02\xff"
HTTP_CHECK = b"GET /healthz HTTP/1.0\r\n\r\n"

# Each header with the client it names, or None for one that names none.
NAMED: list[tuple[str, bytes, tuple[str, int] | None]] = [
    ("v1 TCP4", HAPROXY_V1_TCP4, ("127.0.0.2", 48067)),
    ("v1 TCP6", HAPROXY_V1_TCP6, ("::1", 57815)),
    ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n", None),
    ("v2 TCP4", HAPROXY_V2_TCP4, ("127.0.0.2", 52943)),
    ("v2 TCP6", HAPROXY_V2_TCP6, ("::1", 40419)),
    ("v2 TLVs", HAPROXY_V2_TLVS, ("127.0.0.3", 51123)),
    ("v2 LOCAL", HAPROXY_V2_LOCAL_CHECK, None),
    ("v2 UNIX", v2(PROXY, UNIX, unix_block(b"/a", b"/b")), None),
    ("v2 UNSPEC", v2(PROXY, UNSPEC), None),
]
IDS = [name for name, _, _ in NAMED]


def expected(client: tuple[str, int] | None, rest: bytes) -> GateOutcome:
    if client is None:
        return GateOutcome(PROXY_HOST, PROXY_PORT, False, rest)
    return GateOutcome(client[0], client[1], True, rest)


def gate(host: str = PROXY_HOST, port: int = PROXY_PORT) -> ProxyGate:
    return ProxyGate(host, port, TRUSTED)


def run(chunks: list[bytes], host: str = PROXY_HOST) -> tuple[GateOutcome, int]:
    """
    Feed ``chunks`` until the gate decides; the outcome and the chunks used.
    """
    subject = gate(host)
    for used, chunk in enumerate(chunks, start=1):
        outcome = subject.receive_data(chunk)
        if outcome is not None:
            return outcome, used
    raise AssertionError("the gate did not decide")


@pytest.mark.parametrize(("raw", "client"), [n[1:] for n in NAMED], ids=IDS)
def test_trusted_header_whole(raw: bytes, client: tuple[str, int] | None) -> None:
    """
    From a trusted proxy, a header naming a TCP client gives that client,
    proxied; one naming none gives the proxy itself; bytes after the header
    are the client's.
    """
    assert expected(client, EGD_READ) == gate().receive_data(raw + EGD_READ)
    assert expected(client, b"") == gate().receive_data(raw)


@pytest.mark.parametrize(("raw", "client"), [n[1:] for n in NAMED], ids=IDS)
def test_trusted_header_byte_by_byte(
    raw: bytes, client: tuple[str, int] | None
) -> None:
    """
    Fed byte by byte, the gate decides on the header's last byte, with no
    client bytes yet.
    """
    subject = gate()
    for byte in raw[:-1]:
        assert subject.receive_data(bytes([byte])) is None
    assert expected(client, b"") == subject.receive_data(raw[-1:])


@given(
    index=st.integers(0, len(NAMED) - 1),
    tail=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_any_split_gives_the_same_outcome(
    index: int, tail: bytes, cuts: list[int]
) -> None:
    """
    However the header and the client's bytes are split into reads, the gate
    names the same client, and its ``rest`` followed by the reads it was not
    fed is exactly the client's bytes.
    """
    _, raw, client = NAMED[index]
    data = raw + tail
    chunks = split(data, cuts)
    outcome, used = run(chunks)
    assert expected(client, outcome.rest) == outcome
    assert tail == outcome.rest + b"".join(chunks[used:])


@pytest.mark.parametrize(
    ("data", "decisive"),
    [
        (EGD_READ, 1),
        (b"\x00", 1),
        (HTTP_CHECK, 1),
        (b"PUT / HTTP/1.1\r\n", 2),
        (b"PROXYZ", 6),
        (b"\r\n\r\n\x00\r\nQUIT\r", 12),
    ],
    ids=["EGD read", "EGD level", "health check", "PUT", "PROXYZ", "almost v2"],
)
def test_trusted_peer_without_header_is_refused(data: bytes, decisive: int) -> None:
    """
    A trusted proxy's connection that does not start with a header is refused
    as ``proxy_missing`` at the first byte no header starts with: the gate
    never guesses that a trusted address is a direct client.
    """
    subject = gate()
    for byte in data[: decisive - 1]:
        assert subject.receive_data(bytes([byte])) is None
    with pytest.raises(ProxyRefused, match="no PROXY header") as caught:
        subject.receive_data(data[decisive - 1 :])
    assert "proxy_missing" == caught.value.reason
    assert caught.value.reason in REFUSAL_REASONS
    with pytest.raises(LocalProtocolError):
        subject.receive_data(b"")


@pytest.mark.parametrize("data", [b"P", b"PROX", b"\r\n\r\n"], ids=repr)
def test_trusted_peer_closing_inside_a_signature_is_refused(data: bytes) -> None:
    """
    A trusted proxy that sends part of a signature and closes sent no header:
    ``proxy_missing``, not its bytes handed on as a client's.
    """
    subject = gate()
    assert subject.receive_data(data) is None
    with pytest.raises(ProxyRefused) as caught:
        subject.receive_data(b"")
    assert "proxy_missing" == caught.value.reason


@pytest.mark.parametrize(
    ("raw", "tail"),
    [
        (HAPROXY_V2_LOCAL_CHECK, HTTP_CHECK),
        (b"PROXY UNKNOWN\r\n", HTTP_CHECK),
        (HAPROXY_V2_LOCAL_CHECK, b""),
    ],
    ids=["v2 LOCAL check", "v1 UNKNOWN check", "v2 LOCAL then close"],
)
def test_trusted_proxy_speaking_for_itself(raw: bytes, tail: bytes) -> None:
    """
    A health check sent with ``check-send-proxy`` (v2 LOCAL) or behind v1
    ``UNKNOWN`` is the proxy itself, not proxied, with the check's bytes.
    """
    outcome = gate().receive_data(raw + tail)
    assert GateOutcome(PROXY_HOST, PROXY_PORT, False, tail) == outcome


@pytest.mark.parametrize(
    ("data", "decisive"),
    [
        (EGD_READ, 1),
        (b"\x04", 1),
        (b"GET / HTTP/1.1\r\n", 1),
        (b"POST / HTTP/1.1\r\n", 2),
        (b"PUT / HTTP/1.1\r\n", 2),
        (b"PROXYZ", 6),
        (b"\r\n\r\n\x00\r\nQUIT\r", 12),
    ],
    ids=["EGD read", "EGD pid", "GET", "POST", "PUT", "PROXYZ", "almost v2"],
)
def test_untrusted_client_passes_through(data: bytes, decisive: int) -> None:
    """
    A client that is not a trusted proxy and sends no header is itself, with
    all its bytes, as soon as a byte rules a header out.
    """
    subject = gate("192.0.2.9", 5555)
    for byte in data[: decisive - 1]:
        assert subject.receive_data(bytes([byte])) is None
    outcome = subject.receive_data(data[decisive - 1 :])
    assert GateOutcome("192.0.2.9", 5555, False, data) == outcome


@pytest.mark.parametrize(
    "raw",
    [HAPROXY_V1_TCP4, HAPROXY_V2_TCP4, HAPROXY_V2_LOCAL_CHECK, b"PROXY UNKNOWN\r\n"],
    ids=["v1", "v2", "v2 LOCAL", "v1 UNKNOWN"],
)
def test_untrusted_header_is_refused_at_its_signature(raw: bytes) -> None:
    """
    A header from a peer that is not a trusted proxy, even one naming no
    client, is refused as ``proxy_untrusted`` on the signature's last byte,
    before the rest is read.
    """
    signature = 6 if raw.startswith(b"PROXY") else len(V2_SIGNATURE)
    subject = gate("10.0.0.8", 5555)
    for byte in raw[: signature - 1]:
        assert subject.receive_data(bytes([byte])) is None
    with pytest.raises(ProxyRefused, match="untrusted") as caught:
        subject.receive_data(raw[signature - 1 : signature])
    assert "proxy_untrusted" == caught.value.reason
    with pytest.raises(LocalProtocolError):
        subject.receive_data(raw[signature:])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "proxy_malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "proxy_malformed"),
        (v2(0x22, TCP4, bytes(12)), "proxy_malformed"),
        (v2(PROXY, TCP4, bytes(11)), "proxy_malformed"),
        (b"PROXY TCP4 " + b"9" * 100, "proxy_too_long"),
        (v2(PROXY, TCP4, length=1025), "proxy_too_long"),
    ],
    ids=[
        "v1 leading zero",
        "v1 bare LF",
        "v2 command",
        "v2 short block",
        "v1 long",
        "v2 long",
    ],
)
def test_bad_header_from_trusted_proxy_is_refused(data: bytes, reason: str) -> None:
    """
    A trusted proxy's header that breaks the spec is refused with a reason
    label for metrics and a message that quotes none of its bytes; the gate
    is then spent.
    """
    subject = gate()
    with pytest.raises(ProxyRefused) as caught:
        subject.receive_data(data + EGD_READ)
    assert reason == caught.value.reason
    assert caught.value.reason in REFUSAL_REASONS
    assert not any(quoted in str(caught.value) for quoted in ("1.2", "999", "\\x"))
    with pytest.raises(LocalProtocolError):
        subject.receive_data(b"")


@pytest.mark.parametrize(
    "data",
    [b"PROXY ", b"PROXY TCP4 1.2.3.4", V2_SIGNATURE + b"!", HAPROXY_V2_TCP4[:-1]],
    ids=repr,
)
def test_end_of_file_inside_a_header_is_refused(data: bytes) -> None:
    """
    A trusted proxy that closes inside a header is refused as ``proxy_eof``.
    """
    subject = gate()
    assert subject.receive_data(data) is None
    with pytest.raises(ProxyRefused) as caught:
        subject.receive_data(b"")
    assert "proxy_eof" == caught.value.reason


@pytest.mark.parametrize("host", [PROXY_HOST, "192.0.2.9"])
def test_end_of_file_before_any_byte(host: str) -> None:
    """
    A connection that closes without a byte (a port probe that connects and
    leaves) is the peer itself with nothing, trusted or not: it claimed
    nothing, so there is nothing to refuse.
    """
    assert GateOutcome(host, PROXY_PORT, False, b"") == gate(host).receive_data(b"")


@pytest.mark.parametrize("data", [b"PROX", b"\r\n\r\n"], ids=repr)
def test_untrusted_end_of_file_inside_a_signature(data: bytes) -> None:
    """
    A peer that is not a trusted proxy and closes before a signature is
    complete sent no header: it is itself, with what it sent.
    """
    subject = gate("192.0.2.9")
    assert subject.receive_data(data) is None
    assert GateOutcome("192.0.2.9", PROXY_PORT, False, data) == subject.receive_data(
        b""
    )


def test_spent_gate_refuses_use() -> None:
    """
    After an outcome the gate takes no more bytes: a caller's bug, a
    RuntimeError.
    """
    subject = gate()
    assert subject.receive_data(HAPROXY_V2_TCP4) is not None
    with pytest.raises(RuntimeError, match="already decided"):
        subject.receive_data(EGD_READ)


@pytest.mark.parametrize(
    ("host", "trusted"),
    [
        ("10.0.0.5", True),
        ("10.0.0.8", False),
        ("::ffff:10.0.0.5", True),
        ("::ffff:10.0.0.8", False),
        ("2001:db8:1::99", True),
        ("2001:db8:2::1", False),
        ("::1", False),
        ("/run/ebroker/egd.sock", False),
        ("", False),
    ],
)
def test_trust_by_network(host: str, trusted: bool) -> None:
    """
    A peer is trusted inside one of the networks; an IPv4-mapped IPv6 peer, as
    a dual-stack socket reports an IPv4 client, counts as its IPv4 address; a
    peer that is not an IP address is never trusted.
    """
    assert trusted == gate(host).trusted


def test_ipv4_peer_matches_a_mapped_network() -> None:
    """
    A network written in IPv4-mapped IPv6 form trusts the IPv4 peer it maps.
    """
    mapped: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        ipaddress.IPv6Network("::ffff:10.0.0.0/125")
    ]
    assert is_trusted("10.0.0.5", mapped)
    assert not is_trusted("10.0.0.9", mapped)


def test_mapped_peer_relays_its_clients() -> None:
    """
    A trusted proxy seen as an IPv4-mapped address may name its clients.
    """
    subject = ProxyGate("::ffff:10.0.0.5", PROXY_PORT, TRUSTED)
    outcome = subject.receive_data(HAPROXY_V2_TCP4 + EGD_READ)
    assert GateOutcome("127.0.0.2", 52943, True, EGD_READ) == outcome


def test_no_trusted_proxies_refuses_every_header() -> None:
    """
    With no trusted proxies, every header is refused and every other client
    passes.
    """
    with pytest.raises(ProxyRefused):
        ProxyGate("127.0.0.1", 1, []).receive_data(HAPROXY_V1_TCP4)
    outcome = ProxyGate("127.0.0.1", 1, []).receive_data(EGD_READ)
    assert GateOutcome("127.0.0.1", 1, False, EGD_READ) == outcome


def test_refusal_defaults_its_message_to_the_reason() -> None:
    """
    A refusal made with a reason alone reads as that reason.
    """
    refusal = ProxyRefused("proxy_eof")
    assert ("proxy_eof", "proxy_eof") == (refusal.reason, str(refusal))
