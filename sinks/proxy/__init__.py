"""
The PROXY protocol (v1 and v2, as haproxy's ``send-proxy`` / ``send-proxy-v2``
send it) in front of any TCP sink: `ProxyGate` reads the header that a trusted
load balancer must put before the client's bytes and says who the client is;
any other peer is its own client and may send no header. ``wire`` is the
I/O-free header parser, ``gate`` the trust decision.
"""

from sinks.proxy.gate import (
    REFUSAL_REASONS,
    GateOutcome,
    ProxyGate,
    ProxyRefused,
    RefusalReason,
)

__all__ = [
    "REFUSAL_REASONS",
    "GateOutcome",
    "ProxyGate",
    "ProxyRefused",
    "RefusalReason",
]
