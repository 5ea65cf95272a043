"""
Who is asking: turn a connection's peer (IP, Unix uid, bearer token, client
certificate) into the id of the customer that owns it.

Networks resolve to the most specific prefix that contains the address, so a
customer's ``10.1.2.0/24`` wins over another's ``10.1.0.0/16``. IPv4-mapped IPv6
addresses (``::ffff:10.1.2.3``, what a dual-stack socket reports for an IPv4
peer) are matched as the IPv4 address they carry. Tokens are never stored: the
config holds ``sha256:<hex>`` hashes and a presented token is hashed and
compared against every stored hash in constant time. Client certificates,
verified by the TLS handshake before they get here, match by the SHA-256 of
their DER form first and by ``CN=<subject common name>`` second.
"""

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Not a secret: the tag in front of a token hash.
TOKEN_PREFIX = "sha256:"  # noqa: S105


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """
    A client certificate verified during the TLS handshake.
    """

    fingerprint: str
    """``sha256:<hex>`` of the DER certificate."""
    common_name: str | None = None
    """The subject's CN, if it has one."""

    @property
    def subject(self) -> str | None:
        """
        The subject as a customer's ``certs`` entry names it: ``CN=<name>``.
        """
        return None if self.common_name is None else f"CN={self.common_name}"


@dataclass(frozen=True, slots=True)
class Peer:
    """
    What a sink knows about the other end of a connection.

    ``ip`` for TCP and HTTP peers, ``uid`` (SO_PEERCRED) for Unix-socket peers,
    ``token`` for an HTTP ``Authorization: Bearer`` header, ``cert`` for a client
    certificate verified by an HTTPS listener. The token is kept out
    of ``repr`` so it cannot leak into logs.
    """

    transport: Literal["tcp", "unix", "http"]
    ip: str | None = None
    uid: int | None = None
    token: str | None = field(default=None, repr=False)
    cert: PeerCertificate | None = None


def hash_token(token: str) -> str:
    """
    The form a token takes in the config: ``"sha256:"`` + SHA-256 hex digest of
    its UTF-8 bytes.
    """
    return TOKEN_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def normalise_ip(text: str) -> IPAddress:
    """
    Parse a peer address, dropping an IPv6 zone and unwrapping IPv4-mapped IPv6.

    Raises:
        ValueError: not an IP address.
    """
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def parse_network(text: str) -> IPNetwork:
    """
    Parse a CIDR (a bare address is a /32 or /128). Host bits must be zero, since
    ``10.1.2.3/16`` is more likely a typo than a wish. ``::ffff:a.b.c.d/N``
    networks (N >= 96) become the IPv4 network they describe.

    Raises:
        ValueError: not a network.
    """
    network = ipaddress.ip_network(text.strip(), strict=True)
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= 96
        and network.network_address.ipv4_mapped is not None
    ):
        return ipaddress.IPv4Network(
            (network.network_address.ipv4_mapped, network.prefixlen - 96)
        )
    return network


class IdentityMap:
    """
    Lookup tables from networks, uids and token hashes to customer ids.

    Build it from validated config (see ``validate_customers``): a key listed by
    two customers is refused there, so here the last one would silently win.
    """

    def __init__(self) -> None:
        # version -> prefix length -> network address as int -> customer id;
        # a longest-prefix match is at most 33 (or 129) dict lookups.
        self._networks: dict[int, dict[int, dict[int, str]]] = {4: {}, 6: {}}
        self._prefixes: dict[int, list[int]] = {4: [], 6: []}
        self._uids: dict[int, str] = {}
        self._tokens: list[tuple[bytes, str]] = []
        self._certs: dict[str, str] = {}

    def add_network(self, network: IPNetwork, customer_id: str) -> None:
        table = self._networks[network.version].setdefault(network.prefixlen, {})
        table[int(network.network_address)] = customer_id
        self._prefixes[network.version] = sorted(
            self._networks[network.version], reverse=True
        )

    def add_uid(self, uid: int, customer_id: str) -> None:
        self._uids[uid] = customer_id

    def add_token_hash(self, token_hash: str, customer_id: str) -> None:
        self._tokens.append((token_hash.lower().encode("ascii"), customer_id))

    def add_cert(self, cert: str, customer_id: str) -> None:
        """
        ``cert`` is a validated ``certs`` entry: ``sha256:<hex>`` or ``CN=<name>``.
        """
        self._certs[cert] = customer_id

    def by_cert(self, cert: PeerCertificate) -> str | None:
        """
        Customer owning a verified client certificate: by its fingerprint
        first (one certificate), then by its subject CN.
        """
        found = self._certs.get(cert.fingerprint)
        if found is None and cert.subject is not None:
            found = self._certs.get(cert.subject)
        return found

    def by_ip(self, ip: str) -> str | None:
        """
        Customer owning the most specific network containing ``ip``, if any.
        """
        try:
            address = normalise_ip(ip)
        except ValueError:
            return None
        value = int(address)
        bits = address.max_prefixlen
        tables = self._networks[address.version]
        for prefix in self._prefixes[address.version]:
            mask = ((1 << prefix) - 1) << (bits - prefix) if prefix else 0
            found = tables[prefix].get(value & mask)
            if found is not None:
                return found
        return None

    def by_uid(self, uid: int) -> str | None:
        return self._uids.get(uid)

    def by_token_hash(self, token_hash: str) -> str | None:
        """
        Customer owning ``token_hash``, compared against every stored hash in
        constant time (no early exit, so timing says nothing about which or
        whether one matched).
        """
        presented = token_hash.lower().encode("ascii", "replace")
        found: str | None = None
        for stored, customer_id in self._tokens:
            if hmac.compare_digest(stored, presented):
                found = customer_id
        return found

    def by_token(self, token: str) -> str | None:
        return self.by_token_hash(hash_token(token))

    @classmethod
    def build(
        cls,
        entries: Iterable[
            tuple[str, Iterable[IPNetwork], Iterable[int], Iterable[str]]
        ],
        certs: Iterable[tuple[str, Iterable[str]]] = (),
    ) -> "IdentityMap":
        """
        Build from ``(customer_id, networks, uids, token_hashes)`` tuples and
        ``(customer_id, certs)`` pairs.
        """
        identity = cls()
        for customer_id, cert_ids in certs:
            for cert in cert_ids:
                identity.add_cert(cert, customer_id)
        for customer_id, networks, uids, tokens in entries:
            for network in networks:
                identity.add_network(network, customer_id)
            for uid in uids:
                identity.add_uid(uid, customer_id)
            for token_hash in tokens:
                identity.add_token_hash(token_hash, customer_id)
        return identity
