"""
Durable quota counts for the memory backend: how far ahead of a customer's
spending the state file runs, so a crash never hands quota out twice.

Theory of operation
-------------------
Each (customer, period) counter has two numbers: ``used`` (in memory, exact)
and its *mark*: the value the state file holds for it, which is what the
counter restarts from after a crash. The invariant is

    used <= mark        whenever granted bytes are handed out,

kept by the backend: a charge that takes ``used`` past the mark writes a new
state file (temp file, fsync, rename, fsync of the directory, off the event
loop) before the grant returns. A write sets every counter's mark to
`reserved_mark` (``used + R``, capped at the quota). Once half of a counter's
head start is spent, a write moves the marks ahead in the background while
grants go on under the current mark, so a customer drawing steadily waits for
the disk only if it spends half a reservation faster than one write takes. A
clean shutdown writes exact counts (mark = used).

Worst case after SIGKILL or power loss
--------------------------------------
Let ``R = reservation(quota) = clamp(quota // 64, 4 KiB, 1 MiB)``.

- The customer never gains: every byte handed out was covered by a mark on
  disk, and the restart counts the mark as spent.
- The customer loses at most ``R + refunded``: the unspent reservation, plus
  bytes given back (refunds of unserved grants) since the last write, which
  the file still counts. Housekeeping rewrites the marks every
  ``persist_interval``, so ``refunded`` is at most one interval's refunds.

=============  ======  ==============================
quota          R       worst loss (no refunds)
=============  ======  ==============================
8 KiB/day      4 KiB   4 KiB (half of a toy quota)
1 MiB/day      16 KiB  16 KiB (1/64)
200 MiB/day    1 MiB   1 MiB (0.5 %)
5 GiB/month    1 MiB   1 MiB (0.02 %)
=============  ======  ==============================

Cost: at most one state-file write per ``R / 2`` bytes per metered customer,
plus one per ``persist_interval`` while counts change; grants of a customer
below its mark touch no disk.
"""

MIN_RESERVATION = 4096
"""Smallest head start: keeps small quotas from writing every few grants."""
MAX_RESERVATION = 1 << 20
"""Largest head start: bounds what a crash can cost a large quota."""
RESERVATION_DIVISOR = 64
"""A quota's reservation is this fraction of it (between the bounds)."""


def reservation(limit: int) -> int:
    """
    Bytes a mark runs ahead of the count for a quota of ``limit`` bytes.
    """
    return min(MAX_RESERVATION, max(MIN_RESERVATION, limit // RESERVATION_DIVISOR))


def reserved_mark(used: int, limit: int | None) -> int:
    """
    The mark to write for a counter at ``used`` under a quota of ``limit``.

    Never below ``used`` (the mark must cover what was granted) and never
    above the quota unless ``used`` already is (a reload may have lowered it);
    None (quota not known since a restart) writes the exact count.
    """
    if limit is None:
        return used
    return max(used, min(limit, used + reservation(limit)))
