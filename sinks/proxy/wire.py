"""
The PROXY protocol header (v1 text and v2 binary), receiving side, without I/O.

A load balancer such as haproxy (``send-proxy`` / ``send-proxy-v2``) opens
each connection to a backend with one header naming the client it relays, then
passes the client's own bytes through untouched. This module finds and parses
that header; whether to believe it is `sinks.proxy.gate`'s decision.

Theory of operation
-------------------
`ProxyHeaderParser` is fed the connection's first bytes (`receive_data`,
``b""`` for end of file) and hands back events (`next_event`), or `NEED_DATA`
while the bytes so far cannot decide. States, all moved by `next_event` alone:

``SIGNATURE``
    The bytes so far are a prefix of ``PROXY `` (v1) or of the v2 signature
    ``\\r\\n\\r\\n\\x00\\r\\nQUIT\\n``. The first byte that fits neither, or end of
    file before a signature is complete, yields `NoHeader` and ends in
    ``DONE``. A complete signature yields `HeaderStarted` and moves to
    ``V1_LINE`` or ``V2_HEADER``: from there on the bytes are a header.
``V1_LINE``
    Waits for the first ``\\n`` within 107 bytes (the spec's bound, CRLF
    included) and parses ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` or
    ``PROXY UNKNOWN[ anything]\\r\\n``.
``V2_HEADER``
    Waits for the 16 fixed bytes (signature, version/command, family/transport,
    big-endian length), refuses a length over `V2_MAX_PAYLOAD`, then waits for
    the address block and TLVs and parses them.
``DONE``
    A `NoHeader` or `Header` was returned; `trailing_data` holds the bytes
    after the header (all bytes, after `NoHeader`): the start of the client's
    own protocol. Every further call raises `LocalProtocolError`.
``ERROR``
    A `RemoteProtocolError` was raised; every further call raises
    `LocalProtocolError`.

Invariant: each decision depends only on a prefix of the input, and is taken
at the first prefix that allows it, so any split of the same bytes gives the
same events. The buffer never holds more than one header's bound plus the
last chunk received.

What is accepted, as the spec (haproxy's ``doc/proxy-protocol.txt``) and
haproxy's own sender have it:

- v1: exactly one space between fields; IPv4 as four decimal numbers without
  leading zeros; IPv6 in its textual form without a zone; ports 0..65535
  without leading zeros; the family must match the addresses. ``UNKNOWN``
  (haproxy sends it for clients that are not TCP) names no client.
- v2: version 2; command LOCAL (the proxy speaking for itself, as in its
  ``check-send-proxy`` health checks: address block ignored) or PROXY; family
  UNSPEC, INET, INET6 or UNIX and transport UNSPEC, STREAM or DGRAM, anything
  else refused as the spec requires. Only INET/INET6 over STREAM names a
  client: the other combinations are accepted and, as haproxy does itself,
  stand for the proxy's own connection. The address block must fit in the
  length; TLVs after it must be well-framed and are otherwise skipped.

Client addresses are returned in canonical text; an IPv4-mapped IPv6 address
(haproxy sends one in ``TCP6`` when its client and server sockets are of
different families) is returned as the IPv4 address it carries, so a client is
known by one address whatever sockets the proxy used.
"""

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

V1_SIGNATURE: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LINE: Final = 107
"""Longest v1 header, ``PROXY`` to CRLF inclusive (the spec's worst case)."""
V2_FIXED: Final = 16
"""Signature, version/command, family/transport and the 2-byte length."""
V2_MAX_PAYLOAD: Final = 1024
"""Longest v2 address block plus TLVs accepted; haproxy sends far less."""

_V2_VERSION: Final = 0x2
_V2_LOCAL: Final = 0x0
_V2_PROXY: Final = 0x1
_FAM_UNSPEC: Final = 0x0
_FAM_INET: Final = 0x1
_FAM_INET6: Final = 0x2
_FAM_UNIX: Final = 0x3
_TRANS_STREAM: Final = 0x1
_TRANS_MAX: Final = 0x2
_ADDRESS_BLOCK: Final = {_FAM_UNSPEC: 0, _FAM_INET: 12, _FAM_INET6: 36, _FAM_UNIX: 216}
"""Bytes of the v2 address block for each family."""

_PORT = re.compile(r"0|[1-9][0-9]{0,4}")

Reason = Literal["malformed", "too_long", "eof"]


