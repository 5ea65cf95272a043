"""
Config models for accounts: the ``[accounts]`` table (where counters live) and
each ``[[customers]]`` entry (who a customer is and what it may draw).

Customers are a top-level list in the TOML, beside ``[accounts]``. Checks that
span customers (a network, uid, token or certificate listed twice; an id used
twice) are in
`validate_customers`, which returns one ``customers[i].key[j]: reason`` line per
problem; the top-level config's model validator calls it, as it does for sink
addresses.
"""

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from broker.accounts.identity import TOKEN_PREFIX, IPNetwork, parse_network
from broker.accounts.periods import QuotaSpec
from broker.configbase import ByteRate, Duration, Name, Size, StrictModel

DEFAULT_CUSTOMER = "default"

_TOKEN_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


def _check_cert(value: str) -> str:
    value = value.strip()
    tag, sep, rest = value.partition(":")
    if sep and tag.lower() == "sha256":
        # openssl x509 -fingerprint -sha256 prints "AB:CD:...": accept that too.
        fingerprint = "sha256:" + rest.replace(":", "").lower()
        if _FINGERPRINT_RE.match(fingerprint):
            return fingerprint
    elif value.startswith("CN="):
        name = value.removeprefix("CN=")
        if name.strip() and name.isprintable():
            return value
    raise ValueError(
        "a client certificate is 'sha256:' and the 64 hex digits of the SHA-256 "
        "of its DER form (openssl x509 -noout -fingerprint -sha256), or "
        "'CN=<subject common name>'"
    )


def _check_sentinel(value: str) -> str:
    value = value.strip()
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{value!r} is not HOST:PORT (such as '10.0.0.5:26379' or '[::1]:26379')"
        )
    return value


def split_sentinel(address: str) -> tuple[str, int]:
    """
    ``"HOST:PORT"`` (a validated ``redis_sentinels`` entry) as ``(host, port)``.
    """
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.match(value):
        raise ValueError(
            "the name of an environment variable (letters, digits, '_'); "
            "never put the password itself here"
        )
    return value


Network = Annotated[IPNetwork, BeforeValidator(_parse_network), PlainSerializer(str)]
TokenHash = Annotated[str, AfterValidator(_check_token)]
CertId = Annotated[str, AfterValidator(_check_cert)]
SentinelAddress = Annotated[str, AfterValidator(_check_sentinel)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]


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
    certs: list[CertId] = Field(
        default_factory=list,
        description="HTTPS client certificates of this customer: "
        "'sha256:<hex>' of the DER certificate, or 'CN=<name>' for any "
        "certificate with that subject CN from the sink's tls_client_ca",
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
        default=DEFAULT_REDIS_URL,
        pattern=r"^(redis|rediss|unix)://",
        description="Redis to share counters through (backend = 'redis'); with "
        "redis_sentinels only its scheme and database count, never a host",
    )
    redis_sentinels: list[SentinelAddress] = Field(
        default_factory=list,
        description="HOST:PORT of each Redis Sentinel watching the primary; "
        "when set, the broker asks them where the primary is and follows "
        "failovers (instead of redis_url's host)",
    )
    redis_sentinel_service: str | None = Field(
        default=None,
        min_length=1,
        description="the sentinels' name for the primary (their 'sentinel "
        "monitor NAME ...'); required with redis_sentinels",
    )
    redis_password_file: Path | None = Field(
        default=None,
        description="file holding the Redis password (read at start, trailing "
        "newline dropped); never logged",
    )
    redis_password_env: EnvName | None = Field(
        default=None,
        description="environment variable holding the Redis password; never logged",
    )
    redis_sentinel_auth: bool = Field(
        default=False,
        description="send the Redis password to the sentinels too (sentinels "
        "run with 'requirepass' set to the same password)",
    )
    redis_min_replicas: int = Field(
        default=0,
        ge=0,
        le=16,
        description="replicas that must acknowledge every quota write (Redis "
        "WAIT) before it counts; fewer within redis_replica_timeout is a Redis "
        "failure. 0: do not wait (a failover may lose the last writes)",
    )
    redis_replica_timeout: Duration = Field(
        default=0.1,
        gt=0,
        description="how long a quota write waits for redis_min_replicas "
        "acknowledgements; shorter than redis_timeout",
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

    @model_validator(mode="after")
    def _check_redis_settings(self) -> Self:
        # Each problem is raised at its own key, so the operator reads
        # "accounts.redis_url: ..." rather than a reason without a place.
        problems = _redis_problems(self)
        if problems:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("redis_settings", reason),
                        loc=(key,),
                        input=getattr(self, key),
                    )
                    for key, reason in problems
                ],
            )
        return self


