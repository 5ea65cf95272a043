"""
A token bucket: ``rate`` bytes per second refill, at most ``burst`` bytes saved.

Pure: every call that depends on time takes ``now`` (seconds, any monotonic
origin shared by all calls on one bucket). A new bucket starts full, so a
client's first request is served at once up to its burst.
"""

import math


class TokenBucket:
    """
    Tokens are bytes; ``take`` hands out whole bytes, fractions keep accruing.
    """

    __slots__ = ("_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        if rate < 0:
            raise ValueError("a bucket's rate cannot be negative")
        if burst < 1:
            raise ValueError("a bucket's burst must be at least one byte")
        self.rate = float(rate)
        self.burst = int(burst)
        self._tokens = float(burst)
        self._updated: float | None = None

    def _refill(self, now: float) -> None:
        if self._updated is None:
            self._updated = now
            return
        # A clock that steps back must not mint tokens, nor block later refills.
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            self._updated = now

    def available(self, now: float) -> int:
        """
        Whole bytes that could be taken at ``now``.
        """
        self._refill(now)
        return max(0, math.floor(self._tokens))

    def take(self, n: int, now: float) -> int:
        """
        Take up to ``n`` bytes; return how many were taken (possibly 0).
        """
        if n <= 0:
            return 0
        granted = min(n, self.available(now))
        self._tokens -= granted
        return granted

    def time_until(self, n: int, now: float) -> float:
        """
        Seconds from ``now`` until ``n`` bytes (capped at the burst, which is the
        most the bucket can ever hold) can be taken; 0 if they can now, and
        ``math.inf`` if the bucket never refills.
        """
        self._refill(now)
        need = min(max(n, 1), self.burst) - self._tokens
        if need <= 0:
            return 0.0
        if self.rate <= 0:
            return math.inf
        return need / self.rate

    def time_until_full(self, now: float) -> float:
        """
        Seconds until the bucket is full again (``RateLimit-Reset``).
        """
        return self.time_until(self.burst, now)

    def refund(self, n: int) -> None:
        """
        Give back ``n`` bytes that were taken but not used (never above burst).
        """
        if n > 0:
            self._tokens = min(float(self.burst), self._tokens + n)

    def reconfigure(self, rate: float, burst: int) -> None:
        """
        Apply new limits, keeping the tokens saved so far (capped at the new burst).
        """
        if rate < 0 or burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self._tokens = min(self._tokens, float(burst))

    @property
    def tokens(self) -> float:
        """
        Tokens at the last update (no refill applied).
        """
        return self._tokens
