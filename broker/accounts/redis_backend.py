"""
`RedisBackend`: customer buckets and quotas shared by several brokers.

Every check-and-charge is one Lua script, atomic in Redis. The caller's clock
is passed in: scripts must not read the server clock to stay replicable, and
quota periods are named by the caller, so all brokers agree on them. Key TTLs
are relative to the caller's ``now`` for the same reason. A customer's keys
share a ``{customer}`` hash tag, so the scripts also work on Redis Cluster.

Outages: any Redis error marks the backend unhealthy (logged once as
``redis_unavailable``). Per policy it then serves from a local `MemoryBackend`
seeded with the last counts it saw (``fail_open``), or grants nothing
(``fail_closed``). Every ``retry_interval`` seconds a call (or `probe`) tries
Redis again; on success the quota charged locally during the outage is pushed
back (``redis_resynced``): each counter becomes ``max(redis value, last value
seen) + local charges``, which is right whether Redis kept its data (other
brokers' charges are kept) or restarted empty (ours are restored).

Redis that lost its data (restarted without persistence, flushed, evicted):
every broker remembers the last count it saw of every customer's current
period (from its own charges and from `usage`, which housekeeping calls for
every customer each round), and detects the loss two ways:

- the fleet's *epoch* marker (``<prefix>epoch``, a random value the first
  broker sets) is missing or different from the one it saw, checked at start,
  at every `probe` and on recovery from an outage;
- a script finds a quota counter missing that this broker saw above zero
  (counters are never deleted within their period, and a refund to zero keeps
  the key), checked atomically in every take and give-back, so no grant is
  ever made against an emptied counter.

Either way it writes back every count it knows as ``max(redis value, known)``
(``redis_restored``), including customers that did not draw meanwhile, and
only then charges. Counts never go down; charges made on another broker
between the loss and this broker's restore may be counted twice (the customer
loses, never gains).
"""

import asyncio
import math
import secrets
from typing import Any, Literal

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from broker.accounts.backend import BucketLimit, Charge, MemoryBackend, QuotaLimit

log = structlog.get_logger("ebroker.accounts")

# Quota keys outlive their period a little so status can still read them.
_QUOTA_KEY_GRACE = 3600

# KEYS[1] customer bucket (hash: tokens, ts), KEYS[2] quota counter.
# ARGV: amount, now, rate (<0: no bucket), burst, limit (<0: no quota),
#       quota key ttl (s), bucket ttl (s). TTLs are relative so that the Redis
#       server's clock never decides when a quota period ends.
#       ARGV[8]: the count this broker last saw; a missing counter when it saw
#       one above zero means Redis lost data: the script changes nothing and
#       returns grant -1 so the broker restores first.
_TAKE = """
if tonumber(ARGV[5]) >= 0 and tonumber(ARGV[8]) > 0
    and redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1, '-1', 0}
end
local amount = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local grant = amount
local tokens = -1
local ts = now
if rate >= 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  tokens = tonumber(state[1])
  ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  elseif now > ts then
    -- another broker's clock may be ahead: never refill backwards
    tokens = tokens + (now - ts) * rate
    ts = now
  end
  if tokens > burst then tokens = burst end
  grant = math.min(grant, math.floor(tokens))
end
local used = 0
if limit >= 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
  grant = math.min(grant, limit - used)
end
if grant < 0 then grant = 0 end
if rate >= 0 then
  tokens = tokens - grant
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
end
if limit >= 0 and grant > 0 then
  used = redis.call('INCRBY', KEYS[2], grant)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
end
return {grant, tostring(tokens), used}
"""

# KEYS[1] bucket, KEYS[2] quota. ARGV: amount, burst (<0: no bucket),
# '1' if there is a quota, the count this broker last saw (as in _TAKE: -1
# back and nothing changed when that counter is gone).
_GIVE_BACK = """
if ARGV[3] == '1' and tonumber(ARGV[4]) > 0
    and redis.call('EXISTS', KEYS[2]) == 0 then
  return -1
end
local amount = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
if burst >= 0 then
  local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
  if tokens ~= nil then
    redis.call('HSET', KEYS[1], 'tokens', tostring(math.min(burst, tokens + amount)))
  end
end
local used = 0
if ARGV[3] == '1' then
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  local back = math.min(amount, current)
  if back > 0 then
    used = redis.call('DECRBY', KEYS[2], back)
  else
    used = current
  end
end
return used
"""

