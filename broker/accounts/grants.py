"""
The exchange a sink goes through for every withdrawal: take a grant (now, or
after waiting for the limits), read from the pool, refund what it did not serve.

For each grant three limits apply, cheapest first: the client's token bucket
(in this process: a client is one identity on one broker), then, in one atomic
backend call, the customer's token bucket and its quota for the current
calendar period (in memory or shared through Redis).

Time: ``now`` is wall-clock Unix seconds, because quota periods are calendar
periods and Redis-shared buckets compare clocks across brokers. `Grants.grant`
takes it as an argument; `Grants.wait_grant` reads the injected `Clock`, on
which it also waits, so a test drives every wait with a fake clock.

Refunds: every grant is remembered on the client with the customer and quota
period it charged, keyed by its ``now``, which is the time sinks pass back with
the refund. The bytes go back there even if a reload has since moved the client
to another customer.
"""

import asyncio
import functools
import math
from typing import NamedTuple

import structlog

from broker.accounts.backend import BucketLimit, Charge, QuotaBackend, QuotaLimit
from broker.accounts.bucket import TokenBucket
from broker.accounts.clients import (
    AccessDenied,
    Charged,
    Client,
    CustomerState,
    Grant,
    LimitName,
)
from broker.accounts.customers import Customers
from broker.clock import Clock

log = structlog.get_logger("ebroker.accounts")

# wait_grant hands out pieces of about this many seconds of the tightest rate,
# so a blocking reader sees a steady stream rather than one burst per refill.
STREAM_TICK = 0.25
# Floor for a computed wait, so rounding never turns it into a busy loop.
MIN_WAIT = 0.001

_DENIED = Grant(0, 0.0, "denied", None, None, 0, 0)


