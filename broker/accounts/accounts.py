"""
The `Accounts` facade: the one place sinks ask before they withdraw.

A sink calls `identify` once per connection (or request), then `grant` (take
what is allowed now) or `wait_grant` (wait until something is allowed) before
each pool withdrawal, and `refund` for bytes it was granted but did not serve.
Every limit lives behind these calls; sinks implement none of their own.

For each withdrawal three limits apply, cheapest first: the client's token
bucket (in this process: a client is one identity on one broker), then, in one
atomic backend call, the customer's token bucket and its quota for the current
calendar period (in memory or shared through Redis).

Time: ``now`` is wall-clock Unix seconds, because quota periods are calendar
periods and Redis-shared buckets compare clocks across brokers. `grant` takes
it as an argument; `wait_grant` reads ``time.time()`` since it really waits.
"""

import asyncio
import functools
import math
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from broker.accounts.backend import (
    BucketLimit,
    Charge,
    MemoryBackend,
    QuotaBackend,
    QuotaLimit,
)
from broker.accounts.clients import (
    AccessDenied,
    Client,
    CustomerState,
    Denied,
    Grant,
    LimitName,
)
from broker.accounts.config import (
    DEFAULT_CUSTOMER,
    AccountsConfig,
    CustomerConfig,
    validate_customers,
)
from broker.accounts.identity import IdentityMap, Peer, hash_token, normalise_ip
from broker.accounts.redis_backend import RedisBackend
from broker.errors import ConfigError

log = structlog.get_logger("ebroker.accounts")

STATE_FILE = "accounts.json"
"""File name of the memory backend's saved counters inside the state dir."""


# wait_grant hands out pieces of about this many seconds of the tightest rate,
# so a blocking reader sees a steady stream rather than one burst per refill.
_STREAM_TICK = 0.25
# Clients unseen for this long are forgotten (their buckets would be full anyway).
_CLIENT_IDLE_FORGET = 3600.0
# Floor for a computed wait, so rounding never turns it into a busy loop.
_MIN_WAIT = 0.001


