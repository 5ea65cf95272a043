"""
The one way a sink hands pool bytes to a client: grant, withdraw, refund.

Every withdrawal is the same exchange: the client's limits grant some bytes
(`broker.accounts.Accounts`), the pool gives at most that many
(`broker.pool.EntropyPool`), and whatever was granted but not served goes
back to the client's budget. Sinks speak their protocol; this module is the
exchange, so it exists once.

Two paths
---------
`Withdrawals.now` is the fast path. It runs synchronously, inside a protocol
callback or a request handler, with no task, timer, future or thread hop:

- it asks the pool what this client may take now (`EntropyPool.available`,
  which already leaves out bytes the fair queue keeps for another customer's
  turn) and takes nothing when that is less than the caller's ``least``;
- it asks the limits for the bytes (`Accounts.try_grant`); when they cannot
  answer without I/O (a Redis round trip, a quota state-file write owed first)
  it returns None, and the caller takes the slow path;
- it withdraws what was granted (`EntropyPool.read_nowait`), charging the
  client's customer in the fair queue.

The slow path waits: `Withdrawals.stream_piece` for a blocking read that is
served as bytes arrive (EGD ``02``), `Withdrawals.grant_all_now` and
`Withdrawals.grant_all_within` for all-or-nothing answers (HTTP). A request
takes the slow path only when it must wait, for the pool, the limits or the
backend; it then gets exactly what the fast path would have given it, later.

Refunds: a grant made at time ``t`` is refunded with that ``t``
(`Taken.granted_at`), so bytes go back to the customer and quota period the
grant charged.
"""

import dataclasses
from dataclasses import dataclass

from broker.accounts import AccessDenied, Accounts, Client, Grant
from broker.errors import PoolClosedError
from broker.pool import EntropyPool


@dataclass(frozen=True, slots=True)
class Taken:
    """
    What `Withdrawals.now` withdrew for a client.
    """

    data: bytes
    """The bytes, to be served or refunded with `Withdrawals.unserved`."""
    grant: Grant | None
    """The limits' answer; None when the pool was short and nothing was
    charged (then ``data`` is empty)."""
    granted_at: float
    """The grant's time, for a refund."""


