"""
`RedisBackend`: customer buckets and quotas shared by several brokers.

Every check-and-charge is one Lua script, atomic in Redis. The caller's clock
is passed in: scripts must not read the server clock to stay replicable, and
quota periods are named by the caller, so all brokers agree on them. Key TTLs
are relative to the caller's ``now`` for the same reason. A customer's keys
(bucket, quota counters, restore markers, epoch) share a ``{customer}`` hash
tag and every script touches one customer only, so they work on Redis Cluster.

Outages: any Redis error marks the backend unhealthy (logged once as
``redis_unavailable``). Per policy it then serves from a local `MemoryBackend`
seeded with the last counts it saw (``fail_open``), or grants nothing
(``fail_closed``). Every ``retry_interval`` seconds a call (or `probe`) tries
Redis again; on success the quota charged locally during the outage is added
to what Redis holds (``redis_resynced``), after the restore below if Redis
lost its data meanwhile. A Sentinel failover is such an outage: the first
retry after the promotion reaches the new primary (`broker.accounts.redis_link`
connects, and waits for replicas when asked to).

Redis that lost its data (restarted without persistence, flushed, a Cluster
shard failed over to an empty replica). Every broker remembers the last count
it saw of every customer's current period (from its own charges and from
`usage`, which housekeeping calls for every customer each round), tagged with
the customer's *epoch*: a random value in ``<prefix>{customer}:epoch``, created
by the first script that finds it missing and never deleted. Every take,
give-back and usage read passes the epoch this broker last saw and the script
compares it atomically: if the key is missing or differs, the script changes
nothing and answers -1, and the broker first *restores* that customer, then
retries. A counter that is missing while the epoch matches is a new period
(count 0). The fleet-wide ``<prefix>epoch`` marker, checked at start, at every
`probe` and on recovery, additionally makes a broker restore every customer it
knows as soon as it sees Redis emptied, not only those it is asked about.

A restore is one script per customer, additive and idempotent per epoch: each
counter keeps a marker ``<prefix>{customer}:restored:<period>`` of the count
already restored in this epoch; a broker whose known count exceeds it adds the
difference and raises the marker. So the counter holds the highest count any
restoring broker knew plus every charge made since the loss, whatever the
order; charges made since the loss are never hidden (as ``max`` would) and two
brokers knowing the same count do not double it. A broker contributes once
per epoch: its counts seen in the new epoch already include the restore.

Guarantee, and what is still lost: once every broker that knew a counter has
restored it (at its next call for that customer or its next `probe`), the
counter is at least the highest count any broker saw before the loss plus
everything charged since, and no more is granted past the quota. Before that,
a broker grants against what has been restored so far: the customer can gain
at most the charges other brokers made that this broker never saw and whose
brokers have not restored yet, plus any charge whose reply never reached its
broker (lost with the server). The customer can lose (count too high) by
refunds made after the highest look, or if an eviction policy removes an epoch
key but keeps its counters (run Redis without ``allkeys-*`` eviction).
"""

import asyncio
import math
import secrets
from typing import Any, Literal, Self

import structlog

from broker.accounts.backend import BucketLimit, Charge, MemoryBackend, QuotaLimit
from broker.accounts.config import AccountsConfig
from broker.accounts.redis_link import (
    RedisLink,
    RedisTarget,
    StoreFailure,
    target_from_config,
)
from broker.accounts.redis_scripts import (
    GIVE_BACK,
    READ,
    SYNC,
    TAKE,
    RedisKeys,
    bucket_ttl,
    quota_ttl,
    text,
)

log = structlog.get_logger("ebroker.accounts")

# A script answered "not the epoch you saw"; after restoring, the call is
# tried this many times more before it counts as an outage.
_RESTORE_ATTEMPTS = 2


