"""
The `Accounts` facade: the one place sinks ask before they withdraw, and the
lifecycle of the counters behind it.

A sink calls `Accounts.identify` once per connection (or request), then
`Accounts.grant` (take what is allowed now) or `Accounts.wait_grant` (wait
until something is allowed) before each pool withdrawal, and `Accounts.refund`
for bytes it was granted but did not serve. Every limit lives behind these
calls; sinks implement none of their own.

The work is done by three parts, each in its own module: `Customers` (who is
who, and reloads), `Grants` (the take/wait/refund exchange) and `reporting`
(the status snapshot). This module wires them to one backend and one `Clock`,
and runs housekeeping: saving counters, probing Redis, forgetting idle clients.
"""

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from broker.accounts import reporting
from broker.accounts.backend import MemoryBackend, QuotaBackend
from broker.accounts.clients import Client, Denied, Grant
from broker.accounts.config import DEFAULT_CUSTOMER, AccountsConfig, CustomerConfig
from broker.accounts.customers import Customers, ReloadSummary
from broker.accounts.grants import Grants
from broker.accounts.identity import Peer
from broker.accounts.redis_backend import RedisBackend
from broker.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger("ebroker.accounts")

STATE_FILE = "accounts.json"
"""File name of the memory backend's saved counters inside the state dir."""


