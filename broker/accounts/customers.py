"""
Who is asking: matching a connection's identity to a customer, and keeping
that answer right across a config reload.

`Customers` holds one `CustomerState` per configured customer (plus an
implicit, unlimited ``default`` when the config has none) and one `Client` per
identity seen. A reload builds the new customer list, carries the counters of
customers whose id stays, and re-points every live `Client` at the customer its
identity now maps to; sinks keep their `Client` objects and simply see the new
limits at their next grant.

Clients idle for an hour with no open connection are dropped from the index
(their buckets would be full anyway), but a client still held by a long-lived
connection stays reachable by reloads through a weak set.
"""

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from broker.accounts.clients import Client, CustomerState, Denied
from broker.accounts.config import (
    DEFAULT_CUSTOMER,
    CustomerConfig,
    validate_customers,
)
from broker.accounts.identity import (
    IdentityMap,
    Peer,
    PeerCertificate,
    hash_token,
    normalise_ip,
)
from broker.errors import ConfigError

MATCH_CACHE_SIZE = 65536
"""Addresses and uids whose customer is remembered between reloads."""
# Clients unseen for this long are forgotten (their buckets would be full anyway).
CLIENT_IDLE_FORGET = 3600.0

Ident = tuple[str, str | int]
"""How a client is matched: ``("ip", "10.1.2.3")``, ``("uid", 1001)``,
``("token", "sha256:...")``, ``("cert", "sha256:... CN=guest-7")``.

An HTTP request is matched by its bearer token if it has one (an unknown
token is refused, never passed on to the next rule), else by its verified
client certificate if a customer lists it, else by its address."""


@dataclass(frozen=True, slots=True)
class ReloadSummary:
    """
    What a reload changed in the customer list, for the operator's log.
    """

    added: tuple[str, ...]
    """Customer ids that are new."""
    removed: tuple[str, ...]
    """Customer ids that are gone; their clients fall to ``default``."""
    changed: tuple[str, ...]
    """Customer ids whose entry differs."""
    opens_default: bool
    """The ``default`` entry was removed or lost ``deny``: clients nobody
    else matches are now served (with no limits if it was removed)."""
    customers: int
    """Customers configured now."""

    @property
    def removes_all(self) -> bool:
        """
        Every configured customer is gone (a truncated file still parses).
        """
        return bool(self.removed) and self.customers == 0