class Grants:
    """
    Grants, waits and refunds against the customers in force.

    Args:
        customers: who is who (refunds look the charged customer up by id, so
            they reach its state as it is after a reload).
        backend: where customer buckets and quotas live.
        clock: what `wait_grant` reads and waits on.
    """

    def __init__(
        self, customers: Customers, backend: QuotaBackend, clock: Clock
    ) -> None:
        self._customers = customers
        self._backend = backend
        self._clock = clock
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """
        Make every `wait_grant` in progress re-check its limits (after a reload).
        """
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- taking ----------------------------------------------------------------

    async def grant(self, client: Client, wanted: int, now: float) -> Grant:
        """
        Take what the limits allow at ``now``, up to ``wanted`` bytes (maybe 0).
        """
        return await self._attempt(client, wanted, now, None)

    async def wait_grant(self, client: Client, wanted: int) -> int:
        """
        Wait until the limits allow some bytes, take them, and return how many
        (1 to ``wanted``; 0 only when ``wanted`` <= 0).

        Raises:
            AccessDenied: the client's customer is (now) denied.
        """
        if wanted <= 0:
            return 0
        while True:
            # Taken before the limits are checked, so a reload that lands while
            # the check is in flight still wakes the wait that follows.
            changed = self._changed
            piece = _piece(client, wanted)
            now = self._clock.time()
            client._sync_bucket()  # a reload may have changed the client's rate
            own = client.bucket
            early = own.time_until(piece, now) if own is not None else 0.0
            if early > 0 and not client._customer.config.deny:
                # Wait for a whole piece locally rather than trickle out single
                # bytes (and backend round trips) as they accrue.
                await self._throttle(client, early, changed)
                continue
            grant = await self._attempt(client, wanted, now, piece)
            if grant.granted:
                return grant.granted
            if grant.limit == "denied":
                raise AccessDenied(f"customer {client.customer_id!r} is denied")
            await self._throttle(client, grant.retry_after, changed)

    async def _throttle(
        self, client: Client, delay: float, changed: asyncio.Event
    ) -> None:
        started = self._clock.monotonic()
        # A reload may lift the limit we are waiting for: wake up and re-check.
        try:
            wait = max(delay, MIN_WAIT)
            async with self._clock.timeout(None if math.isinf(wait) else wait):
                await changed.wait()
        except TimeoutError:
            pass  # the wait ran its course: the caller re-checks the limits
        waited = self._clock.monotonic() - started
        client.throttled_seconds += waited
        client._customer.throttled_seconds += waited

    async def _attempt(
        self, client: Client, wanted: int, now: float, need: int | None
    ) -> Grant:
        opened = _open(client, wanted, now)
        if isinstance(opened, Grant):
            return opened
        customer, wanted, quota = opened
        charge = await self._charge(client, customer, wanted, now, quota)
        return self._conclude(client, customer, wanted, now, need, quota, charge)

    def try_grant(self, client: Client, wanted: int, now: float) -> Grant | None:
        """
        `grant` decided without waiting: None when the backend cannot decide
        at once (a Redis round trip, a state-file write owed first), and the
        caller must take the asynchronous path instead.
        """
        opened = _open(client, wanted, now)
        if isinstance(opened, Grant):
            return opened
        customer, wanted, quota = opened
        own = client.bucket
        amount = own.take(wanted, now) if own is not None else wanted
        charge: Charge | None = None
        if amount:
            charge = self._backend.take_nowait(
                customer.id, amount, now, customer.bucket, quota
            )
            if charge is None:
                if own is not None:
                    own.refund(amount)
                return None
            self._settle(client, customer, amount, quota, charge)
        return self._conclude(client, customer, wanted, now, None, quota, charge)

    def _conclude(
        self,
        client: Client,
        customer: CustomerState,
        wanted: int,
        now: float,
        need: int | None,
        quota: QuotaLimit | None,
        charge: Charge | None,
    ) -> Grant:
        # Everything after the charge: bookkeeping and the answer's window.
        if charge is not None and not charge.available:
            wait = self._backend.retry_interval
            return Grant(0, wait, "unavailable", None, None, 0, 0, now)
        granted = charge.granted if charge is not None else 0
        _served(client, customer, granted, now, quota)
        tokens = charge.bucket_tokens if charge is not None else None
        limits = _Limits(client.bucket, customer.bucket, tokens, quota)
        remaining = None
        if quota is not None:
            remaining = max(0, quota.limit - customer.quota_used_at(quota))
        window = limits.window(remaining, now)
        if granted >= wanted:
            return window.grant(granted, 0.0, None, remaining, now)
        customer.throttled_requests += 1
        if quota is not None and remaining == 0:
            retry = max(0.0, quota.expires_at - now)
            return Grant(
                granted, retry, "quota", quota.expires_at, 0, quota.limit, 0, now
            )
        short = need if need is not None else wanted - granted
        limit, retry = limits.shortfall(short, now)
        return window.grant(granted, retry, limit, remaining, now)

    async def _charge(
        self,
        client: Client,
        customer: CustomerState,
        wanted: int,
        now: float,
        quota: QuotaLimit | None,
    ) -> Charge | None:
        # The client's own bucket first, then the backend for what it allowed.
        own = client.bucket
        amount = own.take(wanted, now) if own is not None else wanted
        if not amount:
            return None
        charge = self._backend.take_nowait(
            customer.id, amount, now, customer.bucket, quota
        )
        if charge is not None:
            self._settle(client, customer, amount, quota, charge)
            return charge
        take = asyncio.ensure_future(
            self._backend.take(customer.id, amount, now, customer.bucket, quota)
        )
        try:
            # Shielded: a caller cancelled mid-call (a timed-out wait, a client
            # gone) must not leave a charge nobody refunds.
            charge = await asyncio.shield(take)
        except asyncio.CancelledError:
            if own is not None:
                own.refund(amount)
            take.add_done_callback(
                functools.partial(self._undo, customer.id, customer.bucket, quota)
            )
            raise
        self._settle(client, customer, amount, quota, charge)
        return charge

    @staticmethod
    def _settle(
        client: Client,
        customer: CustomerState,
        amount: int,
        quota: QuotaLimit | None,
        charge: Charge,
    ) -> None:
        # What the backend did not grant goes back to the client's own bucket.
        own = client.bucket
        if own is not None and charge.granted < amount:
            own.refund(amount - charge.granted)
        if charge.available and quota is not None and charge.quota_used is not None:
            customer.quota_key = quota.period_key
            customer.quota_used = charge.quota_used

    def _undo(
        self,
        customer_id: str,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
        take: "asyncio.Future[Charge]",
    ) -> None:
        if take.cancelled() or take.exception() is not None:
            return
        self._give_back(customer_id, take.result().granted, bucket, quota)

    # ---- giving back -----------------------------------------------------------

    def refund(self, client: Client, unused: int, now: float | None = None) -> None:
        """
        Give back ``unused`` granted bytes the caller did not serve, to the
        customer and quota period that grant charged; see `Accounts.refund`.
        """
        charged = client._recall(now) if now is not None else None
        if unused <= 0:
            return
        unused = min(unused, client.bytes_served)
        if client.bucket is not None:
            client.bucket.refund(unused)
        client.bytes_served -= unused
        if charged is None:
            # Not remembered: the grant was made under the current customer
            # unless a reload came in between, which is the best guess left.
            customer = client._customer
            quota = customer.quota_limit(self._clock.time() if now is None else now)
        else:
            # By id, so a customer whose state a reload replaced is still found.
            customer = self._customers.get(charged.customer.id) or charged.customer
            quota = charged.quota
        customer.bytes_served -= unused
        if quota is not None and customer.quota_key == quota.period_key:
            customer.quota_used = max(0, customer.quota_used - unused)
        if quota is None and customer.bucket is None:
            return  # nothing of this customer's lives in the backend
        self._give_back(customer.id, unused, customer.bucket, quota)

    def _give_back(
        self,
        customer_id: str,
        amount: int,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> None:
        if amount <= 0:
            return
        if self._backend.give_back_nowait(customer_id, amount, bucket, quota):
            return
        task = asyncio.get_running_loop().create_task(
            self._backend.give_back(customer_id, amount, bucket, quota)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """
        Wait until every refund scheduled so far has reached the backend.
        """
        if self._tasks:
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    log.error("accounts_refund_failed", exc_info=result)


class _Window(NamedTuple):
    """
    The limit a grant reports (``RateLimit-*``): see `Grant`.
    """

    limit: int
    remaining: int
    reset_at: float | None

    def grant(
        self,
        granted: int,
        retry_after: float,
        limit: LimitName | None,
        remaining_quota: int | None,
        now: float,
    ) -> Grant:
        return Grant(
            granted,
            retry_after,
            limit,
            self.reset_at,
            remaining_quota,
            self.limit,
            self.remaining,
            now,
        )


class _Limits:
    """
    The rate limits one grant ran into, to say which window to report and how
    long the rest would take.
    """

    __slots__ = ("own", "quota", "shared", "tokens")

    def __init__(
        self,
        own: TokenBucket | None,
        shared: BucketLimit | None,
        tokens: float | None,
        quota: QuotaLimit | None,
    ) -> None:
        self.own = own
        self.shared = shared if tokens is not None else None
        """The customer bucket, when the backend reported its tokens."""
        self.tokens = tokens if tokens is not None else 0.0
        self.quota = quota

    def window(self, remaining: int | None, now: float) -> _Window:
        """
        The window to report: the bucket closest to empty, else the quota,
        else none (unlimited).
        """
        windows: list[tuple[float, int, float]] = []  # tokens, burst, rate
        if self.own is not None:
            windows.append((self.own.tokens, self.own.burst, self.own.rate))
        if self.shared is not None:
            windows.append((self.tokens, self.shared.burst, self.shared.rate))
        if windows:
            tokens_left, burst, rate = min(windows)
            reset_at = now + _refill_time(burst - tokens_left, rate)
            return _Window(burst, max(0, math.floor(tokens_left)), reset_at)
        if self.quota is not None and remaining is not None:
            return _Window(self.quota.limit, remaining, self.quota.expires_at)
        return _Window(0, 0, None)

    def shortfall(self, short: int, now: float) -> tuple[LimitName, float]:
        """
        Which rate held back ``short`` more bytes, and how long until they fit.
        """
        own = self.own
        client_wait = own.time_until(short, now) if own is not None else 0.0
        customer_wait = 0.0
        if self.shared is not None:
            missing = min(short, self.shared.burst) - self.tokens
            customer_wait = _refill_time(missing, self.shared.rate)
        limit: LimitName = (
            "customer_rate"
            if own is None or customer_wait > client_wait
            else "client_rate"
        )
        return limit, max(client_wait, customer_wait)


def _served(
    client: Client,
    customer: CustomerState,
    granted: int,
    now: float,
    quota: QuotaLimit | None,
) -> None:
    client.bytes_served += granted
    customer.bytes_served += granted
    if granted:
        client._remember(Charged(now, customer, quota))
    # Again after the backend call, which lets other connections of this client
    # run: a sink reads the grant's time from here once `wait_grant` returns.
    client.last_seen = now


def _open(
    client: Client, wanted: int, now: float
) -> Grant | tuple[CustomerState, int, QuotaLimit | None]:
    # What every grant starts with: the answer already, when the customer is
    # denied or nothing limits it; else the customer, the amount and the quota.
    customer = client._customer
    client._sync_bucket()
    client.last_seen = now
    if customer.config.deny:
        return _DENIED
    wanted = max(0, wanted)
    quota = customer.quota_limit(now)
    if client.bucket is None and customer.bucket is None and quota is None:
        # No limit applies: skip the backend (and, with Redis, the round trip).
        _served(client, customer, wanted, now, None)
        return Grant(wanted, 0.0, None, None, None, 0, 0, now)
    return customer, wanted, quota


def _piece(client: Client, wanted: int) -> int:
    piece = wanted
    customer = client._customer
    shared = customer.bucket
    for limits in (
        customer.client_bucket,
        (shared.rate, shared.burst) if shared is not None else None,
    ):
        if limits is not None:
            rate, burst = limits
            piece = min(piece, max(1, min(burst, math.ceil(rate * STREAM_TICK))))
    return piece


def _refill_time(missing: float, rate: float) -> float:
    if missing <= 0:
        return 0.0
    if rate <= 0:
        return math.inf
    return missing / rate
