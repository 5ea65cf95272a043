"""
Open-file headroom for the connection caps the config promises.

Every client connection is a file descriptor. systemd and most shells start a
process with a soft limit of 1,024 while allowing far more (the hard limit),
so a broker whose sinks accept 1,024 connections each would run out of
descriptors long before any cap bites: new clients, health checks and source
reopens would then fail with EMFILE. At start the broker raises its soft limit
as far as the hard limit allows, and warns when even that cannot cover the
caps, naming the numbers an operator needs (systemd: ``LimitNOFILE=``).
"""

import resource
from dataclasses import dataclass

RESERVED = 256
"""Descriptors kept for everything but client connections: listeners,
sources, the state directory, Redis, logging, the event loop itself."""


@dataclass(frozen=True, slots=True)
class FdBudget:
    """
    What the config needs and what the process may open.
    """

    needed: int
    soft: int
    hard: int

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed


def needed_for(connection_caps: list[int]) -> int:
    """
    Descriptors the broker may hold with every sink at its cap.
    """
    return sum(connection_caps) + RESERVED


def planned_soft_limit(soft: int, hard: int, needed: int) -> int:
    """
    The soft limit to set: ``needed`` if the hard limit allows it, else the
    hard limit; never lower than the current soft limit.
    """
    infinity = resource.RLIM_INFINITY
    if soft == infinity:
        return soft
    ceiling = needed if hard == infinity else min(needed, hard)
    return max(soft, ceiling)


def raise_soft_limit(needed: int) -> FdBudget:
    """
    Raise the process's soft RLIMIT_NOFILE towards ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    planned = planned_soft_limit(soft, hard, needed)
    if planned != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (planned, hard))
    return FdBudget(needed=needed, soft=planned, hard=hard)
