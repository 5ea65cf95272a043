"""
Read-only views of the running broker, shared by the HTTP sink, metrics and CLI.

Sinks receive a `BrokerView` and never reach into sources or the supervisor.
The view lists everything a sink may use; a sink that needs more extends the
view rather than probing the broker for attributes.
"""

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from broker.pool import EntropyPool

if TYPE_CHECKING:
    # Only for annotations: a runtime import would make this leaf module depend
    # on the accounts package, and any use of these views there an import cycle.
    from broker.accounts import Accounts


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
    refused: Mapping[str, int] = field(default_factory=dict)
    """Connections turned away before being served, by reason
    (``max_connections``, ...)."""
    closed: Mapping[str, int] = field(default_factory=dict)
    """Served connections the sink closed for misbehaving, by reason
    (``malformed_request``, ...)."""


@dataclass(frozen=True, slots=True)
class TierStatus:
    """
    Which tier feeds the pool, how often that changed, and how much of what
    was served each tier backed.
    """

    active_tier: int | None
    best_tier: int | None
    degraded: bool
    failovers: int
    tier_seconds: Mapping[str, float]
    """Seconds each tier was the active one ("none": no healthy source)."""
    served_by_tier: Mapping[str, int] = field(default_factory=dict)
    """
    Output bytes served to clients, by the tier whose credited input produced
    them ("none": input credited from no source tier).
    """
    buffered_by_tier: Mapping[str, int] = field(default_factory=dict)
    """Output bytes in the pool, ready to be served, by tier as above."""


class Phase(enum.StrEnum):
    """
    Where the broker is in its life. SIGTERM moves a serving broker to
    ``draining`` (still serving, /healthz 503, so balancers stop sending),
    then ``closing`` (listeners closed, accepted requests answered within
    ``shutdown_grace``), then ``stopped``.
    """

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    CLOSING = "closing"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Health:
    """
    Whether this instance should receive traffic, and why.
    """

    serving: bool
    status: str
    """``ok``, ``degraded``, ``unhealthy`` or ``shutting_down``."""
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConfigStatus:
    """
    Which configuration is in force: an operator comparing brokers of a fleet,
    or checking that a reload took, compares ``sha256``.
    """

    sha256: str
    """Digest of the file as last loaded (or of the settings, without a file)."""
    loaded_at: float
    """Wall-clock time (Unix seconds) of the start or the last accepted reload."""
    path: str | None


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

    @property
    def state_dir(self) -> Path:
        """
        Where relative listen paths (``unix:egd.sock``) and runtime files live.
        """
        ...

    def sources_status(self) -> list[SourceStatus]: ...

    def sinks_status(self) -> list[SinkStatus]: ...

    def health(self) -> Health: ...

    def config_status(self) -> ConfigStatus:
        """
        The configuration in force: its digest and when it was loaded.
        """
        ...

    def ready(self) -> bool:
        """
        True once start-up is complete and until shutdown begins.
        """
        ...

    def phase(self) -> Phase:
        """
        Starting, serving, draining, closing or stopped.
        """
        ...

    def tiers(self) -> TierStatus:
        """
        Which tier feeds the pool, and how often that changed.
        """
        ...

    @property
    def accounts(self) -> "Accounts":
        """
        Who the clients are and what each may draw; sinks ask it before every
        withdrawal.
        """
        ...

    async def reload(self) -> bool:
        """
        Re-read customers and limits, as SIGHUP does.

        Returns:
            True when the new customers and limits are in force; False when the
            new configuration was refused and the running one kept.
        """
        ...

    def simulator_control(self, serial: str, action: str) -> str:
        """
        Act on a simulated Entropy Key: ``unplug``, ``replug``, ``fail`` or
        ``heal``.

        Returns:
            The action taken.

        Raises:
            KeyError: no simulated key has that serial (a broker without
                simulated keys raises it for every serial).
            ValueError: unknown action.
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

    def bound_addresses(self) -> list[str]:
        """
        The addresses actually bound, with real ports (``tcp://127.0.0.1:43211``,
        ``unix:/run/ebroker/egd.sock``); empty before `start`.
        """
        ...