class Customers:
    """
    The customer list in force and the clients identified under it.

    Args:
        customers: the ``[[customers]]`` list.

    Raises:
        ConfigError: ``validate_customers`` found problems.
    """

    def __init__(self, customers: Sequence[CustomerConfig]) -> None:
        self._states: dict[str, CustomerState] = {}
        self._identity = IdentityMap()
        self.clients: dict[str, Client] = {}
        """Clients by display key, as `identify` finds them again."""
        self._live: weakref.WeakSet[Client] = weakref.WeakSet()
        self._matched: dict[tuple[str, str | None, int | None], _Match] = {}
        """Who an address or uid was found to be, until the next reload: every
        EGD connection and HTTP request is identified, and matching parses
        the address and walks the networks."""
        self._apply(customers)

    def __iter__(self) -> Iterator[CustomerState]:
        return iter(list(self._states.values()))

    def get(self, customer_id: str) -> CustomerState | None:
        return self._states.get(customer_id)

    # ---- configuration -------------------------------------------------------

    def reload(self, customers: Sequence[CustomerConfig]) -> ReloadSummary:
        """
        Swap in a new customer list and re-bind every live client to the
        customer its identity now maps to.

        Returns:
            What changed.

        Raises:
            ConfigError: the new list has problems; the old one stays in force.
        """
        before = {
            state.id: state.config
            for state in self._states.values()
            if not state.implicit
        }
        self._apply(customers)
        after = {config.id: config for config in customers}
        summary = ReloadSummary(
            added=tuple(sorted(after.keys() - before.keys())),
            removed=tuple(sorted(before.keys() - after.keys())),
            changed=tuple(
                sorted(
                    key
                    for key in before.keys() & after.keys()
                    if before[key] != after[key]
                )
            ),
            opens_default=_opens(
                before.get(DEFAULT_CUSTOMER), after.get(DEFAULT_CUSTOMER)
            ),
            customers=len(after),
        )
        # Every live client, including ones `forget_idle` dropped from the
        # index while a long-lived connection still holds them.
        for client in list(self._live):
            client._customer = self._states[self._match(client._ident)]
            client._sync_bucket()
        return summary

    def _apply(self, customers: Sequence[CustomerConfig]) -> None:
        problems = validate_customers(customers)
        if problems:
            raise ConfigError("\n".join(problems))
        previous = self._states
        current: dict[str, CustomerState] = {}
        for config in customers:
            current[config.id] = _carried(previous.get(config.id), config)
        if DEFAULT_CUSTOMER not in current:
            implicit = CustomerState(CustomerConfig(id=DEFAULT_CUSTOMER), implicit=True)
            state = previous.get(DEFAULT_CUSTOMER)
            if state is not None:
                _carry(state, implicit)
            current[DEFAULT_CUSTOMER] = implicit
        self._states = current
        self._matched.clear()
        self._identity = IdentityMap.build(
            ((c.id, c.networks, c.uids, c.tokens) for c in customers),
            certs=((c.id, c.certs) for c in customers),
        )

    # ---- identification ------------------------------------------------------

    def identify(self, peer: Peer) -> Client | Denied:
        """
        Find the client for a connection's peer; see `Accounts.identify`.
        """
        if peer.transport == "http" and peer.token is not None:
            token_hash = hash_token(peer.token)
            if self._identity.by_token_hash(token_hash) is None:
                return Denied(None, "unknown bearer token")
            ident: Ident = ("token", token_hash)
            key = f"token:{token_hash.removeprefix('sha256:')[:12]}"
            customer = self._states[self._match(ident)]
        elif peer.cert is not None and self._identity.by_cert(peer.cert) is not None:
            ident = ("cert", _cert_value(peer.cert))
            key = f"cert:{peer.cert.fingerprint.removeprefix('sha256:')[:12]}"
            customer = self._states[self._match(ident)]
        else:
            probe = (peer.transport, peer.ip, peer.uid)
            match = self._matched.get(probe)
            if match is None:
                ident, key = _plain_ident(peer)
                match = _Match(ident, key, self._match(ident))
                if len(self._matched) >= MATCH_CACHE_SIZE:
                    self._matched.clear()  # a scan of many addresses: start over
                self._matched[probe] = match
            ident, key = match.ident, match.key
            customer = self._states[match.customer_id]
        if customer.config.deny:
            customer.denied += 1
            reason = (
                "no customer matches this client and the default customer is denied"
                if customer.id == DEFAULT_CUSTOMER
                else f"customer {customer.id!r} is denied"
            )
            return Denied(customer.id, reason)
        client = self.clients.get(key)
        if client is None:
            client = self.clients[key] = Client(key, peer.transport, ident, customer)
            self._live.add(client)
        return client

    def _match(self, ident: Ident) -> str:
        kind, value = ident
        found: str | None = None
        if kind == "ip" and isinstance(value, str):
            found = self._identity.by_ip(value)
        elif kind == "uid" and isinstance(value, int):
            found = self._identity.by_uid(value)
        elif kind == "token" and isinstance(value, str):
            found = self._identity.by_token_hash(value)
        elif kind == "cert" and isinstance(value, str):
            fingerprint, _, common_name = value.partition(" ")
            found = self._identity.by_cert(
                PeerCertificate(fingerprint, common_name.removeprefix("CN=") or None)
            )
        if found is None or found not in self._states:
            return DEFAULT_CUSTOMER
        return found

    def forget_idle(self, now: float) -> None:
        """
        Drop clients unseen for `CLIENT_IDLE_FORGET` seconds with no open
        connection from the index.
        """
        for key in [
            key
            for key, client in self.clients.items()
            if now - client.last_seen > CLIENT_IDLE_FORGET and not client.connections
        ]:
            del self.clients[key]


def _opens(before: CustomerConfig | None, after: CustomerConfig | None) -> bool:
    # An explicit default that denied or limited strangers, and now does not.
    if before is None:
        return False
    if after is None:
        return True
    return before.deny and not after.deny


def _cert_value(cert: PeerCertificate) -> str:
    # Both ways the certificate may be named, so a reload can match it
    # again by either: "sha256:<hex> CN=<name>" (a fingerprint has no space).
    return f"{cert.fingerprint} {cert.subject or ''}".rstrip()


class _Match(NamedTuple):
    ident: Ident
    key: str
    customer_id: str


def _plain_ident(peer: Peer) -> tuple[Ident, str]:
    # Unix peers are matched by uid, everyone else by source address.
    if peer.transport == "unix":
        uid: str | int = peer.uid if peer.uid is not None else "unknown"
        return ("uid", uid), f"uid:{uid}"
    address = "unknown"
    if peer.ip is not None:
        try:
            address = str(normalise_ip(peer.ip))
        except ValueError:
            address = peer.ip
    return ("ip", address), f"ip:{address}"


def _carried(state: CustomerState | None, config: CustomerConfig) -> CustomerState:
    if state is not None and not state.implicit:
        state.configure(config)
        return state
    # A new id starts from zero; an implicit default becoming explicit keeps
    # its counters.
    fresh = CustomerState(config)
    if state is not None:
        _carry(state, fresh)
    return fresh


def _carry(old: CustomerState, new: CustomerState) -> None:
    new.bytes_served = old.bytes_served
    new.throttled_seconds = old.throttled_seconds
    new.throttled_requests = old.throttled_requests
    new.denied = old.denied
    new.quota_key = old.quota_key
    new.quota_used = old.quota_used
