"""
Connection guard of the HTTP sink: caps, deadlines and the PROXY gate that sit
between the kernel's accepted socket and aiohttp's `RequestHandler`.

aiohttp has no connection cap and no deadline for a request's headers: a
client that opens a socket and trickles a header byte now and then holds a
file descriptor for as long as it likes. Every accepted TCP connection is
therefore first a `GuardedConnection`, which moves through these phases:

``HANDSHAKE``
    HTTPS only. The connection was counted against ``max_connections`` and
    ``max_connections_per_client`` at accept, like a plain one, and is
    refused the same way over a cap, before any TLS. The guard runs the
    handshake itself (`sinks.http.tls.TlsSession`, on the context in force),
    bounded by ``header_timeout``; a failed one is counted as
    ``tls_handshake``. From then on every phase below sees decrypted bytes.
``GATE``
    The first bytes go through the PROXY gate (always, so that a PROXY header
    from an address that is not a trusted proxy is refused). Over
    ``max_connections``, or over ``max_connections_per_client`` for a peer
    that is not a trusted proxy, the connection was already closed at accept;
    a trusted proxy's connection is held to its client's share once the gate
    names the client.
``HEADERS``
    The gate named the client (the peer, or the address a trusted proxy
    vouched for); aiohttp's handler is created and sees a transport whose
    ``peername`` is the client's. Bytes are relayed until the
    first request's headers end (a blank line).
``RELAY``
    Bytes are relayed untouched. aiohttp's keep-alive timer bounds the gap
    between one response and the next complete request.

``header_timeout`` runs from accept until the blank line that ends the first
request's headers, across ``GATE`` and ``HEADERS``; blank lines before the
request line (which aiohttp skips) do not end it. With TLS it bounds the
handshake first, then starts again when the handshake ends.

Every admitted connection's transport is wrapped in a `GuardedTransport`,
which counts what aiohttp writes. Whenever bytes wait in the transport's
buffer, a timer checks every ``write_timeout`` that some of them reached the
socket since the last check, and aborts the connection if none did. This holds
below the buffer's high-water mark too: a client that stops reading with a few
hundred bytes unsent never makes asyncio call ``pause_writing``, and a
``close()`` waits for a drain that never comes, holding the slot and the file
descriptor for good. For the same reason every close the guard or aiohttp asks
for is turned into an abort if the connection is still open ``write_timeout``
later.

Every refusal is counted by reason and logged through
`broker.ratelog.RateLimitedLog`, so a flood of them costs one log line per
reason per interval.
"""

import asyncio
import enum
import ipaddress
import ssl
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import structlog

from broker.accounts.identity import normalise_ip
from broker.ratelog import CountedLog
from sinks.http.tls import TlsSession
from sinks.proxy import ProxyGate, ProxyRefused

log = structlog.get_logger("ebroker.sinks.http")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# What a client whose headers did not arrive in time is told before the close.
_TIMEOUT_ANSWER: Final = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Connection: close\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 24\r\n"
    b"\r\n"
    b"request headers too slow"
)


# What a TLS connection's transport tells through ``get_extra_info``.
_TLS_INFO: Final = frozenset(
    {"ssl_object", "sslcontext", "peercert", "cipher", "compression"}
)


@dataclass(frozen=True, slots=True)
class Limits:
    """
    The guard's limits, from the sink's config.
    """

    max_connections: int
    max_connections_per_client: int
    header_timeout: float
    write_timeout: float
    trusted_proxies: Sequence[Network] = ()
    """Peers allowed to name the client in a PROXY header."""


class _Phase(enum.Enum):
    HANDSHAKE = "handshake"
    GATE = "gate"
    HEADERS = "headers"
    RELAY = "relay"
    CLOSED = "closed"


class ConnectionGuard:
    """
    Protocol factory and registry of the sink's connections.

    Args:
        limits: caps and deadlines.
        make_handler: builds aiohttp's protocol for an admitted connection.
        refusals: where refusals are counted and logged.
        tls: for HTTPS, returns the context a new handshake uses (the newest
            after a reload); None for plain HTTP.
    """

    def __init__(
        self,
        limits: Limits,
        make_handler: Callable[[], asyncio.Protocol],
        refusals: CountedLog,
        tls: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        self.limits = limits
        self.make_handler = make_handler
        self.refusals = refusals
        self.tls = tls
        self._connections: set[GuardedConnection] = set()
        self._per_client: Counter[str] = Counter()

    def __call__(self) -> "GuardedConnection":
        return GuardedConnection(self)

    def __len__(self) -> int:
        return len(self._connections)

    def admit(self, connection: "GuardedConnection") -> bool:
        if len(self._connections) >= self.limits.max_connections:
            return False
        self._connections.add(connection)
        return True

    def claim(self, client: str) -> bool:
        if self._per_client[client] >= self.limits.max_connections_per_client:
            return False
        self._per_client[client] += 1
        return True

    def forget(self, connection: "GuardedConnection", client: str | None) -> None:
        self._connections.discard(connection)
        if client is not None:
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]

    def close_unserved(self) -> None:
        """
        Close connections no request handler owns yet (still in the gate or
        waiting for their first headers); aiohttp closes the rest.
        """
        for connection in list(self._connections):
            connection.close_if_unserved()