# KEYS[1] quota. ARGV: base (last value this broker saw), local delta, ttl (s).
_RESYNC = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local base = tonumber(ARGV[1])
if current < base then current = base end
current = math.max(0, current + tonumber(ARGV[2]))
redis.call('SET', KEYS[1], string.format('%d', current))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return current
"""

# KEYS[1] quota. ARGV: the count this broker knows, ttl (s). Raises a counter
# to what this broker saw, never lowers it.
_RESTORE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local known = tonumber(ARGV[1])
if current >= known then return current end
redis.call('SET', KEYS[1], string.format('%d', known))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return known
"""

# A script answered "a counter this broker saw is gone"; after restoring, the
# call is tried this many times more before it counts as an outage.
_RESTORE_ATTEMPTS = 2

# Everything that means "Redis is not answering properly right now".
_UNAVAILABLE = (RedisError, OSError, TimeoutError)


class RedisBackend:
    """
    Counters shared through Redis, with a local fallback while it is away.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ebroker:",
        policy: Literal["fail_open", "fail_closed"] = "fail_open",
        timeout: float = 0.5,
        retry_interval: float = 2.0,
    ) -> None:
        # No client-side retries: an outage should flip us to the fallback at
        # once, not stall every withdrawal through a backoff schedule.
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._prefix = prefix
        self.policy = policy
        self.retry_interval = retry_interval
        self._take_script = self._redis.register_script(_TAKE)
        self._give_script = self._redis.register_script(_GIVE_BACK)
        self._resync_script = self._redis.register_script(_RESYNC)
        self._restore_script = self._redis.register_script(_RESTORE)
        self._epoch: str | None = None
        """The fleet's epoch marker as this broker last saw it."""
        self._epoch_lock = asyncio.Lock()
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

    # ---- keys ------------------------------------------------------------------

    def _bucket_key(self, customer_id: str) -> str:
        # The {customer} hash tag keeps a customer's keys in one Cluster slot,
        # which a multi-key script needs.
        return f"{self._prefix}{{{customer_id}}}:bucket"

    def _quota_key(self, customer_id: str, period_key: str) -> str:
        return f"{self._prefix}{{{customer_id}}}:quota:{period_key}"

    @property
    def _epoch_key(self) -> str:
        return f"{self._prefix}epoch"

    # ---- lost data -------------------------------------------------------------

    def _learn(
        self, customer_id: str, period_key: str, used: int, end: float | None
    ) -> None:
        slot = (customer_id, period_key)
        self._known[slot] = used
        if end is not None and not math.isinf(end):
            self._ends[slot] = end

    async def _check_epoch(self, now: float, *, lost: bool = False) -> None:
        """
        Read the fleet's epoch marker (setting it if absent) and restore every
        count this broker knows if it changed, or if ``lost`` (a script found
        a known counter gone).

        Raises:
            RedisError, OSError, TimeoutError: Redis did not answer.
        """
        async with self._epoch_lock:
            raw = await self._redis.get(self._epoch_key)
            if raw is None:
                fresh = secrets.token_hex(8)
                await self._redis.set(self._epoch_key, fresh, nx=True)
                raw = await self._redis.get(self._epoch_key)
            epoch = raw.decode() if isinstance(raw, bytes) else str(raw)
            changed = self._epoch is not None and epoch != self._epoch
            if changed or lost:
                await self._restore(now, epoch if changed else None)
            self._epoch = epoch

    async def _restore(self, now: float, epoch: str | None) -> None:
        self._latest_now = max(self._latest_now, now)
        restored = 0
        for slot, known in list(self._known.items()):
            end = self._ends.get(slot, math.inf)
            if end <= self._latest_now:
                self._known.pop(slot, None)
                self._ends.pop(slot, None)
                continue
            if known <= 0:
                continue
            customer_id, period_key = slot
            used = await self._restore_script(
                keys=[self._quota_key(customer_id, period_key)],
                args=[known, _quota_ttl(end, self._latest_now)],
            )
            self._known[slot] = int(used)
            restored += 1
        self.restores += 1
        log.warning(
            "redis_restored",
            reason="epoch changed" if epoch is not None else "counter missing",
            counters=restored,
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
                # Before pending charges are added: they add to what Redis
                # should hold, which after a restart is what we knew.
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
            except _UNAVAILABLE as exc:
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
        for slot in list(pending):
            delta, end = pending[slot]
            customer_id, period_key = slot
            base = self._known.get(slot, 0)
            used = await self._resync_script(
                keys=[self._quota_key(customer_id, period_key)],
                args=[base, int(delta), _quota_ttl(end, self._latest_now)],
            )
            self._learn(customer_id, period_key, int(used), end)
            del pending[slot]
            self.resyncs += 1
            log.info(
                "redis_resynced",
                customer=customer_id,
                period=period_key,
                local_bytes=int(delta),
                used=int(used),
            )

    async def start(self, now: float) -> None:
        self._latest_now = max(self._latest_now, now)
        try:
            await self._check_epoch(now)
        except _UNAVAILABLE as exc:
            self._mark_down(now, exc)

    async def close(self) -> None:
        await self._redis.aclose()

    async def probe(self, now: float) -> bool:
        self._latest_now = max(self._latest_now, now)
        if not self._healthy:
            if now >= self._next_retry:
                await self._recover(now)
            return self._healthy
        try:
            # The epoch read doubles as the liveness check.
            await self._check_epoch(now)
        except _UNAVAILABLE as exc:
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
                await self._check_epoch(now, lost=True)
                reply = await self._take_once(customer_id, amount, now, bucket, quota)
            if int(reply[0]) < 0:
                raise RedisError("quota counter lost again right after restoring")
        except _UNAVAILABLE as exc:
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
        known = (
            self._known.get((customer_id, quota.period_key), 0)
            if quota is not None
            else 0
        )
        return await self._take_script(
            keys=self._script_keys(customer_id, quota),
            args=[
                amount,
                repr(now),
                repr(bucket.rate) if bucket is not None else -1,
                bucket.burst if bucket is not None else 0,
                quota.limit if quota is not None else -1,
                _quota_ttl(quota.expires_at, now) if quota is not None else 1,
                _bucket_ttl(bucket),
                known,
            ],
        )

    def _script_keys(self, customer_id: str, quota: QuotaLimit | None) -> list[str]:
        # The take and give-back scripts touch the same two keys; "-" stands
        # for "no quota" (the scripts then leave that key alone).
        period_key = quota.period_key if quota is not None else "-"
        return [self._bucket_key(customer_id), self._quota_key(customer_id, period_key)]

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
                known = self._known.get(slot, 0) if slot is not None else 0
                used = await self._give_script(
                    keys=self._script_keys(customer_id, quota),
                    args=[
                        amount,
                        bucket.burst if bucket is not None else -1,
                        "1" if quota is not None else "0",
                        known,
                    ],
                )
                if int(used) >= 0:
                    break
                await self._check_epoch(self._latest_now, lost=True)
        except _UNAVAILABLE as exc:
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
            key = self._quota_key(customer_id, period_key)
            try:
                value = await self._redis.get(key)
                if value is None and self._known.get(slot, 0) > 0:
                    # Gone although we saw it: Redis lost data; never report
                    # (or remember) it as unused.
                    await self._check_epoch(self._latest_now, lost=True)
                    value = await self._redis.get(key)
            except _UNAVAILABLE as exc:
                self._mark_down(self._latest_now, exc)
            else:
                self._known[slot] = int(value or 0)
                return self._known[slot]
        delta = self._pending.get(slot, [0, 0.0])[0]
        return self._known.get(slot, 0) + int(delta)


_LONGEST_TTL = 400 * 86400  # longer than any calendar period


def _quota_ttl(end: float, now: float) -> int:
    if math.isinf(end):
        return _LONGEST_TTL
    return min(_LONGEST_TTL, max(1, math.ceil(end - now)) + _QUOTA_KEY_GRACE)


def _bucket_ttl(bucket: BucketLimit | None) -> int:
    # A bucket left alone long enough to refill is the same as no key at all.
    if bucket is None or bucket.rate <= 0:
        return 86400
    return max(60, math.ceil(2 * bucket.burst / bucket.rate) + 60)
