"""
Client certificates as customer identities: the ``certs`` entries accepted at
load, a certificate listed by two customers refused, and matching by
fingerprint, then subject CN, below a bearer token and above the address.
"""

import pytest
from pydantic import ValidationError

from broker.accounts import Accounts, AccountsConfig, Client, CustomerConfig, Peer
from broker.accounts.config import validate_customers
from broker.accounts.identity import PeerCertificate, hash_token
from broker.errors import ConfigError

FINGERPRINT = "sha256:" + "ab" * 32
TOKEN = "s3cret"  # noqa: S105  # a test token, not a secret
OTHER = "sha256:" + "cd" * 32


def customer(id: str, **keys: object) -> CustomerConfig:
    return CustomerConfig.model_validate({"id": id, **keys})


def accounts(*customers: CustomerConfig) -> Accounts:
    return Accounts(AccountsConfig(), list(customers))


def customer_of(accounts: Accounts, peer: Peer) -> str | None:
    found = accounts.identify(peer)
    return found.customer_id if isinstance(found, Client) else None


# ---- config -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        (FINGERPRINT, FINGERPRINT),
        (FINGERPRINT.upper().replace("SHA256", "sha256"), FINGERPRINT),
        ("SHA256:" + ":".join(["AB"] * 32), FINGERPRINT),
        ("CN=guest-7", "CN=guest-7"),
        (" CN=guest 7 ", "CN=guest 7"),
    ],
)
def test_cert_entries_are_normalised(written: str, stored: str) -> None:
    """
    A fingerprint in any case, with or without colons (openssl's way), is
    stored as lowercase hex; a CN entry is kept as written.
    """
    assert [stored] == customer("a", certs=[written]).certs


@pytest.mark.parametrize(
    "written",
    ["sha256:abc", "sha1:" + "ab" * 20, "guest-7", "CN=", "CN=  ", "O=acme", "CN=a\tb"],
)
def test_malformed_cert_entries_are_refused(written: str) -> None:
    """
    Anything but a SHA-256 fingerprint or a ``CN=`` subject is a config error
    saying what is expected.
    """
    with pytest.raises(ValidationError, match="sha256:' and the 64 hex digits"):
        customer("a", certs=[written])


def test_cert_listed_by_two_customers_is_refused() -> None:
    """
    The same fingerprint or CN in two customers is ambiguous: each repeat is
    reported at its place, naming the first.
    """
    problems = validate_customers(
        [
            customer("a", certs=[FINGERPRINT, "CN=guest-7"]),
            customer("b", certs=["CN=guest-8", "SHA256:" + "AB" * 32]),
            customer("c", certs=["CN=guest-7"]),
        ]
    )
    assert [
        f"customers[1].certs[1]: {FINGERPRINT} is also listed by customers[0].certs[0]",
        "customers[2].certs[0]: CN=guest-7 is also listed by customers[0].certs[1]",
    ] == problems
    with pytest.raises(ConfigError):
        accounts(customer("a", certs=["CN=x"]), customer("b", certs=["CN=x"]))


# ---- matching ---------------------------------------------------------------


def test_certificate_matches_by_fingerprint_before_cn() -> None:
    """
    A certificate whose fingerprint one customer lists belongs to it even
    when another customer lists its CN; otherwise its CN decides.
    """
    acc = accounts(
        customer("pinned", certs=[FINGERPRINT]),
        customer("by-name", certs=["CN=guest-7"]),
    )
    pinned = Peer("http", ip="10.0.0.1", cert=PeerCertificate(FINGERPRINT, "guest-7"))
    named = Peer("http", ip="10.0.0.1", cert=PeerCertificate(OTHER, "guest-7"))
    assert ("pinned", "by-name") == (customer_of(acc, pinned), customer_of(acc, named))


def test_precedence_is_token_then_certificate_then_address() -> None:
    """
    A bearer token decides over a certificate; a listed certificate over
    the address; an unlisted certificate leaves the address to decide.
    """
    acc = accounts(
        customer("by-token", tokens=[hash_token(TOKEN)]),
        customer("by-cert", certs=["CN=guest-7"]),
        customer("by-address", networks=["10.0.0.0/8"]),
    )
    cert = PeerCertificate(FINGERPRINT, "guest-7")
    unlisted = PeerCertificate(OTHER, "stranger")
    assert [
        "by-token",
        "by-cert",
        "by-address",
        "by-address",
    ] == [
        customer_of(acc, Peer("http", ip="10.0.0.1", token=TOKEN, cert=cert)),
        customer_of(acc, Peer("http", ip="10.0.0.1", cert=cert)),
        customer_of(acc, Peer("http", ip="10.0.0.1", cert=unlisted)),
        customer_of(acc, Peer("http", ip="10.0.0.1")),
    ]


def test_each_certificate_is_its_own_client() -> None:
    """
    Two certificates of one customer behind one address are two clients,
    each with its own per-client bucket; the same certificate from another
    address is the same client.
    """
    acc = accounts(customer("fleet", certs=["CN=guest-7"]))
    one = acc.identify(
        Peer("http", ip="10.0.0.1", cert=PeerCertificate(FINGERPRINT, "guest-7"))
    )
    two = acc.identify(
        Peer("http", ip="10.0.0.1", cert=PeerCertificate(OTHER, "guest-7"))
    )
    again = acc.identify(
        Peer("http", ip="10.0.0.2", cert=PeerCertificate(FINGERPRINT, "guest-7"))
    )
    assert isinstance(one, Client)
    assert isinstance(two, Client)
    assert (False, True) == (one is two, one is again)
    assert one.key.startswith("cert:")


def test_denied_customer_refuses_its_certificates() -> None:
    """
    A certificate naming a denied customer is refused, not passed on to the
    address.
    """
    acc = accounts(
        customer("blocked", certs=["CN=guest-7"], deny=True),
        customer("by-address", networks=["10.0.0.0/8"]),
    )
    found = acc.identify(
        Peer("http", ip="10.0.0.1", cert=PeerCertificate(FINGERPRINT, "guest-7"))
    )
    assert "blocked" == found.customer_id
    assert not isinstance(found, Client)


def test_reload_moves_a_live_certificate_client() -> None:
    """
    After a reload that moves a CN to another customer, the client object a
    connection holds belongs to the new customer.
    """
    acc = accounts(customer("a", certs=["CN=guest-7"]), customer("b"))
    client = acc.identify(
        Peer("http", ip="10.0.0.1", cert=PeerCertificate(FINGERPRINT, "guest-7"))
    )
    assert isinstance(client, Client)
    acc.reload([customer("a"), customer("b", certs=["CN=guest-7"])])
    assert "b" == client.customer_id