class RemoteProtocolError(Exception):
    """
    The bytes began a PROXY header but are not a valid one: close the connection.

    ``reason`` is a short label (``malformed``, ``too_long``, ``eof``); the
    message never quotes the peer's bytes.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


class LocalProtocolError(RuntimeError):
    """
    The parser was used after it finished or failed: a bug in the caller.
    """


class ParserState(enum.Enum):
    """
    Where the parser is; see the module docstring.
    """

    SIGNATURE = "signature"
    V1_LINE = "v1_line"
    V2_HEADER = "v2_header"
    DONE = "done"
    ERROR = "error"


class NeedData(enum.Enum):
    """
    Sentinel type of `NEED_DATA`.
    """

    NEED_DATA = "need_data"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class NoHeader:
    """
    The connection does not start with a PROXY header.
    """


@dataclass(frozen=True, slots=True)
class HeaderStarted:
    """
    A complete signature: the next bytes are a PROXY header of ``version``.
    """

    version: Literal[1, 2]


@dataclass(frozen=True, slots=True)
class Address:
    """
    One end of the relayed connection.
    """

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Header:
    """
    A complete, valid header.

    ``source`` and ``destination`` are the relayed client and the address it
    reached on the proxy; both are None when the header names no client (v1
    ``UNKNOWN``, v2 LOCAL, v2 families and transports other than TCP).
    ``length`` is the header's size in bytes.
    """

    version: Literal[1, 2]
    command: Literal["proxy", "local"]
    source: Address | None
    destination: Address | None
    length: int


Event = NoHeader | HeaderStarted | Header


class ProxyHeaderParser:
    """
    Parser of the first bytes of one connection; see the module docstring.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = ParserState.SIGNATURE
        self._eof = False

    @property
    def state(self) -> ParserState:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """
        Bytes received after the header (all of them after `NoHeader`).

        Raises:
            LocalProtocolError: the parser has not finished.
        """
        if self._state is not ParserState.DONE:
            raise LocalProtocolError(f"no trailing data in state {self._state.value}")
        return bytes(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """
        Add bytes from the peer; ``b""`` means end of file.

        Raises:
            LocalProtocolError: the parser has finished, failed or seen end of file.
        """
        if self._state in (ParserState.DONE, ParserState.ERROR):
            raise LocalProtocolError(f"parser is in state {self._state.value}")
        if self._eof:
            raise LocalProtocolError("data after end of file")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """
        The next event, or `NEED_DATA` while the bytes so far cannot decide.

        Raises:
            RemoteProtocolError: the header is malformed, too long, or cut by
                end of file; the parser moves to ``ERROR``.
            LocalProtocolError: the parser has finished or failed.
        """
        match self._state:
            case ParserState.SIGNATURE:
                return self._signature()
            case ParserState.V1_LINE:
                return self._v1()
            case ParserState.V2_HEADER:
                return self._v2()
            case _:
                raise LocalProtocolError(f"parser is in state {self._state.value}")

    def _signature(self) -> Event | NeedData:
        head = bytes(self._buffer[: len(V2_SIGNATURE)])
        if head.startswith(V1_SIGNATURE):
            self._state = ParserState.V1_LINE
            return HeaderStarted(1)
        if head.startswith(V2_SIGNATURE):
            self._state = ParserState.V2_HEADER
            return HeaderStarted(2)
        # The signatures differ from the first byte, so at most one of them
        # can still be on its way.
        if not self._eof and (
            V1_SIGNATURE.startswith(head) or V2_SIGNATURE.startswith(head)
        ):
            return NEED_DATA
        # A byte fits neither signature, or the stream ended before one was
        # complete (a connection closed without a word among them).
        self._state = ParserState.DONE
        return NoHeader()

    def _v1(self) -> Header | NeedData:
        end = self._buffer.find(b"\n", 0, V1_MAX_LINE)
        if end < 0:
            if len(self._buffer) >= V1_MAX_LINE:
                raise self._fail("too_long", "PROXY v1 line without CRLF in 107 bytes")
            if self._eof:
                raise self._fail("eof", "end of file inside a PROXY v1 header")
            return NEED_DATA
        line = bytes(self._buffer[: end + 1])
        header = self._parse_v1(line)
        del self._buffer[: end + 1]
        self._state = ParserState.DONE
        return header

    def _parse_v1(self, line: bytes) -> Header:
        if not line.endswith(b"\r\n"):
            raise self._fail("malformed", "PROXY v1 line ends without CR")
        body = line[len(V1_SIGNATURE) : -2]
        if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
            # The spec lets the sender put anything between UNKNOWN and CRLF.
            return Header(1, "proxy", None, None, len(line))
        try:
            fields = body.decode("ascii").split(" ")
        except UnicodeDecodeError:
            raise self._fail("malformed", "PROXY v1 line is not ASCII") from None
        family = fields[0]
        if family not in ("TCP4", "TCP6"):
            raise self._fail("malformed", "PROXY v1 family is not TCP4, TCP6, UNKNOWN")
        if len(fields) != 5:
            raise self._fail("malformed", "PROXY v1 line does not have 5 fields")
        version = 4 if family == "TCP4" else 6
        source = self._v1_address(fields[1], fields[3], version)
        destination = self._v1_address(fields[2], fields[4], version)
        return Header(1, "proxy", source, destination, len(line))

    def _v1_address(self, host: str, port: str, version: int) -> Address:
        # ipaddress accepts IPv6 zones ("%eth0"), which a header never carries;
        # it already refuses IPv4 numbers with leading zeros.
        if "%" in host:
            raise self._fail("malformed", "PROXY v1 address has a zone")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise self._fail("malformed", "PROXY v1 address is not an IP") from None
        if address.version != version:
            raise self._fail("malformed", "PROXY v1 address is not of its family")
        if _PORT.fullmatch(port) is None or int(port) > 0xFFFF:
            raise self._fail("malformed", "PROXY v1 port is not 0..65535")
        return Address(_canonical(address), int(port))

    def _v2(self) -> Header | NeedData:
        buffer = self._buffer
        if len(buffer) < V2_FIXED:
            return self._v2_wait()
        version, command = buffer[12] >> 4, buffer[12] & 0x0F
        if version != _V2_VERSION:
            raise self._fail("malformed", f"PROXY v2 header of version {version}")
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise self._fail("malformed", f"PROXY v2 command 0x{command:x}")
        length = int.from_bytes(buffer[14:16], "big")
        if length > V2_MAX_PAYLOAD:
            raise self._fail("too_long", f"PROXY v2 header of {length} bytes")
        if len(buffer) < V2_FIXED + length:
            return self._v2_wait()
        family, transport = buffer[13] >> 4, buffer[13] & 0x0F
        payload = bytes(buffer[V2_FIXED : V2_FIXED + length])
        if command == _V2_LOCAL:
            # The spec: a LOCAL header's protocol block, family included, is
            # discarded unread.
            header = Header(2, "local", None, None, V2_FIXED + length)
        else:
            header = self._parse_v2_proxy(family, transport, payload)
        del buffer[: V2_FIXED + length]
        self._state = ParserState.DONE
        return header

    def _v2_wait(self) -> NeedData:
        if self._eof:
            raise self._fail("eof", "end of file inside a PROXY v2 header")
        return NEED_DATA

    def _parse_v2_proxy(self, family: int, transport: int, payload: bytes) -> Header:
        block = _ADDRESS_BLOCK.get(family)
        if block is None or transport > _TRANS_MAX:
            raise self._fail(
                "malformed", f"PROXY v2 family/transport 0x{family:x}{transport:x}"
            )
        if len(payload) < block:
            raise self._fail("malformed", "PROXY v2 address block exceeds its length")
        self._check_tlvs(payload[block:])
        length = V2_FIXED + len(payload)
        if transport != _TRANS_STREAM or family not in (_FAM_INET, _FAM_INET6):
            return Header(2, "proxy", None, None, length)
        size = 4 if family == _FAM_INET else 16
        source = ipaddress.ip_address(payload[:size])
        destination = ipaddress.ip_address(payload[size : 2 * size])
        ports = payload[2 * size : block]
        return Header(
            2,
            "proxy",
            Address(_canonical(source), int.from_bytes(ports[:2], "big")),
            Address(_canonical(destination), int.from_bytes(ports[2:], "big")),
            length,
        )

    def _check_tlvs(self, tlvs: bytes) -> None:
        offset = 0
        while offset < len(tlvs):
            if len(tlvs) - offset < 3:
                raise self._fail("malformed", "PROXY v2 TLV header cut short")
            offset += 3 + int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
            if offset > len(tlvs):
                raise self._fail("malformed", "PROXY v2 TLV value exceeds the header")

    def _fail(self, reason: Reason, message: str) -> RemoteProtocolError:
        self._state = ParserState.ERROR
        self._buffer.clear()
        return RemoteProtocolError(reason, message)


def _canonical(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)