class GuardedConnection(asyncio.Protocol):
    """
    One accepted TCP connection: enforces the caps and the header deadline,
    then relays everything to aiohttp's handler.
    """

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._phase = _Phase.GATE
        self._transport: asyncio.Transport | None = None
        self._inner: asyncio.Protocol | None = None
        self._gate: ProxyGate | None = None
        self._tls: TlsSession | None = None
        self._eof_delivered = False
        self._client: str | None = None
        self._peer = "?"
        self._tail = b""
        self._request_started = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._writing_paused = False
        self._written = 0
        self._sent_at_check = 0

    # ---- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self._transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        host, port = (str(peername[0]), int(peername[1])) if peername else ("?", 0)
        self._peer = host
        if not self._guard.admit(self):
            self._refuse("max_connections", abort=True)
            return
        self._gate = ProxyGate(host, port, self._guard.limits.trusted_proxies)
        # Only a trusted proxy's connection waits for the gate to name its
        # client; any other peer is its own client, capped right at accept.
        if not self._gate.trusted and not self._claim(host):
            return
        if self._guard.tls is not None:
            self._tls = TlsSession(self._guard.tls())
            self._phase = _Phase.HANDSHAKE
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._tls is not None:
            data = self._decrypt(data)
            if data:
                self._received(data)
            ended = self._tls.peer_closed and not self._eof_delivered
            if ended and not self._delivered_eof():
                self.close()
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        if self._phase is _Phase.GATE:
            data = self._through_gate(data)
            if not data:
                return
        if self._phase is _Phase.HEADERS:
            self._watch_headers(data)
        if self._inner is not None and self._phase is not _Phase.CLOSED:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._tls is not None:
            if not self._tls.established or self._eof_delivered:
                # A client gone mid-handshake, or a TLS stream already ended:
                # nothing more to hand on; the transport closes.
                return None
            self._tls.peer_closed = True
        return self._delivered_eof()

    def _delivered_eof(self) -> bool | None:
        self._eof_delivered = True
        if self._phase is _Phase.GATE:
            rest = self._through_gate(b"")
            if self._inner is not None and rest:
                self._inner.data_received(rest)
        if self._inner is not None and self._phase is not _Phase.CLOSED:
            return self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._watch_writes()
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = _Phase.CLOSED
        self._stop_header_timer()
        self._stop_write_timer()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._guard.forget(self, self._client)
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.connection_lost(exc)

    # ---- phases --------------------------------------------------------------

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = asyncio.get_running_loop().call_later(
            self._guard.limits.header_timeout, self._headers_expired
        )

    def _decrypt(self, data: bytes) -> bytes:
        """
        Run the TLS layer on bytes from the socket.

        Returns:
            The decrypted bytes for the phases above it.
        """
        tls = self._tls
        if tls is None or self._phase is _Phase.CLOSED:
            return b""
        handshaking = not tls.established
        try:
            plain = tls.receive(data)
        except ssl.SSLError as exc:
            # The alert, if OpenSSL wrote one, goes out ahead of the close.
            self._send_raw(tls.outgoing())
            self._refuse(
                "tls_handshake" if handshaking else "tls_error",
                detail=exc.reason or type(exc).__name__,
            )
            return b""
        self._send_raw(tls.outgoing())
        if handshaking and tls.established:
            self._phase = _Phase.GATE
            self._start_header_timer()
        return plain

    def _through_gate(self, data: bytes) -> bytes:
        """
        Feed the gate; once it decides, hand the connection to aiohttp.

        Returns:
            The bytes that follow any PROXY header, for the handler.
        """
        if self._gate is None:
            return b""
        try:
            outcome = self._gate.receive_data(data)
        except ProxyRefused as exc:
            self._refuse(exc.reason, detail=str(exc))
            return b""
        if outcome is None:
            return b""
        self._gate = None
        if self._client is None and not self._claim(outcome.host):
            return b""
        self._phase = _Phase.HEADERS
        transport = self._transport
        if transport is None:
            return b""
        peername: tuple[str, int] | None = None
        if outcome.proxied:
            self._peer = outcome.host
            peername = (outcome.host, outcome.port)
        self._inner = self._guard.make_handler()
        self._inner.connection_made(GuardedTransport(transport, self, peername))
        if self._writing_paused:
            self._inner.pause_writing()
        return outcome.rest

    def _claim(self, host: str) -> bool:
        # One client whatever the spelling: "::ffff:10.0.0.5" is "10.0.0.5",
        # as the accounts see it.
        try:
            client = str(normalise_ip(host))
        except ValueError:
            client = host
        if not self._guard.claim(client):
            self._peer = client
            self._refuse("max_connections_per_client")
            return False
        self._client = client
        return True

    def _watch_headers(self, data: bytes) -> None:
        if not self._request_started:
            # aiohttp skips empty lines before a request line; they must not
            # count as the end of headers not yet sent.
            data = data.lstrip(b"\r\n")
            if not data:
                return
            self._request_started = True
        # Either line ending counts: a false end only hands the connection to
        # aiohttp's own keep-alive deadline sooner.
        seen = self._tail + data
        if b"\r\n\r\n" in seen or b"\n\n" in seen:
            self._phase = _Phase.RELAY
            self._stop_header_timer()
            self._tail = b""
        else:
            self._tail = seen[-3:]

    def _headers_expired(self) -> None:
        self._header_timer = None
        if self._phase not in (_Phase.HANDSHAKE, _Phase.GATE, _Phase.HEADERS):
            return
        if self._phase is _Phase.HEADERS:
            self.write(_TIMEOUT_ANSWER)
        self._refuse("header_timeout")

    # ---- writes --------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """
        Write to the socket (through TLS on HTTPS), watching that the bytes
        leave the buffer.
        """
        if self._transport is None:
            return
        if self._tls is not None:
            try:
                data = self._tls.send(data)
            except ssl.SSLError:
                # The TLS stream is already closed: the socket follows.
                return
            self._send_raw(data)
            return
        self._written += len(data)
        self._transport.write(data)
        self._watch_writes()

    def writelines(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """
        `write` for several buffers at once.
        """
        if self._transport is None:
            return
        if self._tls is not None:
            self.write(b"".join(chunks))
            return
        self._written += sum(len(chunk) for chunk in chunks)
        self._transport.writelines(chunks)
        self._watch_writes()

    def _send_raw(self, data: bytes) -> None:
        # Bytes for the socket as they are (TLS records): counted as written.
        if self._transport is None or not data:
            return
        self._written += len(data)
        self._transport.write(data)
        self._watch_writes()

    def tls_info(self, name: str) -> Any:
        """
        TLS facts under asyncio's ``get_extra_info`` names, or None.
        """
        tls = self._tls
        if tls is None or not tls.established:
            return None
        match name:
            case "ssl_object":
                return tls.ssl_object
            case "sslcontext":
                return tls.context
            case "peercert":
                return tls.ssl_object.getpeercert()
            case "cipher":
                return tls.ssl_object.cipher()
            case "compression":
                return tls.ssl_object.compression()
        return None

    @property
    def secure(self) -> bool:
        """
        Whether the connection speaks TLS.
        """
        return self._tls is not None

    def _watch_writes(self) -> None:
        """
        Start the write-progress timer if bytes wait in the buffer.
        """
        if self._write_timer is not None or self._phase is _Phase.CLOSED:
            return
        transport = self._transport
        if transport is None or transport.get_write_buffer_size() == 0:
            return
        self._sent_at_check = self._written - transport.get_write_buffer_size()
        self._write_timer = asyncio.get_running_loop().call_later(
            self._guard.limits.write_timeout, self._check_writes
        )

    def _check_writes(self) -> None:
        self._write_timer = None
        transport = self._transport
        if transport is None or self._phase is _Phase.CLOSED:
            return
        pending = transport.get_write_buffer_size()
        if pending == 0:
            return
        if self._written - pending <= self._sent_at_check:
            self._refuse("write_timeout", abort=True)
            return
        self._watch_writes()

    def close(self) -> None:
        """
        Close once the buffer drains, or abort if it has not after
        ``write_timeout``.
        """
        transport = self._transport
        if transport is None:
            return
        if self._tls is not None and not transport.is_closing():
            self._send_raw(self._tls.close())
        transport.close()
        if self._close_timer is None and self._phase is not _Phase.CLOSED:
            self._close_timer = asyncio.get_running_loop().call_later(
                self._guard.limits.write_timeout, self._close_expired
            )

    def _close_expired(self) -> None:
        self._close_timer = None
        if self._transport is not None:
            self._guard.refusals("close_timeout", peer=self._peer)
            self._transport.abort()

    def close_if_unserved(self) -> None:
        unserved = (_Phase.HANDSHAKE, _Phase.GATE, _Phase.HEADERS)
        if self._phase in unserved and self._transport:
            self.close()
            self._phase = _Phase.CLOSED

    def _refuse(self, reason: str, *, abort: bool = False, **fields: Any) -> None:
        self._guard.refusals(reason, peer=self._peer, **fields)
        self._stop_header_timer()
        self._stop_write_timer()
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self.close()
        self._phase = _Phase.CLOSED

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None


class GuardedTransport(asyncio.Transport):
    """
    The connection's transport as aiohttp sees it: writes and closes go
    through the `GuardedConnection`, which watches that they complete; behind
    a trusted proxy, ``peername`` is the client the proxy named.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        connection: GuardedConnection,
        peername: tuple[str, int] | None = None,
    ):
        super().__init__()
        self._transport = transport
        self._connection = connection
        self._peername = peername

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername" and self._peername is not None:
            return self._peername
        if self._connection.secure and name in _TLS_INFO:
            info = self._connection.tls_info(name)
            return default if info is None else info
        return self._transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._connection.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._connection.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._connection.writelines(list(list_of_data))

    def write_eof(self) -> None:
        if self._connection.secure:
            raise NotImplementedError("TLS has no half-close")
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return not self._connection.secure and self._transport.can_write_eof()

    def abort(self) -> None:
        self._transport.abort()