def _host_of(url: urllib.parse.SplitResult) -> tuple[str, int | None]:
    try:
        port = url.port
    except ValueError:
        return url.netloc, None  # not a port: never the default host either
    return url.hostname or "127.0.0.1", port or 6379


def _redis_problems(config: AccountsConfig) -> list[tuple[str, str]]:
    """
    The ``(key, reason)`` pairs that no single Redis key can check alone.
    """
    problems: list[tuple[str, str]] = []
    url = urllib.parse.urlsplit(config.redis_url)
    has_url_password = url.password is not None
    if config.redis_sentinels:
        default = urllib.parse.urlsplit(DEFAULT_REDIS_URL)
        if url.scheme == "unix":
            problems.append(
                ("redis_url", "a unix socket cannot be used with redis_sentinels")
            )
        elif _host_of(url) != _host_of(default):
            problems.append(
                (
                    "redis_url",
                    "names a host, but with redis_sentinels the sentinels say "
                    "where the primary is; leave redis_url unset or give only "
                    "the scheme and database ('rediss:///0')",
                )
            )
        if has_url_password:
            problems.append(
                (
                    "redis_url",
                    "holds a password; with redis_sentinels give it in "
                    "redis_password_file or redis_password_env",
                )
            )
        if config.redis_sentinel_service is None:
            problems.append(
                (
                    "redis_sentinel_service",
                    "required with redis_sentinels (the name in the sentinels' "
                    "'sentinel monitor NAME ...')",
                )
            )
        seen: set[tuple[str, int]] = set()
        for address in config.redis_sentinels:
            if split_sentinel(address) in seen:
                problems.append(("redis_sentinels", f"{address!r} is listed twice"))
            seen.add(split_sentinel(address))
    else:
        if config.redis_sentinel_service is not None:
            problems.append(("redis_sentinel_service", "needs redis_sentinels"))
        if config.redis_sentinel_auth:
            problems.append(("redis_sentinel_auth", "needs redis_sentinels"))
    if config.redis_password_file is not None and config.redis_password_env:
        problems.append(
            (
                "redis_password_env",
                "give the password in redis_password_file or redis_password_env, "
                "not both",
            )
        )
    has_password = bool(config.redis_password_file or config.redis_password_env)
    if has_password and has_url_password and not config.redis_sentinels:
        problems.append(
            (
                "redis_url",
                "holds a password as well as redis_password_file or "
                "redis_password_env; keep it out of the URL",
            )
        )
    if config.redis_sentinel_auth and not has_password:
        problems.append(
            (
                "redis_sentinel_auth",
                "needs redis_password_file or redis_password_env",
            )
        )
    if config.redis_min_replicas and (
        config.redis_replica_timeout >= config.redis_timeout
    ):
        problems.append(
            (
                "redis_replica_timeout",
                f"must be shorter than redis_timeout ({config.redis_timeout:g} s), "
                "or every wait for replicas looks like an unreachable Redis",
            )
        )
    return problems


def validate_customers(customers: Sequence[CustomerConfig]) -> list[str]:
    """
    Check what no single customer can: ids, networks, uids, tokens and
    client certificates must each belong to one customer, and bursts need a
    rate.

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
    certs: dict[str, str] = {}
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
        for position, cert in enumerate(customer.certs):
            path = f"{where}.certs[{position}]"
            if cert in certs:
                problems.append(f"{path}: {cert} is also listed by {certs[cert]}")
            certs.setdefault(cert, path)
        if customer.client_burst is not None and customer.client_rate is None:
            problems.append(f"{where}.client_burst: needs client_rate")
        if customer.burst is not None and customer.rate is None:
            problems.append(f"{where}.burst: needs rate")
    return problems
