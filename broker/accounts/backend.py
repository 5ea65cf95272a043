"""
Where customer-wide counters live: each customer's shared token bucket and its
quota counter per period.

Two backends share one interface, `QuotaBackend`:

- `MemoryBackend` (here) keeps everything in this process and saves the quota
  counters to a JSON file (atomically: temp file, fsync, rename) so a restart
  does not hand out a fresh daily quota. With a state path, a charge that
  passes what the file already counts writes the file before it returns, so
  a crash (SIGKILL, power loss) never hands quota out again; the file runs a
  little ahead of the counts and a crash costs a customer at most that much
  (`broker.accounts.reservations` has the arithmetic). Buckets are not saved;
  a restart refills them, which costs at most one burst.
- `broker.accounts.redis_backend.RedisBackend` keeps them in Redis so several
  brokers share one budget, with a `MemoryBackend` as fallback during outages.

Client buckets are not here: a client is one connection identity on one broker,
so its bucket lives in the `Accounts` facade.
"""

import asyncio
import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from broker.accounts.bucket import TokenBucket
from broker.accounts.reservations import reservation, reserved_mark

log = structlog.get_logger("ebroker.accounts")

WRITE_RETRY = 1.0
"""Seconds between attempts to write the state file after one failed."""

Slot = tuple[str, str]
"""A quota counter: (customer id, period key)."""

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

    def take_nowait(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Charge | None:
        """
        `take` when it can be decided without waiting for I/O; None when it
        cannot (the caller then awaits `take`, which decides the same way).
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

    def give_back_nowait(
        self,
        customer_id: str,
        amount: int,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> bool:
        """
        `give_back` done at once if that needs no I/O; False when the caller
        must await `give_back` instead.
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

    async def usage(
        self, customer_id: str, period_key: str, expires_at: float | None = None
    ) -> int:
        """
        Quota used by ``customer_id`` in ``period_key`` (which ends at
        ``expires_at``, if the caller knows).
        """
        ...

    def status(self) -> dict[str, Any]: ...


class MemoryBackend:
    """
    Counters in this process; quota counters persist through `save`/`load`.

    Args:
        state_path: where `take` and `charge` keep quota counts durable before
            they grant (see `broker.accounts.reservations`), and where
            `persist` writes; None keeps counts in memory only.
    """

    kind = "memory"
    # Never used: this backend always decides. Present to satisfy the protocol.
    retry_interval = 1.0

    def __init__(self, state_path: Path | None = None) -> None:
        self.state_path = state_path
        self._used: dict[Slot, int] = {}
        self._expires: dict[Slot, float] = {}
        self._limits: dict[Slot, int] = {}
        """Quota each counter was last charged under, for its reservation."""
        self._durable: dict[Slot, int] = {}
        """What the state file counts (the lower value while a write is in
        flight): grants are handed out only while ``used`` is within it."""
        self._buckets: dict[str, TokenBucket] = {}
        self._latest = 0.0
        self._write_lock = asyncio.Lock()
        self._ahead: asyncio.Task[None] | None = None
        """The write moving marks ahead while grants go on, if one runs."""
        self._write_failed_at: float | None = None
        self.writes = 0
        """State files written (a measure of what durability costs)."""

    @property
    def healthy(self) -> bool:
        return True

    async def start(self, now: float) -> None:
        self._latest = max(self._latest, now)

    async def close(self) -> None:
        # Saving is the owner's call because it knows the path; a write ahead
        # in flight is let finish, so the file is never left half-decided.
        await self.settled()

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
            used = self._add(
                customer_id, quota.period_key, grant, quota.expires_at, quota.limit
            )
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

    def _add(
        self, customer_id: str, key: str, amount: int, expires: float, limit: int
    ) -> int:
        slot = (customer_id, key)
        used = max(0, self._used.get(slot, 0) + amount)
        self._used[slot] = used
        self._expires[slot] = expires
        self._limits[slot] = limit
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
            used = self._add(customer_id, period_key, granted, expires, limit)
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
            self._limits.pop(slot, None)
            self._durable.pop(slot, None)

    def take_nowait(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Charge | None:
        if quota is not None and self.state_path is not None:
            slot = (customer_id, quota.period_key)
            if self._used.get(slot, 0) + max(0, amount) > self._durable.get(slot, 0):
                return None  # the state file must count these first: `take` writes it
            charge = self.take_now(customer_id, amount, now, bucket, quota)
            self._keep_ahead(slot, quota.limit, now)
            return charge
        return self.take_now(customer_id, amount, now, bucket, quota)

    def give_back_nowait(
        self,
        customer_id: str,
        amount: int,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> bool:
        self.give_back_now(customer_id, amount, bucket, quota)
        return True

    # ---- async interface -------------------------------------------------------

    async def take(
        self,
        customer_id: str,
        amount: int,
        now: float,
        bucket: BucketLimit | None,
        quota: QuotaLimit | None,
    ) -> Charge:
        charge = self.take_now(customer_id, amount, now, bucket, quota)
        if quota is not None and charge.granted:
            slot = (customer_id, quota.period_key)
            await self._cover(slot, now)
            self._keep_ahead(slot, quota.limit, now)
        return charge

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
        granted, used = self.charge_now(
            customer_id, period_key, amount, limit, expires_at
        )
        if granted:
            await self._cover((customer_id, period_key), self._latest)
        return granted, used

    async def refund(self, customer_id: str, period_key: str, amount: int) -> int:
        return self.refund_now(customer_id, period_key, amount)

    async def usage(
        self, customer_id: str, period_key: str, expires_at: float | None = None
    ) -> int:
        return self.usage_now(customer_id, period_key)

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "healthy": True}

    # ---- persistence -----------------------------------------------------------

    async def _cover(self, slot: Slot, now: float) -> None:
        """
        Make sure the state file counts at least ``used`` for ``slot`` before
        the caller hands out what it was just granted.
        """
        path = self.state_path
        if path is None or self._covered(slot):
            return
        async with self._write_lock:
            # A write that finished while this one queued may cover it already.
            if not self._covered(slot):
                await self._write_marks(path, now)

    def _keep_ahead(self, slot: Slot, limit: int, now: float) -> None:
        # Once half of a counter's head start is spent, move its mark ahead in
        # the background: grants go on under the current mark meanwhile, so a
        # customer drawing steadily never waits for the disk.
        if self._ahead is not None or self.state_path is None:
            return
        if not self._running_low(slot, limit):
            return
        self._ahead = asyncio.get_running_loop().create_task(
            self._write_ahead(slot, limit, now)
        )
        self._ahead.add_done_callback(self._ahead_done)

    def _running_low(self, slot: Slot, limit: int) -> bool:
        # Half of the counter's head start is spent, and a new mark could
        # still move it (a mark never passes the quota).
        mark = self._durable.get(slot, 0)
        return mark < limit and 2 * (mark - self._used.get(slot, 0)) < reservation(
            limit
        )

    def _ahead_done(self, task: "asyncio.Task[None]") -> None:
        self._ahead = None

    async def settled(self) -> None:
        """
        Return once no write ahead is in flight.
        """
        if self._ahead is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._ahead)

    async def _write_ahead(self, slot: Slot, limit: int, now: float) -> None:
        path = self.state_path
        if path is None:
            return
        async with self._write_lock:
            # A write that finished while this one queued may have moved it.
            if self._running_low(slot, limit):
                await self._write_marks(path, now)

    async def _write_marks(self, path: Path, now: float) -> None:
        # Write every counter's mark a reservation ahead (the write lock held).
        if (
            self._write_failed_at is not None
            and now < self._write_failed_at + WRITE_RETRY
        ):
            return  # the disk just failed: serve on, try again shortly
        try:
            await self._write_locked(path, reserve=True)
        except OSError as exc:
            # Refusing every metered grant over a full or broken disk would
            # stop the supply; counts stay exact in memory, and only a crash
            # before the disk recovers could lose them.
            self._write_failed_at = now
            log.error(
                "accounts_state_save_failed",
                path=str(path),
                error=str(exc),
            )
        else:
            self._write_failed_at = None

    def _covered(self, slot: Slot) -> bool:
        return self._used.get(slot, 0) <= self._durable.get(slot, 0)

    async def persist(self, *, exact: bool = False) -> None:
        """
        Write the quota counters to `state_path` (no-op without one).

        Args:
            exact: write the counts themselves (at shutdown, when no grant
                follows) rather than marks a reservation ahead of them.

        Raises:
            OSError: the file could not be written.
        """
        path = self.state_path
        if path is None:
            return
        async with self._write_lock:
            await self._write_locked(path, reserve=not exact, force=exact)

    async def _write_locked(
        self, path: Path, *, reserve: bool, force: bool = False
    ) -> None:
        self.prune(self._latest)
        marks = {
            slot: reserved_mark(used, self._limits.get(slot) if reserve else None)
            for slot, used in self._used.items()
        }
        if marks == self._durable and not force:
            return  # the file already says this
        # Until the rename lands the old file is in force: a mark this write
        # lowers (after refunds) must not be granted against in the meantime.
        self._durable = {
            slot: min(mark, self._durable.get(slot, 0)) for slot, mark in marks.items()
        }
        text = self._render(marks)
        await asyncio.to_thread(_write_atomically, path, text)
        self.writes += 1
        for slot, mark in marks.items():
            if slot in self._durable:
                self._durable[slot] = mark

    def _render(self, counts: dict[Slot, int]) -> str:
        entries = [
            {
                "customer": customer_id,
                "period": period_key,
                "used": used,
                "expires_at": None
                if math.isinf(self._expires.get((customer_id, period_key), math.inf))
                else self._expires[(customer_id, period_key)],
            }
            for (customer_id, period_key), used in sorted(counts.items())
        ]
        return json.dumps({"version": _STATE_VERSION, "quotas": entries}, indent=1)

    def save(self, path: Path) -> None:
        """
        Write the exact quota counters to ``path`` atomically (blocking file
        I/O: call it through `asyncio.to_thread` from the event loop).

        Counters of periods that ended before the latest ``now`` seen are dropped.
        """
        self.prune(self._latest)
        _write_atomically(path, self._render(dict(self._used)))

    def load(self, path: Path) -> int:
        """
        Read counters saved by `save` or `persist`, keeping the larger value
        where this backend already counted something. A missing file is an
        empty state. A mark read from `state_path` counts as spent: the
        reservation a crash left unused is not handed out again.

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
            if path == self.state_path:
                self._durable[slot] = used
            count += 1
        return count


def _write_atomically(path: Path, text: str) -> None:
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
