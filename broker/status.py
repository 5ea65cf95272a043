"""
Read-only views of the running broker, shared by the HTTP sink, metrics and CLI.

Sinks receive a `BrokerView` and never reach into sources or the supervisor.
"""

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.pool import EntropyPool


class SourceState(enum.StrEnum):
    """
    Lifecycle of a source as reported in status and metrics.
    """

    STARTING = "starting"
    HEALTHY = "healthy"
    QUARANTINED = "quarantined"
    STALLED = "stalled"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """
    One source as status and metrics report it.
    """

    name: str
    kind: str
    priority: int
    state: str
    reason: str
    since: float
    """Wall-clock time (Unix seconds) of the last state change."""
    bytes_in: int
    credited_bits: int
    rate: float
    """Bytes per second over the recent past."""
    restarts: int
    feeding: bool
    """Whether this source's output is credited into the pool right now."""
    health: Mapping[str, Any] = field(default_factory=dict)
    """Health-test state and counters: cut-offs, failures, quarantines."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """Driver-specific facts (an Entropy Key's serial, temperature, counters)."""


@dataclass(frozen=True, slots=True)
class SinkStatus:
    """
    One sink as status and metrics report it.
    """

    name: str
    kind: str
    addresses: tuple[str, ...]
    connections: int
    connections_total: int
    bytes_out: int
    requests: int


@dataclass(frozen=True, slots=True)
class TierStatus:
    """
    Which tier feeds the pool and how often that changed.
    """

    active_tier: int | None
    best_tier: int | None
    degraded: bool
    failovers: int
    tier_seconds: Mapping[str, float]
    """Seconds each tier was the active one ("none": no healthy source)."""


@dataclass(frozen=True, slots=True)
class Health:
    """
    Whether this instance should receive traffic, and why.
    """

    serving: bool
    status: str
    """``ok``, ``degraded``, ``unhealthy`` or ``shutting_down``."""
    reasons: tuple[str, ...]


class BrokerView(Protocol):
    """
    What a sink may know about the broker it serves.
    """

    @property
    def pool(self) -> EntropyPool: ...

    @property
    def instance(self) -> str: ...

    @property
    def started_at(self) -> float: ...

    def sources_status(self) -> list[SourceStatus]: ...

    def sinks_status(self) -> list[SinkStatus]: ...

    def health(self) -> Health: ...

    def ready(self) -> bool:
        """
        True once start-up is complete and until shutdown begins.
        """
        ...


class Sink(Protocol):
    """
    A protocol server fed by the pool.
    """

    name: str
    kind: str

    async def start(self) -> None:
        """
        Bind every listen address and start accepting.
        """
        ...

    def pre_shutdown(self) -> None:
        """
        Stop accepting new connections; keep serving the ones in flight.
        """
        ...

    async def shutdown(self, timeout: float) -> None:
        """
        Let in-flight work finish for up to ``timeout`` s, then close everything
        (and remove Unix socket files).
        """
        ...

    def status(self) -> SinkStatus: ...
