"""
The EGD protocol, server side, without I/O.

Theory of operation
-------------------
`EgdServerConnection` is fed the bytes a client sends (`receive_data`) and
hands back one request at a time (`next_event`), or `NEED_DATA` while a command
is incomplete. A command may be split across reads or coalesced with others; the
result is the same. Replies are built by the ``encode_*`` functions. Commands
(all integers big-endian):

====  ==========================  =====================================
byte  request                     reply
====  ==========================  =====================================
0x00  ``00``                      u32 bits of entropy available
0x01  ``01 NN``                   ``MM`` then MM bytes, MM <= NN
0x02  ``02 NN``                   exactly NN bytes, no count
0x03  ``03 HH LL NN`` + NN bytes  none
0x04  ``04``                      ``LL`` then LL ASCII bytes (the PID)
====  ==========================  =====================================

Any other command byte cannot be skipped (the protocol has no framing), so it
raises `RemoteProtocolError` and moves the connection to ``ERROR``; after that
every call raises `LocalProtocolError`. Requests parsed before the bad byte are
still delivered first, so the server can answer them before closing.
"""

import enum
from dataclasses import dataclass
from typing import Final

MAX_BUFFER: Final = 1 << 20
"""Unparsed input held at most; the server stops reading long before this."""
MAX_LEVEL: Final = 2**32 - 1


class RemoteProtocolError(Exception):
    """
    The client sent something that is not EGD: close its connection.
    """


class LocalProtocolError(Exception):
    """
    The server used a connection that is already in the ERROR state.
    """


class ConnectionState(enum.Enum):
    """
    ``OPEN`` while parsing, ``ERROR`` after a protocol error.
    """

    OPEN = "open"
    ERROR = "error"


class NeedData(enum.Enum):
    """
    Sentinel type of `NEED_DATA`.
    """

    NEED_DATA = "need_data"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class GetLevel:
    """
    0x00: how many bits of entropy are available.
    """


@dataclass(frozen=True, slots=True)
class ReadNonBlocking:
    """
    0x01: up to ``count`` bytes, answered at once.
    """

    count: int


@dataclass(frozen=True, slots=True)
class ReadBlocking:
    """
    0x02: exactly ``count`` bytes, however long it takes.
    """

    count: int


@dataclass(frozen=True, slots=True)
class WriteEntropy:
    """
    0x03: the client offers ``data``, claiming ``bits`` of entropy in it.
    """

    bits: int
    data: bytes


@dataclass(frozen=True, slots=True)
class GetPid:
    """
    0x04: the server's process id.
    """


Event = GetLevel | ReadNonBlocking | ReadBlocking | WriteEntropy | GetPid


class EgdServerConnection:
    """
    Parser of one client's command stream.
    """

    __slots__ = ("_buffer", "_state")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = ConnectionState.OPEN

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def buffered(self) -> int:
        """
        Bytes received but not yet parsed into a request.
        """
        return len(self._buffer)

    def unparsed(self) -> bytes:
        """
        The bytes received but not yet parsed (the start of a request), so
        another parser can go on where this one stopped.
        """
        return bytes(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """
        Add bytes from the client.

        Raises:
            LocalProtocolError: the connection is in ERROR.
            RemoteProtocolError: the client sent more than `MAX_BUFFER` unparsed bytes.
        """
        if self._state is ConnectionState.ERROR:
            raise LocalProtocolError("connection is in ERROR state")
        self._buffer += data
        if len(self._buffer) > MAX_BUFFER:
            raise self._fail(RemoteProtocolError("too much unparsed input"))

    def next_event(self) -> Event | NeedData:
        """
        Return the next complete request, or `NEED_DATA`.

        Raises:
            RemoteProtocolError: the next command byte is not EGD.
            LocalProtocolError: the connection is already in ERROR.
        """
        if self._state is ConnectionState.ERROR:
            raise LocalProtocolError("connection is in ERROR state")
        buffer = self._buffer
        if not buffer:
            return NEED_DATA
        command = buffer[0]
        if command == 0x00:
            del buffer[:1]
            return GetLevel()
        if command == 0x04:
            del buffer[:1]
            return GetPid()
        if command in (0x01, 0x02):
            if len(buffer) < 2:
                return NEED_DATA
            count = buffer[1]
            del buffer[:2]
            return ReadNonBlocking(count) if command == 0x01 else ReadBlocking(count)
        if command == 0x03:
            if len(buffer) < 4:
                return NEED_DATA
            length = buffer[3]
            if len(buffer) < 4 + length:
                return NEED_DATA
            bits = int.from_bytes(buffer[1:3], "big")
            data = bytes(buffer[4 : 4 + length])
            del buffer[: 4 + length]
            return WriteEntropy(bits, data)
        raise self._fail(RemoteProtocolError(f"unknown EGD command 0x{command:02x}"))

    def _fail(self, error: RemoteProtocolError) -> RemoteProtocolError:
        self._state = ConnectionState.ERROR
        self._buffer.clear()
        return error


def encode_level(bits: int) -> bytes:
    """
    Reply to 0x00: the bit count as u32, capped at 2^32 - 1.
    """
    return min(max(bits, 0), MAX_LEVEL).to_bytes(4, "big")


def encode_nonblocking(data: bytes) -> bytes:
    """
    Reply to 0x01: the count byte and the bytes, as one piece (one write).
    """
    if len(data) > 255:
        raise ValueError("a 0x01 reply carries at most 255 bytes")
    return bytes([len(data)]) + data


def encode_pid(pid: int) -> bytes:
    """
    Reply to 0x04: length byte and the PID in ASCII.
    """
    text = str(pid).encode("ascii")
    return bytes([len(text)]) + text
