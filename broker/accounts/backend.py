"""
Where customer-wide counters live: each customer's shared token bucket and its
quota counter per period.

Two backends share one interface, `QuotaBackend`:

- `MemoryBackend` (here) keeps everything in this process and saves the quota
  counters to a JSON file (atomically: temp file, fsync, rename) so a restart
  does not hand out a fresh daily quota. Buckets are not saved; a restart
  refills them, which costs at most one burst.
- `broker.accounts.redis_backend.RedisBackend` keeps them in Redis so several
  brokers share one budget, with a `MemoryBackend` as fallback during outages.

Client buckets are not here: a client is one connection identity on one broker,
so its bucket lives in the `Accounts` facade.
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from broker.accounts.bucket import TokenBucket

_STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class BucketLimit:
    """
    A customer-wide token bucket: ``rate`` bytes/s, at most ``burst`` saved.
    """

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class QuotaLimit:
    """
    ``limit`` bytes in the period named ``period_key``, which ends at
    ``expires_at`` (Unix seconds).
    """

    period_key: str
    limit: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Charge:
    """
    Result of one check-and-charge.
    """

    granted: int
    bucket_tokens: float | None
    """Customer-bucket tokens left after the charge; None without a bucket."""
    quota_used: int | None
    """Quota used in the period after the charge; None without a quota."""
    available: bool = True
    """False when the backend refused to decide (Redis away and fail_closed)."""


class QuotaBackend(Protocol):
    """
    Shared customer counters. Every method takes the caller's ``now`` where time
    matters; none reads a clock.
    """

    kind: str
    retry_interval: float
    """Seconds a caller waits before asking again after a charge came back
    unavailable (``Charge.available`` false)."""

    @property
    def healthy(self) -> bool: ...

    async def start(self, now: float) -> None: ...

    async def close(self) -> None: ...

    async def probe(self, now: float) -> bool:
        """
        Check the store (and resync after an outage); return `healthy`.
        """
        ...

    async def take(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Charge:
        """
        Atomically grant ``min(amount, bucket tokens, quota left)`` and charge it
        to both.
        """
        ...

    async def give_back(
        self,
        customer_id: str,
        amount: int,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> None:
        """
        Return ``amount`` unused bytes to the bucket and the quota.
        """
        ...

    async def charge(
        self,
        customer_id: str,
        period_key: str,
        amount: int,
        limit: int,
        expires_at: float | None = None,
    ) -> tuple[int, int]:
        """
        Quota only: grant up to ``amount`` within ``limit``; return
        ``(granted, used after)``.
        """
        ...

    async def refund(self, customer_id: str, period_key: str, amount: int) -> int:
        """
        Quota only: give back ``amount``; return used after (never below 0).
        """
        ...

    async def usage(self, customer_id: str, period_key: str) -> int: ...

    def status(self) -> dict[str, Any]: ...


class MemoryBackend:
    """
    Counters in this process; quota counters persist through `save`/`load`.
    """

    kind = "memory"
    # Never used: this backend always decides. Present to satisfy the protocol.
    retry_interval = 1.0

    def __init__(self) -> None:
        self._used: dict[tuple[str, str], int] = {}
        self._expires: dict[tuple[str, str], float] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._latest = 0.0

    @property
    def healthy(self) -> bool:
        return True

    async def start(self, now: float) -> None:
        self._latest = max(self._latest, now)

    async def close(self) -> None:
        # Nothing to release; saving is the owner's call because it knows the path.
        return None

    async def probe(self, now: float) -> bool:
        self.prune(now)
        return True

    # ---- synchronous core (also used by RedisBackend as its fallback) ----------

    def _bucket(self, customer_id: str, limit: BucketLimit) -> TokenBucket:
        bucket = self._buckets.get(customer_id)
        if bucket is None:
            bucket = self._buckets[customer_id] = TokenBucket(limit.rate, limit.burst)
        elif bucket.rate != limit.rate or bucket.burst != limit.burst:
            bucket.reconfigure(limit.rate, limit.burst)
        return bucket

    def take_now(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Charge:
        self._latest = max(self._latest, now)
        grant = max(0, amount)
        tokens: float | None = None
        used: int | None = None
        state = self._bucket(customer_id, bucket) if bucket is not None else None
        if state is not None:
            grant = min(grant, state.available(now))
        if quota is not None:
            used = self.usage_now(customer_id, quota.period_key)
            grant = max(0, min(grant, quota.limit - used))
        if state is not None:
            state.take(grant, now)
            tokens = state.tokens
        if quota is not None and grant:
            used = self._add(customer_id, quota.period_key, grant, quota.expires_at)
        return Charge(grant, tokens, used)

    def give_back_now(
        self,
        customer_id: str,
        amount: int,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> None:
        if amount <= 0:
            return
        if bucket is not None:
            self._bucket(customer_id, bucket).refund(amount)
        if quota is not None:
            self.refund_now(customer_id, quota.period_key, amount)

    def _add(self, customer_id: str, key: str, amount: int, expires: float) -> int:
        slot = (customer_id, key)
        used = max(0, self._used.get(slot, 0) + amount)
        self._used[slot] = used
        self._expires[slot] = expires
        return used

    def charge_now(
        self,
        customer_id: str,
        period_key: str,
        amount: int,
        limit: int,
        expires_at: float | None = None,
    ) -> tuple[int, int]:
        used = self.usage_now(customer_id, period_key)
        granted = max(0, min(amount, limit - used))
        expires = math.inf if expires_at is None else expires_at
        if granted:
            used = self._add(customer_id, period_key, granted, expires)
        return granted, used

    def refund_now(self, customer_id: str, period_key: str, amount: int) -> int:
        slot = (customer_id, period_key)
        if slot not in self._used:
            return 0
        used = max(0, self._used[slot] - max(0, amount))
        self._used[slot] = used
        return used

    def usage_now(self, customer_id: str, period_key: str) -> int:
        return self._used.get((customer_id, period_key), 0)

    def set_usage(
        self, customer_id: str, period_key: str, used: int, expires_at: float
    ) -> None:
        """
        Overwrite a counter (RedisBackend seeds its fallback with this).
        """
        self._used[(customer_id, period_key)] = max(0, used)
        self._expires[(customer_id, period_key)] = expires_at

    def prune(self, now: float) -> None:
        """
        Forget counters of periods that ended before ``now``.
        """
        self._latest = max(self._latest, now)
        for slot in [s for s, end in self._expires.items() if end <= now]:
            self._used.pop(slot, None)
            self._expires.pop(slot, None)

    # ---- async interface -------------------------------------------------------

    async def take(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Charge:
        return self.take_now(customer_id, amount, now, bucket, quota)

    async def give_back(
        self,
        customer_id: str,
        amount: int,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> None:
        self.give_back_now(customer_id, amount, bucket, quota)

    async def charge(
        self,
        customer_id: str,
        period_key: str,
        amount: int,
        limit: int,
        expires_at: float | None = None,
    ) -> tuple[int, int]:
        return self.charge_now(customer_id, period_key, amount, limit, expires_at)

    async def refund(self, customer_id: str, period_key: str, amount: int) -> int:
        return self.refund_now(customer_id, period_key, amount)

    async def usage(self, customer_id: str, period_key: str) -> int:
        return self.usage_now(customer_id, period_key)

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "healthy": True}

    # ---- persistence -----------------------------------------------------------

    def save(self, path: Path) -> None:
        """
        Write the quota counters to ``path`` atomically (blocking file I/O: call
        it through `asyncio.to_thread` from the event loop).

        Counters of periods that ended before the latest ``now`` seen are dropped.
        """
        self.prune(self._latest)
        entries = [
            {
                "customer": customer_id,
                "period": period_key,
                "used": used,
                "expires_at": None
                if math.isinf(self._expires.get((customer_id, period_key), math.inf))
                else self._expires[(customer_id, period_key)],
            }
            for (customer_id, period_key), used in sorted(self._used.items())
        ]
        text = json.dumps({"version": _STATE_VERSION, "quotas": entries}, indent=1)
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        # Make the rename itself durable; not every filesystem lets us open a dir.
        with contextlib.suppress(OSError):
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def load(self, path: Path) -> int:
        """
        Read counters saved by `save`, keeping the larger value where this
        backend already counted something. A missing file is an empty state.

        Returns:
            How many counters were read.

        Raises:
            ValueError: the file is not a state file this version understands.
            OSError: the file exists but cannot be read.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
            raise ValueError(f"{path}: not an ebroker accounts state file (v1)")
        count = 0
        for entry in data.get("quotas", []):
            try:
                slot = (str(entry["customer"]), str(entry["period"]))
                used = int(entry["used"])
                end = entry.get("expires_at")
                expires = math.inf if end is None else float(end)
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: malformed entry {entry!r}") from None
            self._used[slot] = max(self._used.get(slot, 0), used)
            self._expires[slot] = expires
            count += 1
        return count