class Withdrawals:
    """
    The exchange between a pool and the accounts that limit its readers.
    """

    def __init__(self, pool: EntropyPool, accounts: Accounts) -> None:
        self.pool = pool
        self.accounts = accounts

    # ---- fast path ---------------------------------------------------------------

    def now(self, client: Client, count: int, *, least: int) -> Taken | None:
        """
        Withdraw up to ``count`` bytes ready now, without waiting.

        Args:
            client: who asks (its customer is charged).
            count: most bytes wanted.
            least: fewer than this is nothing: with ``least == count`` the
                answer is all or nothing; with 0, whatever is allowed.

        Returns:
            The bytes taken (empty when fewer than ``least`` could be had,
            and then nothing stays charged), or None when the limits cannot
            decide without I/O: nothing was taken or charged, and the caller
            must take a slow path.

        Raises:
            PoolClosedError: the pool is closed.
        """
        pool = self.pool
        if pool.closed:
            raise PoolClosedError("pool is closed")
        want = min(count, pool.available(client))
        accounts = self.accounts
        now = accounts.clock.time()
        if want < least or (want <= 0 < least):
            return Taken(b"", None, now)
        grant = accounts.try_grant(client, want, now)
        if grant is None:
            return None
        granted = grant.granted
        if granted < least or granted <= 0:
            accounts.refund(client, granted, now)
            return Taken(b"", grant, now)
        data = pool.read_nowait(granted, key=client)
        if len(data) < granted:
            accounts.refund(client, granted - len(data), now)
        return Taken(data, grant, now)

    # ---- slow paths --------------------------------------------------------------

    async def take_allowed(self, client: Client, count: int) -> tuple[bytes, float]:
        """
        `now` with ``least=0`` when the limits needed I/O: whatever the
        limits allow and the pool holds, possibly nothing.

        Returns:
            The bytes and the grant's time.
        """
        accounts = self.accounts
        now = accounts.clock.time()
        grant = await accounts.grant(client, count, now)
        if self.pool.closed:
            accounts.refund(client, grant.granted, now)
            raise PoolClosedError("pool is closed")
        data = self.pool.read_nowait(grant.granted, key=client)
        accounts.refund(client, grant.granted - len(data), now)
        return data, now

    async def stream_piece(self, client: Client, count: int) -> tuple[bytes, float]:
        """
        Wait until the limits allow some bytes and the pool has them; return
        between 1 and ``count`` bytes and the grant's time. A blocking read
        loops on this for the rest.

        Raises:
            AccessDenied: the client's customer is (now) denied.
            PoolClosedError: the pool closed while waiting.
        """
        accounts = self.accounts
        allowed = await accounts.wait_grant(client, count)
        # The grant's own time: a refund after midnight belongs to yesterday's quota.
        granted_at = client.last_seen
        data = b""
        try:
            data = await self.pool.read(allowed, partial=True, key=client)
        finally:
            accounts.refund(client, allowed - len(data), granted_at)
        return data, granted_at

    def grant_all_nowait(self, client: Client, wanted: int) -> Grant | None:
        """
        `grant_all_now` decided without waiting; None when the limits need
        I/O (then await `grant_all_now`).
        """
        accounts = self.accounts
        now = accounts.clock.time()
        grant = accounts.try_grant(client, wanted, now)
        if grant is None:
            return None
        return self._all_or_nothing(client, grant, wanted, now)

    async def grant_all_now(self, client: Client, wanted: int) -> Grant:
        """
        All of ``wanted`` from the limits, or nothing: a partial grant is
        handed back. The bytes are not withdrawn; the caller withdraws them
        and refunds what it does not serve, at the grant's ``charged_at``.
        """
        accounts = self.accounts
        now = accounts.clock.time()
        grant = await accounts.grant(client, wanted, now)
        return self._all_or_nothing(client, grant, wanted, now)

    def _all_or_nothing(
        self, client: Client, grant: Grant, wanted: int, now: float
    ) -> Grant:
        # A partial grant goes back at once; ``granted`` stays only to say how
        # much was allowed.
        if 0 < grant.granted < wanted:
            self.accounts.refund(client, grant.granted, now)
        return dataclasses.replace(grant, charged_at=now)

    async def grant_all_within(self, client: Client, wanted: int, wait: float) -> Grant:
        """
        Wait up to ``wait`` seconds for the limits to allow all of ``wanted``.

        Returns:
            A full grant, or (after refunding what was collected) the grant
            that explains why not.
        """
        accounts = self.accounts
        collected = 0
        first_at: float | None = None
        try:
            async with accounts.clock.timeout(wait):
                while collected < wanted:
                    collected += await accounts.wait_grant(client, wanted - collected)
                    first_at = client.last_seen if first_at is None else first_at
        except AccessDenied:
            # A reload denied the customer while this request waited.
            accounts.refund(client, collected, first_at)
            return Grant(0, 0.0, "denied", None, None, 0, 0)
        except TimeoutError:
            accounts.refund(client, collected, first_at)
            return await self.grant_all_now(client, wanted)
        except BaseException:
            accounts.refund(client, collected, first_at)
            raise
        # A zero-byte grant charges nothing and reports where the limits stand.
        state = await accounts.grant(client, 0, accounts.clock.time())
        return Grant(
            wanted, 0.0, None, state.reset_at, state.remaining_quota,
            state.rate_limit, state.rate_remaining, first_at,
        )  # fmt: skip

    # ---- giving back -------------------------------------------------------------

    def unserved(self, client: Client, count: int, granted_at: float | None) -> None:
        """
        Bytes withdrawn and never sent (the connection closed first). The
        pool cannot take them back unseen, so they are dropped (never served,
        never repeated); only the client's budget gets them back.
        """
        if count > 0:
            self.accounts.refund(client, count, granted_at)