class Accounts:
    """
    Customers, clients and their limits; see the module docstring.

    Args:
        config: the ``[accounts]`` table.
        customers: the ``[[customers]]`` list. Without a customer named
            ``default``, unmatched clients are served without limits.
        state_path: where the memory backend saves its counters (normally
            ``state_dir / STATE_FILE``); None keeps them in memory only.
        backend: use this backend instead of building one from ``config``.

    Raises:
        ConfigError: ``validate_customers`` found problems.
    """

    def __init__(
        self,
        config: AccountsConfig,
        customers: Sequence[CustomerConfig],
        *,
        state_path: Path | None = None,
        backend: QuotaBackend | None = None,
    ) -> None:
        self.config = config
        self._state_path = state_path
        self.backend: QuotaBackend = backend or _make_backend(config)
        self._customers: dict[str, CustomerState] = {}
        self._identity = IdentityMap()
        self._clients: dict[str, Client] = {}
        self._live: weakref.WeakSet[Client] = weakref.WeakSet()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._housekeeper: asyncio.Task[None] | None = None
        self._apply(customers)

    @classmethod
    def unlimited(cls) -> "Accounts":
        """
        Accounts with no customers: every client is served without limits.
        """
        return cls(AccountsConfig(), [])

    # ---- configuration -------------------------------------------------------

    def _apply(self, customers: Sequence[CustomerConfig]) -> None:
        problems = validate_customers(customers)
        if problems:
            raise ConfigError("\n".join(problems))
        previous = self._customers
        current: dict[str, CustomerState] = {}
        for config in customers:
            state = previous.get(config.id)
            if state is None or state.implicit:
                # Counters carry over for ids that stay; an implicit default
                # becoming explicit keeps its counters too.
                fresh = CustomerState(config)
                if state is not None:
                    _carry(state, fresh)
                state = fresh
            else:
                state.configure(config)
            current[config.id] = state
        if DEFAULT_CUSTOMER not in current:
            state = previous.get(DEFAULT_CUSTOMER)
            implicit = CustomerState(CustomerConfig(id=DEFAULT_CUSTOMER), implicit=True)
            if state is not None:
                _carry(state, implicit)
            current[DEFAULT_CUSTOMER] = implicit
        self._customers = current
        self._identity = IdentityMap.build(
            (c.id, c.networks, c.uids, c.tokens) for c in customers
        )

    def reload(self, customers: Sequence[CustomerConfig]) -> None:
        """
        Swap in a new customer list. Existing `Client` objects are re-bound to
        the customer their identity now maps to and get its limits at their next
        grant; counters of customers that keep their id carry over; waiters in
        `wait_grant` re-check at once. Backend settings need a restart.

        Raises:
            ConfigError: the new list has problems; the old one stays in force.
        """
        self._apply(customers)
        # Every live client, including ones housekeeping dropped from the index
        # while a long-lived connection still holds them.
        for client in list(self._live):
            customer = self._customers[self._match(client._ident)]
            client._customer = customer
            client._sync_bucket()
        self._changed.set()
        self._changed = asyncio.Event()
        log.info("accounts_reloaded", customers=len(customers))

    # ---- identification ------------------------------------------------------

    def _match(self, ident: tuple[str, str | int]) -> str:
        kind, value = ident
        found: str | None = None
        if kind == "ip" and isinstance(value, str):
            found = self._identity.by_ip(value)
        elif kind == "uid" and isinstance(value, int):
            found = self._identity.by_uid(value)
        elif kind == "token" and isinstance(value, str):
            found = self._identity.by_token_hash(value)
        if found is None or found not in self._customers:
            return DEFAULT_CUSTOMER
        return found

    def identify(self, peer: Peer) -> "Client | Denied":
        """
        Find the client for a connection's peer.

        HTTP peers that present a bearer token are identified by the token alone;
        an unknown token is refused (not demoted to ``default``), so a typo in a
        token is visible at once. Everyone else is matched by IP (TCP, HTTP) or
        uid (Unix socket), falling back to the ``default`` customer.

        Returns:
            The `Client` (the same object for the same identity), or `Denied`.
        """
        ident: tuple[str, str | int]
        if peer.transport == "http" and peer.token is not None:
            token_hash = hash_token(peer.token)
            if self._identity.by_token_hash(token_hash) is None:
                return Denied(None, "unknown bearer token")
            ident = ("token", token_hash)
            key = f"token:{token_hash.removeprefix('sha256:')[:12]}"
        elif peer.transport == "unix":
            uid: str | int = peer.uid if peer.uid is not None else "unknown"
            ident = ("uid", uid)
            key = f"uid:{uid}"
        else:
            address = "unknown"
            if peer.ip is not None:
                try:
                    address = str(normalise_ip(peer.ip))
                except ValueError:
                    address = peer.ip
            ident = ("ip", address)
            key = f"ip:{address}"
        customer = self._customers[self._match(ident)]
        if customer.config.deny:
            customer.denied += 1
            reason = (
                "no customer matches this client and the default customer is denied"
                if customer.id == DEFAULT_CUSTOMER
                else f"customer {customer.id!r} is denied"
            )
            return Denied(customer.id, reason)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = Client(key, peer.transport, ident, customer)
            self._live.add(client)
        return client

    # ---- granting ------------------------------------------------------------

    async def grant(self, client: Client, wanted: int, now: float) -> Grant:
        """
        Take what the limits allow now, up to ``wanted`` bytes (possibly 0).

        The caller must withdraw at most ``granted`` bytes and `refund` what it
        could not serve.
        """
        grant, _ = await self._attempt(client, wanted, now, None)
        return grant

    async def wait_grant(self, client: Client, wanted: int) -> int:
        """
        Wait until the limits allow some bytes, take them, and return how many:
        between 1 and ``wanted`` (a streaming caller loops for the rest). When
        the quota is spent this waits for the next period.

        Returns:
            Bytes granted; 0 only when ``wanted`` <= 0.

        Raises:
            AccessDenied: the client's customer is (now) denied.
        """
        if wanted <= 0:
            return 0
        while True:
            # Taken before the limits are checked, so a reload that lands while
            # the check is in flight still wakes the wait that follows.
            changed = self._changed
            piece = self._piece(client, wanted)
            now = time.time()
            client._sync_bucket()  # a reload may have changed the client's rate
            own = client.bucket
            early = own.time_until(piece, now) if own is not None else 0.0
            if early > 0 and not client._customer.config.deny:
                # Wait for a whole piece locally rather than trickle out single
                # bytes (and backend round trips) as they accrue.
                await self._throttle(client, early, changed)
                continue
            grant, _ = await self._attempt(client, wanted, now, piece)
            if grant.granted:
                return grant.granted
            if grant.limit == "denied":
                raise AccessDenied(f"customer {client.customer_id!r} is denied")
            await self._throttle(client, grant.retry_after, changed)

    async def _throttle(
        self, client: Client, delay: float, changed: asyncio.Event
    ) -> None:
        started = time.monotonic()
        await self._sleep(max(delay, _MIN_WAIT), changed)
        waited = time.monotonic() - started
        client.throttled_seconds += waited
        client._customer.throttled_seconds += waited

    async def _sleep(self, delay: float, changed: asyncio.Event) -> None:
        # A reload may lift the limit we are waiting for: wake up and re-check.
        try:
            async with asyncio.timeout(None if math.isinf(delay) else delay):
                await changed.wait()
        except TimeoutError:
            pass  # the wait ran its course: the caller re-checks the limits

    def _piece(self, client: Client, wanted: int) -> int:
        piece = wanted
        for limits in (client._customer.client_bucket, _pair(client._customer.bucket)):
            if limits is not None:
                rate, burst = limits
                piece = min(piece, max(1, min(burst, math.ceil(rate * _STREAM_TICK))))
        return piece

    async def _attempt(
        self, client: Client, wanted: int, now: float, need: int | None
    ) -> tuple[Grant, Charge | None]:
        customer = client._customer
        client._sync_bucket()
        client.last_seen = now
        if customer.config.deny:
            return Grant(0, 0.0, "denied", None, None, 0, 0), None
        wanted = max(0, wanted)
        quota = customer.quota_limit(now)
        own = client.bucket
        if own is None and customer.bucket is None and quota is None:
            # No limit applies: skip the backend (and, with Redis, the round trip).
            client.bytes_served += wanted
            customer.bytes_served += wanted
            return Grant(wanted, 0.0, None, None, None, 0, 0), None
        amount = own.take(wanted, now) if own is not None else wanted
        charge: Charge | None = None
        if amount:
            take = asyncio.ensure_future(
                self.backend.take(customer.id, amount, now, customer.bucket, quota)
            )
            try:
                # Shielded: a caller cancelled mid-call (a timed-out wait, a
                # client gone) must not leave a charge nobody refunds.
                charge = await asyncio.shield(take)
            except asyncio.CancelledError:
                if own is not None:
                    own.refund(amount)
                take.add_done_callback(
                    functools.partial(
                        self._undo_charge, customer.id, customer.bucket, quota
                    )
                )
                raise
            if own is not None and charge.granted < amount:
                own.refund(amount - charge.granted)
            if not charge.available:
                wait = getattr(self.backend, "retry_interval", 1.0)
                return Grant(0, float(wait), "unavailable", None, None, 0, 0), charge
            if quota is not None and charge.quota_used is not None:
                customer.quota_key = quota.period_key
                customer.quota_used = charge.quota_used
        granted = charge.granted if charge is not None else 0
        client.bytes_served += granted
        customer.bytes_served += granted
        remaining = None
        if quota is not None:
            remaining = max(0, quota.limit - customer.quota_used_at(quota))

        # Which window to report: the bucket closest to empty, else the quota.
        windows: list[tuple[float, int, float]] = []  # tokens, burst, rate
        if own is not None:
            windows.append((own.tokens, own.burst, own.rate))
        shared = customer.bucket
        tokens = charge.bucket_tokens if charge is not None else None
        if shared is not None and tokens is not None:
            windows.append((tokens, shared.burst, shared.rate))
        if windows:
            tokens_left, burst, rate = min(windows)
            rate_limit, rate_remaining = burst, max(0, math.floor(tokens_left))
            reset_at: float | None = now + _refill_time(burst - tokens_left, rate)
        elif quota is not None and remaining is not None:
            rate_limit, rate_remaining, reset_at = (
                quota.limit,
                remaining,
                quota.expires_at,
            )
        else:
            rate_limit, rate_remaining, reset_at = 0, 0, None

        if granted >= wanted:
            grant = Grant(
                granted, 0.0, None, reset_at, remaining, rate_limit, rate_remaining
            )
            return grant, charge
        customer.throttled_requests += 1
        if quota is not None and remaining == 0:
            return (
                Grant(
                    granted,
                    max(0.0, quota.expires_at - now),
                    "quota",
                    quota.expires_at,
                    0,
                    quota.limit,
                    0,
                ),
                charge,
            )
        short = need if need is not None else wanted - granted
        client_wait = own.time_until(short, now) if own is not None else 0.0
        customer_wait = 0.0
        if shared is not None and tokens is not None:
            customer_wait = _refill_time(min(short, shared.burst) - tokens, shared.rate)
        limit: LimitName = (
            "customer_rate" if customer_wait > client_wait else "client_rate"
        )
        if own is None:
            limit = "customer_rate"
        retry = max(client_wait, customer_wait)
        return (
            Grant(
                granted, retry, limit, reset_at, remaining, rate_limit, rate_remaining
            ),
            charge,
        )

    def _undo_charge(
        self,
        customer_id: str,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
        take: "asyncio.Future[Charge]",
    ) -> None:
        if (
            take.cancelled()
            or take.exception() is not None
            or not take.result().granted
        ):
            return
        task = asyncio.get_running_loop().create_task(
            self.backend.give_back(customer_id, take.result().granted, bucket, quota)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def refund(self, client: Client, unused: int, now: float | None = None) -> None:
        """
        Give back ``unused`` granted bytes the caller did not serve (a read that
        timed out, a connection that closed). The client bucket is credited at
        once; the backend in a task (see `flush`).

        Args:
            client: who was granted the bytes.
            unused: how many of them were not served.
            now: when they were granted; decides which quota period gets them
                back (a refund just after midnight belongs to yesterday).
        """
        if unused <= 0:
            return
        now = time.time() if now is None else now
        customer = client._customer
        unused = min(unused, client.bytes_served)
        if client.bucket is not None:
            client.bucket.refund(unused)
        client.bytes_served -= unused
        customer.bytes_served -= unused
        quota = customer.quota_limit(now)
        if quota is not None and customer.quota_key == quota.period_key:
            customer.quota_used = max(0, customer.quota_used - unused)
        if quota is None and customer.bucket is None:
            return  # nothing of this customer's lives in the backend
        task = asyncio.get_running_loop().create_task(
            self.backend.give_back(customer.id, unused, customer.bucket, quota)
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

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """
        Load saved counters (memory backend), connect the backend, and start
        the housekeeping task (saving, Redis health checks and resync).
        """
        now = time.time()
        if isinstance(self.backend, MemoryBackend) and self._state_path is not None:
            try:
                count = await asyncio.to_thread(self.backend.load, self._state_path)
            except (OSError, ValueError) as exc:
                # Refusing to start would stop the whole supply over a counter
                # file; serving on with fresh counters is the lesser harm.
                log.error(
                    "accounts_state_unreadable",
                    path=str(self._state_path),
                    error=str(exc),
                )
            else:
                log.info(
                    "accounts_state_loaded", path=str(self._state_path), counters=count
                )
        await self.backend.start(now)
        self._housekeeper = asyncio.create_task(self._housekeeping())

    async def close(self) -> None:
        """
        Stop housekeeping, push pending refunds, save counters and disconnect.
        """
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            await asyncio.wait([self._housekeeper])
            self._housekeeper = None
        await self.flush()
        await self.save()
        await self.backend.close()

    async def save(self) -> None:
        """
        Save the memory backend's counters now (no-op for Redis or no path).
        """
        if isinstance(self.backend, MemoryBackend) and self._state_path is not None:
            try:
                await asyncio.to_thread(self.backend.save, self._state_path)
            except OSError as exc:
                log.error(
                    "accounts_state_save_failed",
                    path=str(self._state_path),
                    error=str(exc),
                )

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.config.persist_interval)
            try:
                await self.tick(time.time())
            except Exception:
                # One bad round must not end housekeeping for the process's life.
                log.exception("accounts_housekeeping_failed")

    async def tick(self, now: float) -> None:
        """
        One housekeeping round (the background task calls it every
        ``persist_interval``): check the backend, refresh quota counts for
        status, forget idle clients, save counters.
        """
        await self.backend.probe(now)
        for customer in list(self._customers.values()):
            quota = customer.quota_limit(now)
            if quota is None:
                continue
            customer.quota_used = await self.backend.usage(
                customer.id, quota.period_key
            )
            customer.quota_key = quota.period_key
        for key in [
            key
            for key, client in self._clients.items()
            if now - client.last_seen > _CLIENT_IDLE_FORGET and not client.connections
        ]:
            del self._clients[key]
        await self.save()

    # ---- reporting -----------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """
        Usage per customer and per client for ``/v1/status``; never a token.

        Quota counts are as of the last grant or housekeeping round (with Redis,
        other brokers' use shows up at the next round).
        """
        now = time.time() if now is None else now
        clients: dict[str, dict[str, Any]] = {}
        for client in self._clients.values():
            clients.setdefault(client.customer_id, {})[client.key] = {
                "transport": client.transport,
                "bytes_served": client.bytes_served,
                "throttled_seconds": round(client.throttled_seconds, 3),
                "last_seen": client.last_seen,
            }
        customers: dict[str, Any] = {}
        for customer in self._customers.values():
            config = customer.config
            quota = customer.quota_limit(now)
            quota_view: dict[str, Any] | None = None
            if quota is not None and config.quota is not None:
                used = customer.quota_used_at(quota)
                quota_view = {
                    "limit": quota.limit,
                    "period": config.quota.period,
                    "used": used,
                    "remaining": max(0, quota.limit - used),
                    "resets_at": quota.expires_at,
                }
            own = customer.client_bucket
            shared = customer.bucket
            mine = clients.get(customer.id, {})
            customers[customer.id] = {
                "implicit": customer.implicit,
                "deny": config.deny,
                "weight": config.weight,
                "client_rate": own[0] if own else None,
                "client_burst": own[1] if own else None,
                "rate": shared.rate if shared else None,
                "burst": shared.burst if shared else None,
                "bytes_served": customer.bytes_served,
                "throttled_seconds": round(customer.throttled_seconds, 3),
                "throttled_requests": customer.throttled_requests,
                "denied": customer.denied,
                "quota": quota_view,
                "client_count": len(mine),
                "clients": mine,
            }
        return {"backend": self.backend.status(), "customers": customers}


def _make_backend(config: AccountsConfig) -> QuotaBackend:
    if config.backend == "redis":
        return RedisBackend(
            config.redis_url,
            prefix=config.redis_prefix,
            policy=config.on_redis_failure,
            timeout=config.redis_timeout,
            retry_interval=config.redis_retry_interval,
        )
    return MemoryBackend()


def _carry(old: CustomerState, new: CustomerState) -> None:
    new.bytes_served = old.bytes_served
    new.throttled_seconds = old.throttled_seconds
    new.throttled_requests = old.throttled_requests
    new.denied = old.denied
    new.quota_key = old.quota_key
    new.quota_used = old.quota_used


def _pair(limit: BucketLimit | None) -> tuple[float, int] | None:
    return (limit.rate, limit.burst) if limit is not None else None


def _refill_time(missing: float, rate: float) -> float:
    if missing <= 0:
        return 0.0
    if rate <= 0:
        return math.inf
    return missing / rate
