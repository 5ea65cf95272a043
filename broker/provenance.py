"""
Provenance of pool output: which source tier each output byte came from.

Theory of operation
-------------------
Each output block is attributed to the tier that contributed the most credited
bits to it (`majority_tier`: ties go to the lower tier number; input given
without a tier loses ties). The pool appends each block's tier to a `Ledger`,
which keeps the tier of every buffered byte as runs from the front of the
buffer: taking bytes from the front returns their runs, bytes given back are
prepended with theirs, bytes discarded from the back are dropped with theirs.
So bytes remember their tier while buffered, while a waiter holds them and
when given back, and the per-tier level always adds up to the buffer's level.

Input without a tier is keyed ``None`` here and reported as `NO_TIER` (-1) in
statistics (`stat_key`).
"""

from collections import deque
from dataclasses import dataclass

NO_TIER = -1
"""How statistics name input that came without a tier."""

Tier = int | None
Runs = list[tuple[Tier, int]]
"""Provenance of a stretch of output: (tier, byte count) in stream order."""


@dataclass(slots=True)
class _Run:
    tier: Tier
    size: int


class Ledger:
    """
    The tier of every buffered byte, as runs from the front of the buffer.
    """

    def __init__(self) -> None:
        self._runs: deque[_Run] = deque()
        self.level_by_tier: dict[Tier, int] = {}
        """Buffered bytes per tier (tiers with none are left out)."""

    def append(self, tier: Tier, size: int) -> None:
        """
        Record ``size`` new bytes of ``tier`` at the back.
        """
        if self._runs and self._runs[-1].tier == tier:
            self._runs[-1].size += size
        else:
            self._runs.append(_Run(tier, size))
        # Once per emission: kept inline rather than through _count.
        self.level_by_tier[tier] = self.level_by_tier.get(tier, 0) + size

    def prepend(self, runs: Runs) -> None:
        """
        Record bytes given back to the front, with the runs they left with.
        """
        for tier, size in reversed(runs):
            if self._runs and self._runs[0].tier == tier:
                self._runs[0].size += size
            else:
                self._runs.appendleft(_Run(tier, size))
            self._count(tier, size)

    def take(self, count: int) -> Runs:
        """
        Remove ``count`` bytes from the front and say where they came from.
        """
        runs = self._runs
        if runs and runs[0].size > count > 0:
            # The usual case: the bytes all come from the oldest run.
            run = runs[0]
            run.size -= count
            self.level_by_tier[run.tier] -= count
            return [(run.tier, count)]
        taken: Runs = []
        while count:
            run = self._runs[0]
            part = min(run.size, count)
            run.size -= part
            if not run.size:
                self._runs.popleft()
            taken.append((run.tier, part))
            self._count(run.tier, -part)
            count -= part
        return taken

    def drop_tail(self, count: int) -> None:
        """
        Forget the ``count`` newest bytes.
        """
        while count:
            run = self._runs[-1]
            part = min(run.size, count)
            run.size -= part
            if not run.size:
                self._runs.pop()
            self._count(run.tier, -part)
            count -= part

    def _count(self, tier: Tier, delta: int) -> None:
        total = self.level_by_tier.get(tier, 0) + delta
        if total:
            self.level_by_tier[tier] = total
        else:
            del self.level_by_tier[tier]


def majority_tier(credit: dict[Tier, int]) -> Tier:
    """
    The tier that contributed the most credit; ties go to the lower tier
    number, and input without a tier loses every tie.
    """
    if len(credit) == 1:
        # The usual case, one source tier feeding: skip the comparison.
        return next(iter(credit))
    if not credit:
        return None
    return min(credit, key=lambda tier: (-credit[tier], tier is None, tier or 0))


def stat_key(tier: Tier) -> int:
    """
    A tier as statistics report it: input without a tier is `NO_TIER`.
    """
    return NO_TIER if tier is None else tier
