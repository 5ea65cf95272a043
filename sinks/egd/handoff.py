"""
What an EGD connection carries from one broker to the next across a takeover
(`broker.handover`), as data: no sockets, no clock.

A connection is handed over once it has answered everything it read and its
replies have left user space (`HandoverState.READY`). The successor then needs
three things besides the fd (`Carried`):

* the sink it belongs to;
* who the client is (`broker.accounts.Peer`): for a client behind a trusted
  proxy the address came in a PROXY header the successor cannot read again.
  None for a connection still waiting for its PROXY header (it has sent
  nothing yet), which the successor gates afresh;
* the request bytes read but not yet answered: the start of a request cut in
  two (``02`` without its count), and, when the old broker gave up waiting (a
  blocking read on an empty pool), the unanswered requests re-encoded, a
  half-served ``02 NN`` as ``02`` and what is left of it.

The successor feeds those bytes to the connection before anything the client
sent meanwhile (which waited in the kernel's receive queue), so requests keep
their order and every one is answered exactly once.
"""

import base64
import enum
from dataclasses import dataclass
from typing import Any, Final

from broker.accounts import Peer
from sinks.egd.wire import (
    Event,
    GetLevel,
    GetPid,
    ReadBlocking,
    ReadNonBlocking,
    WriteEntropy,
)

MAX_CARRIED: Final = 16 * 1024
"""Unanswered request bytes one connection may carry over. A connection
that answered what it read carries at most the start of one request; only a
client that flooded requests behind a read the pool could not serve has
more, and it is closed instead."""


class HandoverState(enum.Enum):
    """
    Where a held connection is on its way to the successor.
    """

    READY = "ready"
    """Everything read is answered and written: hand it over now."""
    BUSY = "busy"
    """Requests are still being answered (or a PROXY header is incomplete)."""
    UNFLUSHED = "unflushed"
    """Replies still wait in user space for the client to read them."""
    CLOSING = "closing"
    """Going away anyway: nothing to hand over."""


def encode_request(event: Event) -> bytes:
    """
    The bytes a client sends for ``event`` (the inverse of the parser).
    """
    match event:
        case GetLevel():
            return b"\x00"
        case ReadNonBlocking(count=count):
            return bytes([0x01, count])
        case ReadBlocking(count=count):
            return bytes([0x02, count])
        case WriteEntropy(bits=bits, data=data):
            return bytes([0x03]) + bits.to_bytes(2, "big") + bytes([len(data)]) + data
        case GetPid():
            return b"\x04"
    raise TypeError(f"not an EGD request: {event!r}")


@dataclass(frozen=True, slots=True)
class Carried:
    """
    One handed-over EGD connection, apart from its fd.
    """

    sink: str
    peer: Peer | None
    shown: str
    """How logs showed the client (``10.0.0.5:4711``, ``unix``)."""
    pending: bytes = b""

    def to_json(self) -> dict[str, Any]:
        peer = self.peer
        return {
            "sink": self.sink,
            "peer": None
            if peer is None
            else {"transport": peer.transport, "ip": peer.ip, "uid": peer.uid},
            "shown": self.shown,
            "pending": base64.b64encode(self.pending).decode("ascii"),
        }

    @classmethod
    def from_json(cls, document: Any) -> "Carried":
        """
        Raises:
            ValueError: ``document`` is not what `to_json` writes.
        """
        try:
            sink = document["sink"]
            shown = document["shown"]
            pending = base64.b64decode(document["pending"], validate=True)
            who = document["peer"]
            peer = None
            if who is not None:
                transport = who["transport"]
                ip, uid = who["ip"], who["uid"]
                if transport not in ("tcp", "unix"):
                    raise ValueError(f"transport {transport!r}")
                if not (ip is None or isinstance(ip, str)) or not (
                    uid is None or isinstance(uid, int)
                ):
                    raise ValueError("peer ip or uid")
                peer = Peer(transport, ip=ip, uid=uid)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a handed-over EGD connection: {exc}") from None
        if not isinstance(sink, str) or not isinstance(shown, str):
            raise ValueError("not a handed-over EGD connection: sink or shown")
        return cls(sink=sink, peer=peer, shown=shown, pending=pending)
