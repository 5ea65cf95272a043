"""
The PROXY protocol gate: who is really on the other end of a connection.

Theory of operation
-------------------
A sink makes one `ProxyGate` per accepted TCP connection, with the peer's
address and the sink's ``trusted_proxies``, and feeds it the connection's
first bytes (``b""`` at end of file) until it returns a `GateOutcome` or
raises `ProxyRefused`. From then on the gate is spent (`LocalProtocolError`)
and the sink speaks its own protocol, starting with `GateOutcome.rest`.

For a **trusted** peer (a load balancer) the header is required: the PROXY
spec says a receiver must not guess whether one is present, and a trusted
address that could skip it could also be any local process claiming to be
any client's relay without saying so. So from a trusted peer:

- a PROXY header naming a TCP client (v1 ``TCP4``/``TCP6``, v2 PROXY over
  INET/INET6 STREAM) → that client's address, ``proxied=True``;
- a header naming no client (v1 ``UNKNOWN``, v2 LOCAL as haproxy's
  ``check-send-proxy`` health checks send it, v2 UNIX/UNSPEC) → the peer's
  own address, ``proxied=False``: the proxy speaking for itself;
- anything else is refused (``proxy_missing``) at the first byte no header
  starts with: a direct client must use a listener that trusts no proxy.

For any **other** peer a header is refused (``proxy_untrusted``) as soon as its
signature is complete, before the rest is read: a client must not be able to
claim another's address. Bytes that cannot start a header pass straight
through (EGD's first byte decides at once; HTTP's ``POST``/``PUT`` within six
bytes), so an untrusted peer is never waited on and may stay silent for life.

A peer is trusted when its address lies in one of the networks; an
IPv4-mapped IPv6 peer (``::ffff:10.0.0.5``, as a dual-stack socket reports an
IPv4 client) is matched as the IPv4 address it carries, and an IPv4 peer
against ``::ffff:0:0/96``-style networks as its mapped form. A peer that is
not an IP address (a Unix socket's path) is never trusted.

End of file before any byte is no claim at all (a port probe that connects
and leaves): the outcome is the peer itself with nothing received, trusted or
not, and the sink sees its client close. End of file after some bytes but
before a signature is complete is not a header: an untrusted peer's outcome
carries what it sent, a trusted peer is refused (``proxy_missing``). End of
file inside a header is ``proxy_eof``.

Refusal reasons (`ProxyRefused.reason`, for metrics):

=====================  =================================================
``proxy_untrusted``    a PROXY signature from a peer not trusted
``proxy_malformed``    a trusted peer's header is not valid
``proxy_too_long``     v1 line past 107 bytes, v2 block past 1024 bytes
``proxy_eof``          end of file inside a header
``proxy_missing``      a trusted peer's connection starts with no header
=====================  =================================================
"""

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from sinks.proxy.wire import (
    NEED_DATA,
    HeaderStarted,
    LocalProtocolError,
    NoHeader,
    ProxyHeaderParser,
    RemoteProtocolError,
)

RefusalReason = Literal[
    "proxy_untrusted",
    "proxy_malformed",
    "proxy_too_long",
    "proxy_eof",
    "proxy_missing",
]
REFUSAL_REASONS: Final[tuple[RefusalReason, ...]] = (
    "proxy_untrusted",
    "proxy_malformed",
    "proxy_too_long",
    "proxy_eof",
    "proxy_missing",
)
"""Every `ProxyRefused.reason`, for metrics that list their labels up front."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyRefused(Exception):
    """
    The connection must be closed.

    ``str(exc)`` is a short reason, safe to log: it never quotes the peer's
    bytes. ``reason`` is a short machine label for metrics, one of
    `REFUSAL_REASONS`.
    """

    def __init__(self, reason: RefusalReason, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason: RefusalReason = reason


@dataclass(frozen=True, slots=True)
class GateOutcome:
    """
    Who the client is, and what it sent after the header.

    ``host``/``port`` come from the header when ``proxied``, else they are the
    peer's own, as given to the gate. ``rest`` is the start of the client's
    own protocol (possibly empty).
    """

    host: str
    port: int
    proxied: bool
    rest: bytes


class ProxyGate:
    """
    Reads the PROXY header a trusted peer must send, and refuses one from any
    other peer; see the module docstring.

    Args:
        peer_host: the connection's peer address, as the socket reports it.
        peer_port: the connection's peer port.
        trusted: networks of proxies that must send a header.
    """

    def __init__(
        self, peer_host: str, peer_port: int, trusted: Sequence[Network]
    ) -> None:
        self._peer_host = peer_host
        self._peer_port = peer_port
        self._trusted = is_trusted(peer_host, trusted)
        self._parser = ProxyHeaderParser()
        self._done = False
        self._saw_bytes = False

    @property
    def trusted(self) -> bool:
        """
        Whether the peer is a trusted proxy: it must send a PROXY header, and
        only it may.
        """
        return self._trusted

    def receive_data(self, data: bytes) -> GateOutcome | None:
        """
        Feed the connection's next bytes; ``b""`` means end of file.

        Returns:
            The outcome once the bytes so far decide it, else None (more
            bytes needed). After end of file it never returns None.

        Raises:
            ProxyRefused: the connection must be closed.
            LocalProtocolError: the gate already returned an outcome or raised.
        """
        if self._done:
            raise LocalProtocolError("the PROXY gate has already decided")
        self._saw_bytes = self._saw_bytes or bool(data)
        try:
            self._parser.receive_data(data)
            while True:
                event = self._parser.next_event()
                if event is NEED_DATA:
                    return None
                if isinstance(event, HeaderStarted):
                    if not self._trusted:
                        raise ProxyRefused(
                            "proxy_untrusted",
                            f"PROXY v{event.version} header from an untrusted peer",
                        )
                    continue
                if isinstance(event, NoHeader):
                    if self._trusted and self._saw_bytes:
                        raise ProxyRefused(
                            "proxy_missing", "no PROXY header from a trusted proxy"
                        )
                    return self._finish(self._peer_host, self._peer_port, False)
                if event.source is None:
                    return self._finish(self._peer_host, self._peer_port, False)
                return self._finish(event.source.host, event.source.port, True)
        except RemoteProtocolError as exc:
            self._done = True
            raise ProxyRefused(_REASONS[exc.reason], str(exc)) from None
        except ProxyRefused:
            self._done = True
            raise

    def _finish(self, host: str, port: int, proxied: bool) -> GateOutcome:
        self._done = True
        return GateOutcome(host, port, proxied, self._parser.trailing_data)


_REASONS: Final[dict[str, RefusalReason]] = {
    "malformed": "proxy_malformed",
    "too_long": "proxy_too_long",
    "eof": "proxy_eof",
}


def is_trusted(peer_host: str, trusted: Sequence[Network]) -> bool:
    """
    Whether ``peer_host`` lies in one of ``trusted``, IPv4-mapped IPv6 and IPv4
    forms of one address counting as the same; False for a non-IP peer.
    """
    try:
        address = ipaddress.ip_address(peer_host)
    except ValueError:
        return False
    forms: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
    else:
        forms.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    return any(form in network for form in forms for network in trusted)