class RedisBackend:
    """
    Counters shared through Redis, with a local fallback while it is away.
    """

    kind = "redis"

    def __init__(
        self,
        target: str | RedisTarget,
        *,
        prefix: str = "ebroker:",
        policy: Literal["fail_open", "fail_closed"] = "fail_open",
        timeout: float = 0.5,
        retry_interval: float = 2.0,
    ) -> None:
        if isinstance(target, str):
            target = RedisTarget(url=target)
        self._link = RedisLink(target, timeout=timeout)
        self._redis = self._link.client
        self._unavailable = self._link.errors
        """Everything that means "Redis is not answering properly right now"."""
        self._keys = RedisKeys(prefix)
        self.policy = policy
        self.retry_interval = retry_interval
        self._take_script = self._link.register(TAKE)
        self._give_script = self._link.register(GIVE_BACK)
        self._read_script = self._link.register(READ)
        self._sync_script = self._link.register(SYNC)
        self._epoch: str | None = None
        """The fleet's epoch marker as this broker last saw it."""
        self._epochs: dict[str, str] = {}
        """Each customer's epoch as this broker last saw it; every count in
        `_known` was read in it."""
        self._epoch_lock = asyncio.Lock()
        """Held around every restore, so one broker contributes once per epoch."""
        self._ends: dict[tuple[str, str], float] = {}
        """When each known counter's period ends (for its key's TTL)."""
        self._local = MemoryBackend()
        self._healthy = True
        self._next_retry = 0.0
        self._down_since: float | None = None
        self._last_error: str | None = None
        self._known: dict[tuple[str, str], int] = {}
        # (customer, period) -> [local delta since the outage began, expires_at]
        self._pending: dict[tuple[str, str], list[float]] = {}
        self._recover_lock = asyncio.Lock()
        self._latest_now = 0.0
        """Latest ``now`` a caller passed in; paces retries of calls that have none."""
        self.outages = 0
        self.resyncs = 0
        self.restores = 0
        """Times this broker found Redis had lost data and wrote counts back."""
        self.first_seen = 0
        """Customers whose epoch this broker read for the first time."""

    @classmethod
    def from_config(
        cls, config: AccountsConfig, *, timeout: float | None = None
    ) -> Self:
        """
        The backend an ``[accounts]`` table describes (one server or a
        sentinel-watched primary).

        Raises:
            ConfigError: the Redis password cannot be read.
        """
        return cls(
            target_from_config(config),
            prefix=config.redis_prefix,
            policy=config.on_redis_failure,
            timeout=config.redis_timeout if timeout is None else timeout,
            retry_interval=config.redis_retry_interval,
        )

    # ---- lost data -------------------------------------------------------------

    def _learn(
        self, customer_id: str, period_key: str, used: int, end: float | None
    ) -> None:
        slot = (customer_id, period_key)
        self._known[slot] = used
        if end is not None and not math.isinf(end):
            self._ends[slot] = end

    async def _check_epoch(self, now: float) -> None:
        """
        Read the fleet's epoch marker (setting it if absent) and, if it
        changed, restore every customer this broker knows.

        Raises:
            RedisError, OSError, TimeoutError: Redis did not answer.
        """
        self._latest_now = max(self._latest_now, now)
        async with self._epoch_lock:
            raw = await self._redis.get(self._keys.fleet_epoch)
            if raw is None:
                fresh = secrets.token_hex(8)
                await self._redis.set(self._keys.fleet_epoch, fresh, nx=True)
                raw = await self._redis.get(self._keys.fleet_epoch)
            epoch = text(raw)
            if self._epoch is not None and epoch != self._epoch:
                self._drop_ended()
                restored = 0
                for customer_id in sorted({slot[0] for slot in self._known}):
                    if await self._sync_locked(customer_id, {}):
                        restored += 1
                self._report_restore("fleet epoch changed", restored)
            self._epoch = epoch

    async def _restore_customer(self, customer_id: str, now: float) -> None:
        """
        Bring this broker's counts of one customer into the customer's current
        epoch (a script said the epoch it passed is not current).

        Raises:
            RedisError, OSError, TimeoutError: Redis did not answer.
        """
        self._latest_now = max(self._latest_now, now)
        async with self._epoch_lock:
            self._drop_ended()
            seen = customer_id in self._epochs
            if await self._sync_locked(customer_id, {}):
                self._report_restore("customer epoch changed", 1)
            elif not seen:
                self.first_seen += 1

    async def _sync_locked(
        self, customer_id: str, deltas: dict[tuple[str, str], int]
    ) -> bool:
        """
        Run the sync script for one customer: restore what this broker knows
        if the customer's epoch is not the one it saw, and add ``deltas``
        (local charges from an outage). Hold `_epoch_lock`.

        Returns:
            True if the epoch had changed since this broker last saw it.
        """
        slots = sorted({s for s in self._known if s[0] == customer_id} | set(deltas))
        seen = self._epochs.get(customer_id, "")
        keys = [self._keys.customer_epoch(customer_id)]
        args: list[str | int] = [seen, secrets.token_hex(8)]
        for slot in slots:
            end = self._ends.get(slot, math.inf)
            keys += [self._keys.quota(*slot), self._keys.marker(*slot)]
            args += [
                self._known.get(slot, 0),
                deltas.get(slot, 0),
                quota_ttl(end, self._latest_now),
            ]
        reply = await self._link.write(self._sync_script, keys, args)
        epoch = text(reply[0])
        self._epochs[customer_id] = epoch
        for slot, used in zip(slots, reply[1:], strict=True):
            self._known[slot] = int(used)
        return bool(seen) and epoch != seen

    def _drop_ended(self) -> None:
        for slot in list(self._known):
            if self._ends.get(slot, math.inf) <= self._latest_now:
                self._known.pop(slot, None)
                self._ends.pop(slot, None)

    def _report_restore(self, reason: str, customers: int) -> None:
        self.restores += 1
        log.warning(
            "redis_restored",
            reason=reason,
            customers=customers,
            hint="Redis lost its data (restarted without persistence?); "
            "run it with appendonly yes",
        )

    # ---- health ----------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    def _mark_down(self, now: float, exc: BaseException) -> None:
        self._next_retry = now + self.retry_interval
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._healthy:
            self._healthy = False
            self._down_since = now
            self.outages += 1
            log.warning("redis_unavailable", error=self._last_error, policy=self.policy)

    async def _usable(self, now: float) -> bool:
        """
        True if the next command should go to Redis; tries to recover when the
        retry interval has passed.
        """
        self._latest_now = max(self._latest_now, now)
        if self._healthy:
            return True
        if now < self._next_retry or self._recover_lock.locked():
            return False
        return await self._recover(now)

    async def _recover(self, now: float) -> bool:
        async with self._recover_lock:
            if self._healthy:
                return True
            try:
                await self._redis.ping()
                await self._link.check_replicas()
                # Restores every known customer if Redis was emptied, so the
                # pending charges below add to what it held before.
                await self._check_epoch(now)
                while self._pending:
                    # Charges made while we resync land in a fresh map; loop until
                    # none are left so no local charge is forgotten.
                    pending, self._pending = self._pending, {}
                    try:
                        await self._resync(pending)
                    except BaseException:
                        for slot, (delta, end) in pending.items():
                            entry = self._pending.setdefault(slot, [0, end])
                            entry[0] += delta
                        raise
            except self._unavailable as exc:
                self._next_retry = now + self.retry_interval
                self._last_error = f"{type(exc).__name__}: {exc}"
                return False
            self._healthy = True
            log.info(
                "redis_recovered",
                down_for=round(now - (self._down_since or now), 3),
            )
            self._down_since = None
            return True

    async def _resync(self, pending: dict[tuple[str, str], list[float]]) -> None:
        """
        Add the local charges of an outage, one customer (one script) at a
        time; a customer whose epoch changed meanwhile is restored first, in
        the same script. Done slots leave ``pending``.
        """
        for customer_id in sorted({slot[0] for slot in pending}):
            slots = [slot for slot in pending if slot[0] == customer_id]
            deltas: dict[tuple[str, str], int] = {}
            for slot in slots:
                delta, end = pending[slot]
                deltas[slot] = int(delta)
                if not math.isinf(end):
                    self._ends[slot] = end
            async with self._epoch_lock:
                if await self._sync_locked(customer_id, deltas):
                    self._report_restore("customer epoch changed", 1)
            for slot in slots:
                del pending[slot]
                self.resyncs += 1
                log.info(
                    "redis_resynced",
                    customer=customer_id,
                    period=slot[1],
                    local_bytes=deltas[slot],
                    used=self._known.get(slot, 0),
                )

    async def start(self, now: float) -> None:
        self._latest_now = max(self._latest_now, now)
        try:
            await self._check_epoch(now)
        except self._unavailable as exc:
            self._mark_down(now, exc)

    async def close(self) -> None:
        await self._link.close()

    async def probe(self, now: float) -> bool:
        self._latest_now = max(self._latest_now, now)
        if not self._healthy:
            if now >= self._next_retry:
                await self._recover(now)
            return self._healthy
        try:
            # The epoch read doubles as the liveness check.
            await self._check_epoch(now)
        except self._unavailable as exc:
            self._mark_down(now, exc)
        return self._healthy

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "healthy": self._healthy,
            "policy": self.policy,
            "down_since": self._down_since,
            "last_error": self._last_error,
            "pending_resync": len(self._pending),
            "outages": self.outages,
            "redis": self._link.describe(),
        }

    # ---- fallback --------------------------------------------------------------

    def _fallback_take(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Charge:
        if self.policy == "fail_closed":
            used = None
            if quota is not None:
                used = self._known.get((customer_id, quota.period_key), 0)
            return Charge(0, None, used, available=False)
        if quota is not None:
            self._seed(customer_id, quota.period_key, quota.expires_at)
        charge = self._local.take_now(customer_id, amount, now, bucket, quota)
        if quota is not None and charge.granted:
            self._note_local(customer_id, quota.period_key, charge.granted, quota)
        return charge

    def _seed(self, customer_id: str, period_key: str, expires_at: float) -> None:
        slot = (customer_id, period_key)
        delta = self._pending.get(slot, [0, expires_at])[0]
        used = self._known.get(slot, 0) + int(delta)
        self._local.set_usage(customer_id, period_key, used, expires_at)

    def _note_local(
        self, customer_id: str, period_key: str, delta: int, quota: QuotaLimit | None
    ) -> None:
        end = quota.expires_at if quota is not None else math.inf
        entry = self._pending.setdefault((customer_id, period_key), [0, end])
        entry[0] += delta

    # ---- operations ------------------------------------------------------------

    def take_nowait(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Charge | None:
        if bucket is None and quota is None:
            return Charge(max(0, amount), None, None)
        return None  # every shared limit is a round trip

    def give_back_nowait(
        self,
        customer_id: str,
        amount: int,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> bool:
        return bucket is None and quota is None

    async def take(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Charge:
        if amount <= 0:
            amount = 0
        if bucket is None and quota is None:
            return Charge(amount, None, None)  # nothing shared to check
        if not await self._usable(now):
            return self._fallback_take(customer_id, amount, now, bucket, quota)
        try:
            reply = await self._take_once(customer_id, amount, now, bucket, quota)
            for _ in range(_RESTORE_ATTEMPTS):
                if int(reply[0]) >= 0:
                    break
                await self._restore_customer(customer_id, now)
                reply = await self._take_once(customer_id, amount, now, bucket, quota)
            if int(reply[0]) < 0:
                raise StoreFailure("customer epoch changed again right after restoring")
        except self._unavailable as exc:
            self._mark_down(now, exc)
            return self._fallback_take(customer_id, amount, now, bucket, quota)
        granted, tokens_text, used = int(reply[0]), reply[1], int(reply[2])
        if quota is not None:
            self._learn(customer_id, quota.period_key, used, quota.expires_at)
        return Charge(
            granted,
            float(tokens_text) if bucket is not None else None,
            used if quota is not None else None,
        )

    async def _take_once(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Any:
        keys = self._script_keys(customer_id, quota)
        args: list[str | int] = [
            amount,
            repr(now),
            repr(bucket.rate) if bucket is not None else -1,
            bucket.burst if bucket is not None else 0,
            quota.limit if quota is not None else -1,
            quota_ttl(quota.expires_at, now) if quota is not None else 1,
            bucket_ttl(bucket),
            self._epochs.get(customer_id, ""),
        ]
        # A bucket lost with a primary refills to one burst, which its rate
        # grants soon anyway: only quota counts wait for replicas.
        counts = quota is not None
        return await self._link.write(self._take_script, keys, args, counts=counts)

    def _script_keys(self, customer_id: str, quota: QuotaLimit | None) -> list[str]:
        # The take and give-back scripts touch the same three keys; "-" stands
        # for "no quota" (the scripts then leave that key and the epoch alone).
        period_key = quota.period_key if quota is not None else "-"
        return [
            self._keys.bucket(customer_id),
            self._keys.quota(customer_id, period_key),
            self._keys.customer_epoch(customer_id),
        ]

    async def give_back(
        self,
        customer_id: str,
        amount: int,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> None:
        if amount <= 0:
            return
        if not self._healthy:
            # The bytes were most likely charged locally; give them back there.
            if self.policy == "fail_open":
                self._local.give_back_now(customer_id, amount, bucket, quota)
                if quota is not None:
                    self._note_local(customer_id, quota.period_key, -amount, quota)
            return
        slot = (customer_id, quota.period_key) if quota is not None else None
        used: Any = -1
        try:
            for _ in range(_RESTORE_ATTEMPTS + 1):
                used = await self._link.write(
                    self._give_script,
                    self._script_keys(customer_id, quota),
                    [
                        amount,
                        bucket.burst if bucket is not None else -1,
                        "1" if quota is not None else "0",
                        self._epochs.get(customer_id, ""),
                    ],
                    counts=quota is not None,
                )
                if int(used) >= 0:
                    break
                await self._restore_customer(customer_id, self._latest_now)
        except self._unavailable as exc:
            # A lost refund only ever under-serves the customer; not worth a retry.
            self._mark_down(self._latest_now, exc)
            return
        if slot is not None and int(used) >= 0:
            self._known[slot] = int(used)

    async def charge(
        self,
        customer_id: str,
        period_key: str,
        amount: int,
        limit: int,
        expires_at: float | None = None,
    ) -> tuple[int, int]:
        end = expires_at if expires_at is not None else math.inf
        quota = QuotaLimit(period_key, limit, end)
        result = await self.take(customer_id, amount, self._latest_now, None, quota)
        return result.granted, result.quota_used or 0

    async def refund(self, customer_id: str, period_key: str, amount: int) -> int:
        quota = QuotaLimit(period_key, 0, math.inf)
        await self.give_back(customer_id, amount, None, quota)
        return self._known.get((customer_id, period_key), 0)

    async def usage(
        self, customer_id: str, period_key: str, expires_at: float | None = None
    ) -> int:
        slot = (customer_id, period_key)
        if expires_at is not None and not math.isinf(expires_at):
            self._ends[slot] = expires_at
        if self._healthy:
            keys = [
                self._keys.quota(customer_id, period_key),
                self._keys.customer_epoch(customer_id),
            ]
            value: Any = None
            try:
                for attempt in range(_RESTORE_ATTEMPTS + 1):
                    value, epoch = await self._read_script(keys=keys)
                    if epoch is not None and text(epoch) == self._epochs.get(
                        customer_id
                    ):
                        break
                    if attempt == _RESTORE_ATTEMPTS:
                        raise StoreFailure("customer epoch keeps changing")
                    # Not the epoch our counts belong to (Redis lost data, or
                    # a customer new to us): never report a lost count as
                    # unused, and remember counts only with their epoch.
                    await self._restore_customer(customer_id, self._latest_now)
            except self._unavailable as exc:
                self._mark_down(self._latest_now, exc)
            else:
                self._known[slot] = int(value or 0)
                return self._known[slot]
        delta = self._pending.get(slot, [0, 0.0])[0]
        return self._known.get(slot, 0) + int(delta)