class Accounts:
    """
    Customers, clients and their limits; see the package docstring.

    Args:
        config: the ``[accounts]`` table.
        customers: the ``[[customers]]`` list. Without a customer named
            ``default``, unmatched clients are served without limits.
        state_path: where the memory backend saves its counters (normally
            ``state_dir / STATE_FILE``); None keeps them in memory only.
        backend: use this backend instead of building one from ``config``.
        clock: time for waits, refills, quota periods and housekeeping.

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
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        self._state_path = state_path
        self.backend: QuotaBackend = backend or _make_backend(config)
        if isinstance(self.backend, MemoryBackend) and self.backend.state_path is None:
            # The backend keeps counts durable itself, before each grant.
            self.backend.state_path = state_path
        self._customers = Customers(customers)
        self._grants = Grants(self._customers, self.backend, clock)
        self._housekeeper: asyncio.Task[None] | None = None

    @classmethod
    def unlimited(cls, *, clock: Clock = SYSTEM_CLOCK) -> "Accounts":
        """
        Accounts with no customers: every client is served without limits.
        """
        return cls(AccountsConfig(), [], clock=clock)

    # ---- customers -------------------------------------------------------------

    def reload(self, customers: Sequence[CustomerConfig]) -> ReloadSummary:
        """
        Swap in a new customer list. Existing `Client` objects are re-bound to
        the customer their identity now maps to and get its limits at their next
        grant; counters of customers that keep their id carry over; waiters in
        `wait_grant` re-check at once. Backend settings need a restart.

        A reload that removes customers is logged as a warning naming them
        (``reload_removes_customers``; ``all_customers=True`` when none is
        left, as from a truncated file that still parses), and one that
        removes the ``default`` entry or its ``deny`` as
        ``reload_opens_default``: both open gates silently otherwise.

        Returns:
            Customer ids added, removed and changed (for the caller's log).

        Raises:
            ConfigError: the new list has problems; the old one stays in force.
        """
        summary = self._customers.reload(customers)
        self._grants.wake()
        if summary.removed:
            log.warning(
                "reload_removes_customers",
                removed=list(summary.removed),
                all_customers=summary.removes_all,
                customers=summary.customers,
            )
        if summary.opens_default:
            log.warning(
                "reload_opens_default",
                default="removed: unmatched clients are served without limits"
                if DEFAULT_CUSTOMER not in {c.id for c in customers}
                else "no longer denied: unmatched clients are served",
            )
        log.info(
            "accounts_reloaded",
            customers=summary.customers,
            added=list(summary.added),
            removed=list(summary.removed),
            changed=list(summary.changed),
        )
        return summary

    def identify(self, peer: Peer) -> Client | Denied:
        """
        Find the client for a connection's peer.

        HTTP peers that present a bearer token are identified by the token alone;
        an unknown token is refused (not demoted to ``default``), so a typo in a
        token is visible at once. Everyone else is matched by IP (TCP, HTTP) or
        uid (Unix socket), falling back to the ``default`` customer.

        Returns:
            The `Client` (the same object for the same identity), or `Denied`.
        """
        return self._customers.identify(peer)

    # ---- grants ----------------------------------------------------------------

    async def grant(self, client: Client, wanted: int, now: float) -> Grant:
        """
        Take what the limits allow at ``now``, up to ``wanted`` bytes (possibly 0).

        The caller must withdraw at most ``granted`` bytes and `refund` what it
        could not serve, passing the same ``now``.
        """
        return await self._grants.grant(client, wanted, now)

    def try_grant(self, client: Client, wanted: int, now: float) -> Grant | None:
        """
        `grant` without waiting, for a synchronous fast path: None when the
        decision needs I/O (a Redis round trip, a state-file write owed
        first); the caller then awaits `grant`, which decides the same way.
        """
        return self._grants.try_grant(client, wanted, now)

    async def wait_grant(self, client: Client, wanted: int) -> int:
        """
        Wait until the limits allow some bytes, take them, and return how many:
        between 1 and ``wanted`` (a streaming caller loops for the rest). When
        the quota is spent this waits for the next period. The grant's time is
        ``client.last_seen`` when this returns (pass it to `refund`).

        Returns:
            Bytes granted; 0 only when ``wanted`` <= 0.

        Raises:
            AccessDenied: the client's customer is (now) denied.
        """
        return await self._grants.wait_grant(client, wanted)

    def refund(self, client: Client, unused: int, now: float | None = None) -> None:
        """
        Give back ``unused`` granted bytes the caller did not serve (a read that
        timed out, a connection that closed). The client bucket is credited at
        once; the backend in a task (see `flush`).

        Args:
            client: who was granted the bytes.
            unused: how many of them were not served.
            now: when they were granted. The bytes go back to the customer
                and quota period that grant charged, even if a reload has
                since moved the client (a refund just after midnight belongs
                to yesterday). None: the current customer, at the clock's now.
        """
        self._grants.refund(client, unused, now)

    async def flush(self) -> None:
        """
        Wait until every refund scheduled so far has reached the backend.
        """
        await self._grants.flush()

    # ---- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """
        Load saved counters (memory backend), connect the backend, read every
        customer's quota use for the status snapshot (so a restarted broker
        reports spent quota from its first answer), and start the housekeeping
        task (saving, Redis health checks and resync).
        """
        now = self.clock.time()
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
        try:
            await reporting.refresh_quotas(self._customers, self.backend, now)
        except Exception:
            # Status catches up at the first housekeeping round; not worth
            # refusing to start over.
            log.exception("accounts_quota_refresh_failed")
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
        await self.save(exact=True)
        await self.backend.close()

    async def save(self, *, exact: bool = False) -> None:
        """
        Save the memory backend's counters now (no-op for Redis or no path).

        Args:
            exact: save the counts themselves, not a reservation ahead of
                them; only right when no grant follows (shutdown).
        """
        if isinstance(self.backend, MemoryBackend) and self._state_path is not None:
            try:
                await self.backend.persist(exact=exact)
            except OSError as exc:
                log.error(
                    "accounts_state_save_failed",
                    path=str(self._state_path),
                    error=str(exc),
                )

    async def _housekeeping(self) -> None:
        while True:
            await self.clock.sleep(self.config.persist_interval)
            try:
                await self.tick(self.clock.time())
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
        await reporting.refresh_quotas(self._customers, self.backend, now)
        self._customers.forget_idle(now)
        await self.save()

    # ---- reporting -------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """
        Usage per customer and per client for ``/v1/status``; never a token.
        See `broker.accounts.reporting` for the shape.
        """
        when = self.clock.time() if now is None else now
        return reporting.snapshot(self._customers, self.backend, when)


def _make_backend(config: AccountsConfig) -> QuotaBackend:
    # RedisBackend reads no clock: every call carries the caller's now.
    if config.backend == "redis":
        return RedisBackend.from_config(config)
    return MemoryBackend()
