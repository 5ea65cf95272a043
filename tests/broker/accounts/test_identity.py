"""
Peer matching: most specific network, IPv4-mapped IPv6, uids, hashed tokens.
"""

import hashlib
import ipaddress

import pytest

from broker.accounts.identity import (
    IdentityMap,
    Peer,
    hash_token,
    normalise_ip,
    parse_network,
)


def build() -> IdentityMap:
    """
    A map with nested networks, an IPv6 network, a uid and a token.
    """
    return IdentityMap.build(
        [
            ("wide", [parse_network("10.0.0.0/8")], [], []),
            ("mid", [parse_network("10.1.0.0/16")], [1001], []),
            ("narrow", [parse_network("10.1.2.0/24")], [], [hash_token("s3cret")]),
            ("v6", [parse_network("2001:db8::/32")], [], []),
            ("host", [parse_network("10.1.2.3")], [], []),
        ]
    )


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.9.9.9", "wide"),
        ("10.1.9.9", "mid"),
        ("10.1.2.9", "narrow"),
        ("10.1.2.3", "host"),
        ("2001:db8::1", "v6"),
        ("192.0.2.1", None),
        ("::1", None),
        ("not an ip", None),
    ],
)
def test_most_specific_prefix_wins(ip: str, expected: str | None) -> None:
    """
    An address belongs to the customer with the longest matching prefix.
    """
    assert expected == build().by_ip(ip)


def test_ipv4_mapped_ipv6_matches_ipv4_networks() -> None:
    """
    A dual-stack socket's ``::ffff:10.1.2.9`` is the IPv4 peer 10.1.2.9.
    """
    assert "narrow" == build().by_ip("::ffff:10.1.2.9")
    assert ipaddress.IPv4Address("10.1.2.9") == normalise_ip("::ffff:10.1.2.9")


def test_ipv6_zone_is_ignored() -> None:
    """
    A link-local zone suffix does not stop a match.
    """
    identity = IdentityMap.build([("ll", [parse_network("fe80::/10")], [], [])])
    assert "ll" == identity.by_ip("fe80::1%eth0")


def test_uid() -> None:
    """
    Unix peers match by uid only.
    """
    assert "mid" == build().by_uid(1001)
    assert None is build().by_uid(0)


def test_hash_token_format() -> None:
    """
    Tokens hash to ``sha256:`` + the hex SHA-256 of their UTF-8 bytes.
    """
    assert "sha256:" + hashlib.sha256(b"test").hexdigest() == hash_token("test")


def test_token_lookup() -> None:
    """
    A presented token finds its customer by hash; a wrong one finds nothing.
    """
    identity = build()
    assert "narrow" == identity.by_token("s3cret")
    assert None is identity.by_token("s3cret ")
    assert "narrow" == identity.by_token_hash(hash_token("s3cret").upper())


def test_parse_network_refuses_host_bits() -> None:
    """
    ``10.1.2.3/16`` is refused as a likely typo.
    """
    with pytest.raises(ValueError, match="host bits"):
        parse_network("10.1.2.3/16")


def test_parse_network_unwraps_mapped_networks() -> None:
    """
    ``::ffff:10.1.0.0/112`` is the IPv4 network 10.1.0.0/16.
    """
    assert ipaddress.IPv4Network("10.1.0.0/16") == parse_network("::ffff:10.1.0.0/112")


def test_peer_repr_hides_token() -> None:
    """
    Logging a peer never shows its token.
    """
    peer = Peer("http", ip="10.0.0.1", token="hunter2")  # noqa: S106 - made up
    assert "hunter2" not in repr(peer)
