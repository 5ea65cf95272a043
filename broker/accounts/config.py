"""
Config models for accounts: the ``[accounts]`` table (where counters live) and
each ``[[customers]]`` entry (who a customer is and what it may draw).

Customers are a top-level list in the TOML, beside ``[accounts]``. Checks that
span customers (a network, uid or token listed twice; an id used twice) are in
`validate_customers`, which returns one ``customers[i].key[j]: reason`` line per
problem; the top-level config's model validator calls it, as it does for sink
addresses.
"""

import ipaddress
import re
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer

from broker.accounts.identity import TOKEN_PREFIX, IPNetwork, parse_network
from broker.accounts.periods import QuotaSpec
from broker.configbase import ByteRate, Duration, Name, Size, StrictModel

DEFAULT_CUSTOMER = "default"

_TOKEN_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def _parse_network(value: object) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError("a network is a string such as '10.1.0.0/16'")
    try:
        return parse_network(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a network: {exc}") from None


def _check_token(value: str) -> str:
    value = value.strip().lower()
    if not _TOKEN_RE.match(value):
        raise ValueError(
            f"tokens are stored hashed, as '{TOKEN_PREFIX}' and 64 hex digits "
            "(the SHA-256 of the token); never put the token itself here"
        )
    return value


Network = Annotated[IPNetwork, BeforeValidator(_parse_network), PlainSerializer(str)]
TokenHash = Annotated[str, AfterValidator(_check_token)]


class CustomerConfig(StrictModel):
    """
    One ``[[customers]]`` entry.
    """

    id: Name = Field(
        description="customer id used in status, metrics and Redis keys; "
        "'default' catches every client no other customer matches"
    )
    networks: list[Network] = Field(
        default_factory=list,
        description="CIDRs whose EGD/TCP and HTTP peers belong to this customer; "
        "the most specific prefix wins across customers",
    )
    uids: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        description="Unix-socket peer uids (SO_PEERCRED) that belong to this customer",
    )
    tokens: list[TokenHash] = Field(
        default_factory=list,
        description="HTTP bearer tokens of this customer, each stored as "
        "'sha256:<hex>' of the token",
    )
    deny: bool = Field(
        default=False,
        description="refuse this customer's clients (on 'default': refuse every "
        "client no customer matches)",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1_000_000,
        description="share of scarce output relative to other customers' weights",
    )
    client_rate: ByteRate | None = Field(
        default=None,
        description="rate each client (one IP, uid or token) may draw; unset: "
        "no per-client rate",
    )
    client_burst: Size | None = Field(
        default=None,
        ge=1,
        description="bytes a client may draw at once above client_rate "
        "(default: one second of client_rate)",
    )
    rate: ByteRate | None = Field(
        default=None,
        description="rate all of this customer's clients together may draw; "
        "unset: no customer-wide rate",
    )
    burst: Size | None = Field(
        default=None,
        ge=1,
        description="bytes the customer may draw at once above rate "
        "(default: one second of rate)",
    )
    quota: QuotaSpec | None = Field(
        default=None,
        description="bytes per calendar period in UTC: '200 MiB/day', "
        "'5 GiB/month' (also hour, week = ISO week from Monday)",
    )

    @property
    def client_bucket(self) -> tuple[float, int] | None:
        """
        ``(bytes per second, burst)`` of each client's bucket, or None.
        """
        if self.client_rate is None:
            return None
        rate = self.client_rate.per_second
        return rate, self.client_burst or max(1, round(rate))

    @property
    def customer_bucket(self) -> tuple[float, int] | None:
        """
        ``(bytes per second, burst)`` of the customer-wide bucket, or None.
        """
        if self.rate is None:
            return None
        rate = self.rate.per_second
        return rate, self.burst or max(1, round(rate))


class AccountsConfig(StrictModel):
    """
    ``[accounts]``: where counters live and what happens when Redis is away.
    """

    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: one broker, counters saved in the state dir; "
        "redis: brokers share budgets and quotas through Redis",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        pattern=r"^(redis|rediss|unix)://",
        description="Redis to share counters through (backend = 'redis')",
    )
    redis_prefix: str = Field(
        default="ebroker:",
        max_length=64,
        description="prefix of every Redis key this broker writes",
    )
    redis_timeout: Duration = Field(
        default=0.5,
        gt=0,
        description="seconds a Redis command may take before Redis counts as "
        "unreachable",
    )
    redis_retry_interval: Duration = Field(
        default=2.0,
        gt=0,
        description="while Redis is unreachable, seconds between reconnect attempts",
    )
    on_redis_failure: Literal["fail_open", "fail_closed"] = Field(
        default="fail_open",
        description="fail_open: keep serving under this broker's local limits and "
        "resync when Redis returns; fail_closed: serve nothing until it returns",
    )
    persist_interval: Duration = Field(
        default=5.0,
        gt=0,
        description="seconds between housekeeping rounds: rewriting the "
        "counters in the state dir (memory backend; grants are made durable "
        "before they return regardless), and Redis health checks",
    )


def validate_customers(customers: Sequence[CustomerConfig]) -> list[str]:
    """
    Check what no single customer can: ids, networks, uids and tokens must each
    belong to one customer, and bursts need a rate.

    Overlapping networks are fine (the most specific wins); the *same* network
    twice is ambiguous.

    Returns:
        One ``customers[i].key[j]: reason`` line per problem; empty if none.
    """
    problems: list[str] = []
    ids: dict[str, int] = {}
    networks: dict[IPNetwork, str] = {}
    uids: dict[int, str] = {}
    tokens: dict[str, str] = {}
    for index, customer in enumerate(customers):
        where = f"customers[{index}]"
        if customer.id in ids:
            problems.append(
                f"{where}.id: {customer.id!r} is already used by "
                f"customers[{ids[customer.id]}]"
            )
        ids.setdefault(customer.id, index)
        for position, network in enumerate(customer.networks):
            path = f"{where}.networks[{position}]"
            if network in networks:
                problems.append(
                    f"{path}: {network} is also listed by {networks[network]}"
                )
            networks.setdefault(network, path)
        for position, uid in enumerate(customer.uids):
            path = f"{where}.uids[{position}]"
            if uid in uids:
                problems.append(f"{path}: uid {uid} is also listed by {uids[uid]}")
            uids.setdefault(uid, path)
        for position, token in enumerate(customer.tokens):
            path = f"{where}.tokens[{position}]"
            if token in tokens:
                # Say where, never what: even a hash is not echoed back.
                problems.append(f"{path}: this token is also listed by {tokens[token]}")
            tokens.setdefault(token, path)
        if customer.client_burst is not None and customer.client_rate is None:
            problems.append(f"{where}.client_burst: needs client_rate")
        if customer.burst is not None and customer.rate is None:
            problems.append(f"{where}.burst: needs rate")
    return problems
