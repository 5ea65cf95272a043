"""
Clients and customers as the `Accounts` facade tracks them, and what it answers.

A `Client` is one connection identity (source IP, Unix uid, or bearer token).
It points at its customer's `CustomerState`; a config reload re-points it, which
is how existing connections pick up new limits without new objects.
"""

from collections import deque
from dataclasses import dataclass
from typing import Literal

from broker.accounts.backend import BucketLimit, QuotaLimit
from broker.accounts.bucket import TokenBucket
from broker.accounts.config import CustomerConfig
from broker.accounts.periods import period_bounds, period_key
from broker.errors import BrokerError

LimitName = Literal["client_rate", "customer_rate", "quota", "denied", "unavailable"]

# Charges a client remembers for refunds. Sinks hand each grant back once, so
# this only needs to cover the grants of one client in flight at a time; an
# older charge that falls off is refunded to the client's current customer.
_CHARGES_KEPT = 64


class AccessDenied(BrokerError):
    """
    The client's customer is denied (``deny = true``), e.g. after a reload.
    """


@dataclass(frozen=True, slots=True)
class Denied:
    """
    `identify` refused the peer.
    """

    customer_id: str | None
    """The denying customer, or None for an unknown bearer token."""
    reason: str


@dataclass(frozen=True, slots=True)
class Grant:
    """
    The answer to one `Accounts.grant`, with what an HTTP sink needs for its
    ``429``/``403`` answers and ``RateLimit-*`` headers.
    """

    granted: int
    """Bytes the caller may withdraw now (0..wanted)."""
    retry_after: float
    """Seconds until more of the request could be granted; 0 if all was."""
    limit: LimitName | None
    """Which limit cut the request short; None if it was granted in full."""
    reset_at: float | None
    """Unix time the reported window is whole again: the quota period's end when
    ``limit`` is "quota", else when the reported bucket is full; None: unlimited."""
    remaining_quota: int | None
    """Bytes left in this period's quota after this grant; None: no quota."""
    rate_limit: int
    """``RateLimit-Limit``: the reported bucket's burst (or the quota when the
    customer has no rate); 0 means unlimited: send no RateLimit headers."""
    rate_remaining: int
    """``RateLimit-Remaining`` for the same window."""
    charged_at: float | None = None
    """When the bytes were charged (for refunds to the right quota period)."""


class CustomerState:
    """
    A customer's live state: its config, and counters kept across reloads.
    """

    __slots__ = (
        "bucket",
        "bytes_served",
        "client_bucket",
        "config",
        "denied",
        "id",
        "implicit",
        "period",
        "period_start",
        "quota_key",
        "quota_used",
        "throttled_requests",
        "throttled_seconds",
    )

    def __init__(self, config: CustomerConfig, *, implicit: bool = False) -> None:
        self.id = config.id
        self.implicit = implicit
        self.bytes_served = 0
        self.throttled_seconds = 0.0
        self.throttled_requests = 0
        self.denied = 0
        self.quota_key: str | None = None
        self.quota_used = 0
        self.configure(config)

    def configure(self, config: CustomerConfig) -> None:
        self.config = config
        self.period: QuotaLimit | None = None
        """The quota period last asked about (from `period_start` to its
        ``expires_at``): every grant asks, and the calendar arithmetic behind
        the answer costs more than the rest of the grant."""
        self.period_start = 0.0
        self.client_bucket = config.client_bucket
        limits = config.customer_bucket
        self.bucket = BucketLimit(*limits) if limits is not None else None

    @property
    def weight(self) -> float:
        return self.config.weight

    def quota_limit(self, now: float) -> QuotaLimit | None:
        quota = self.config.quota
        if quota is None:
            return None
        period = self.period
        if period is not None and self.period_start <= now < period.expires_at:
            return period
        start, end = period_bounds(quota.period, now)
        period = QuotaLimit(period_key(quota.period, now), quota.bytes, end)
        self.period, self.period_start = period, start
        return period

    def quota_used_at(self, limit: QuotaLimit) -> int:
        # A cached count from an earlier period says nothing about this one.
        return self.quota_used if self.quota_key == limit.period_key else 0


@dataclass(frozen=True, slots=True)
class Charged:
    """
    Who one grant charged, so that a refund goes back there even after a
    reload has moved the client to another customer or changed its quota.
    """

    at: float
    """The grant's ``now``: the time a sink passes back with the refund."""
    customer: CustomerState
    quota: QuotaLimit | None
    """The quota period charged; None if the customer had no quota."""


class Client:
    """
    One connection identity (source IP, Unix uid or bearer token) of a customer.

    `identify` returns the same object for the same identity, so every
    connection from one VM shares one client bucket. Objects stay valid across
    `Accounts.reload`: they are re-bound to whatever customer the new config
    gives their identity, and get that customer's limits.
    """

    __slots__ = (
        "__weakref__",
        "_charges",
        "_customer",
        "_ident",
        "bucket",
        "bytes_served",
        "connections",
        "key",
        "last_seen",
        "throttled_seconds",
        "transport",
    )

    def __init__(
        self,
        key: str,
        transport: str,
        ident: tuple[str, str | int],
        customer: CustomerState,
    ) -> None:
        self.key = key
        """Display name: ``ip:10.1.2.3``, ``uid:1001``, ``token:<12 hex of its
        hash>``; never the token."""
        self.transport = transport
        self._ident = ident
        self._customer = customer
        self.bucket: TokenBucket | None = None
        self.connections = 0
        """Open connections of this client (kept while any is open)."""
        self.bytes_served = 0
        self.throttled_seconds = 0.0
        self.last_seen = 0.0
        self._charges: deque[Charged] = deque(maxlen=_CHARGES_KEPT)
        self._sync_bucket()

    def _sync_bucket(self) -> None:
        limits = self._customer.client_bucket
        if limits is None:
            self.bucket = None
        elif self.bucket is None:
            self.bucket = TokenBucket(*limits)
        elif (self.bucket.rate, self.bucket.burst) != limits:
            self.bucket.reconfigure(*limits)

    def _remember(self, charged: Charged) -> None:
        self._charges.append(charged)

    def _recall(self, at: float) -> Charged | None:
        """
        Take back the latest charge made at ``at``, if it is still remembered.
        """
        for index in range(len(self._charges) - 1, -1, -1):
            charged = self._charges[index]
            if charged.at == at:
                del self._charges[index]
                return charged
        return None

    @property
    def customer_id(self) -> str:
        return self._customer.id

    @property
    def weight(self) -> float:
        return self._customer.weight

    def __repr__(self) -> str:
        return f"<Client {self.key} of {self.customer_id}>"
