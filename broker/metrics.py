"""
Prometheus metrics of a running broker.

Nothing here keeps counters of its own: `BrokerCollector` reads the `BrokerView`
at scrape time, so the numbers can never drift from what status reports, and an
idle broker pays nothing for metrics. Each broker gets its own `CollectorRegistry`
(never the process-global default), so several brokers in one process (tests)
do not collide.

Names follow the Prometheus conventions that ``promtool check metrics`` lints:
base units in the name (bytes, seconds, celsius, volts), ``_total`` on
counters, ``_info`` gauges of 1 carrying labels, and no label that Prometheus
sets itself (``instance``, ``job``): the host is ``hostname`` on
``ebroker_build_info``. Entropy is counted in bytes (credited bits / 8), as
promtool asks. Labels are bounded by the config: sources, sinks, customers and
tiers, never clients. The registry also holds prometheus_client's process,
platform and garbage-collector collectors, so ``process_*`` and ``python_*``
come with every scrape.
"""

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.exposition import generate_latest as _generate_text
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from broker import __version__
from broker.status import BrokerView, SourceState

if TYPE_CHECKING:
    # Only for annotations: the config module imports every source and sink.
    from broker.config import Config

NAMESPACE = "ebroker"
SOURCE_STATES: tuple[str, ...] = tuple(state.value for state in SourceState)
HEALTH_STATES: tuple[str, ...] = ("ok", "degraded", "unhealthy", "shutting_down")
BITS_PER_BYTE = 8


@runtime_checkable
class _Configured(Protocol):
    """
    A broker whose configuration can be read: the running `broker.app.Broker`.

    `BrokerView` does not list the pool's low watermark; until it does, the
    collector reads it from the configuration when the broker has one, and
    views without it (test doubles) simply lack that series.
    """

    @property
    def config(self) -> "Config": ...


def _one_hot(
    family: GaugeMetricFamily, labels: list[str], current: str, known: Iterable[str]
) -> None:
    """
    Add one series per known value, 1 for ``current`` and 0 for the others.

    Emitting the zeros too means a PromQL query never sees a state series vanish
    and reappear, and an unknown ``current`` value still gets its own series.
    """
    values = list(known)
    if current not in values:
        values.append(current)
    for value in values:
        family.add_metric([*labels, value], 1.0 if value == current else 0.0)


DEVICE_DETAILS: dict[str, tuple[str, str, str]] = {
    "temperature_c": ("gauge", "device_temperature_celsius", "Device temperature"),
    "voltage_v": ("gauge", "device_supply_voltage_volts", "Device supply voltage"),
    "fips_failures": (
        "gauge",
        "device_fips_failed_blocks",
        "FIPS 140-2 blocks the device itself reports as failed",
    ),
    "frames_ok": ("counter", "device_frames_ok", "Frames received intact"),
    "mac_failures": (
        "counter",
        "device_mac_failures",
        "Frames dropped for a bad MAC or malformed packet",
    ),
    "resets": ("counter", "device_resets", "Protocol resets sent to the device"),
    "rekeys": ("counter", "device_rekeys", "Session rekeys completed"),
    "failovers": (
        "counter",
        "upstream_failovers",
        "Moves of an upstream source (egd, http) to another of its endpoints",
    ),
}


class BrokerCollector(Collector):
    """
    Collector reading pool, source, sink and health figures from a `BrokerView`.
    """

    def __init__(self, broker: BrokerView) -> None:
        self._broker = broker

    def describe(self) -> Iterable[Metric]:
        # Describing nothing keeps the registry from calling collect() at
        # registration, when the broker may not be fully built yet.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._collect_broker()
        yield from self._collect_pool()
        yield from self._collect_sources()
        yield from self._collect_sinks()
        yield from self._collect_tiers()
        yield from self._collect_customers()

    def _collect_broker(self) -> Iterator[Metric]:
        broker = self._broker
        info = InfoMetricFamily(f"{NAMESPACE}_build", "Version of this broker")
        # "hostname", not "instance": Prometheus sets instance to the target.
        info.add_metric([], {"version": __version__, "hostname": broker.instance})
        yield info
        yield GaugeMetricFamily(
            f"{NAMESPACE}_start_time_seconds",
            "Wall-clock time (Unix seconds) the broker started",
            value=broker.started_at,
        )
        health = broker.health()
        status = GaugeMetricFamily(
            f"{NAMESPACE}_health_status",
            "Health of this instance: 1 for the current status, 0 for the others",
            labels=["status"],
        )
        _one_hot(status, [], health.status, HEALTH_STATES)
        yield status
        yield GaugeMetricFamily(
            f"{NAMESPACE}_serving",
            "1 while this instance should receive traffic (what /healthz reports)",
            value=1.0 if health.serving else 0.0,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_ready",
            "1 once start-up is complete and until shutdown begins (/readyz)",
            value=1.0 if broker.ready() else 0.0,
        )

    def _collect_pool(self) -> Iterator[Metric]:
        stats = self._broker.pool.stats()
        prefix = f"{NAMESPACE}_pool"
        yield GaugeMetricFamily(
            f"{prefix}_level_bytes",
            "Output bytes ready to be withdrawn",
            value=stats.level,
        )
        yield GaugeMetricFamily(
            f"{prefix}_capacity_bytes",
            "Size of the output buffer",
            value=stats.capacity,
        )
        yield GaugeMetricFamily(
            f"{prefix}_waiters",
            "Withdrawals blocked waiting for output",
            value=stats.waiters,
        )
        yield CounterMetricFamily(
            f"{prefix}_input_bytes",
            "Raw bytes absorbed from sources",
            value=stats.bytes_in,
        )
        yield CounterMetricFamily(
            f"{prefix}_credited_entropy_bytes",
            "Entropy credited to absorbed input, in bytes (credited bits / 8)",
            value=stats.credited_bits_in / BITS_PER_BYTE,
        )
        yield CounterMetricFamily(
            f"{prefix}_uncredited_input_bytes",
            "Bytes mixed in without entropy credit",
            value=stats.uncredited_bytes_in,
        )
        yield CounterMetricFamily(
            f"{prefix}_output_bytes",
            "Conditioned bytes handed out",
            value=stats.bytes_out,
        )
        yield CounterMetricFamily(
            f"{prefix}_output_blocks",
            "Conditioned output blocks produced",
            value=stats.blocks_out,
        )
        if isinstance(self._broker, _Configured):
            yield GaugeMetricFamily(
                f"{prefix}_low_watermark_bytes",
                "Pool level below which, with no healthy source, the broker "
                "reports unhealthy",
                value=self._broker.config.broker.low_watermark,
            )

    def _collect_sources(self) -> Iterator[Metric]:
        prefix = f"{NAMESPACE}_source"
        labels = ["source", "kind"]
        state = GaugeMetricFamily(
            f"{prefix}_state",
            "State of each source: 1 for the current state, 0 for the others",
            labels=[*labels, "state"],
        )
        feeding = GaugeMetricFamily(
            f"{prefix}_feeding",
            "1 while this source's output is credited into the pool",
            labels=labels,
        )
        priority = GaugeMetricFamily(
            f"{prefix}_priority",
            "Tier of each source (lower is preferred)",
            labels=labels,
        )
        rate = GaugeMetricFamily(
            f"{prefix}_rate_bytes_per_second",
            "Bytes per second delivered over the recent past",
            labels=labels,
        )
        bytes_in = CounterMetricFamily(
            f"{prefix}_input_bytes", "Raw bytes read from each source", labels=labels
        )
        credited = CounterMetricFamily(
            f"{prefix}_credited_entropy_bytes",
            "Entropy credited from each source, in bytes (credited bits / 8)",
            labels=labels,
        )
        restarts = CounterMetricFamily(
            f"{prefix}_restarts",
            "Times each source's driver was restarted",
            labels=labels,
        )
        changed = GaugeMetricFamily(
            f"{prefix}_state_change_time_seconds",
            "Wall-clock time (Unix seconds) of each source's last state change",
            labels=labels,
        )
        for source in self._broker.sources_status():
            values = [source.name, source.kind]
            _one_hot(state, values, source.state, SOURCE_STATES)
            feeding.add_metric(values, 1.0 if source.feeding else 0.0)
            priority.add_metric(values, source.priority)
            rate.add_metric(values, source.rate)
            bytes_in.add_metric(values, source.bytes_in)
            credited.add_metric(values, source.credited_bits / BITS_PER_BYTE)
            restarts.add_metric(values, source.restarts)
            changed.add_metric(values, source.since)
        yield from (state, feeding, priority, rate, bytes_in, credited, restarts)
        yield changed
        yield from self._collect_device_details()

    def _collect_tiers(self) -> Iterator[Metric]:
        tiers = self._broker.tiers()
        active = GaugeMetricFamily(
            f"{NAMESPACE}_active_tier", "Tier feeding the pool (-1: none healthy)"
        )
        active.add_metric([], -1 if tiers.active_tier is None else tiers.active_tier)
        degraded = GaugeMetricFamily(
            f"{NAMESPACE}_degraded", "1 while only a fallback tier feeds the pool"
        )
        degraded.add_metric([], 1.0 if tiers.degraded else 0.0)
        failovers = CounterMetricFamily(
            f"{NAMESPACE}_failovers", "Changes of the tier feeding the pool"
        )
        failovers.add_metric([], tiers.failovers)
        seconds = CounterMetricFamily(
            f"{NAMESPACE}_tier_active_seconds",
            "Seconds each tier fed the pool (tier 'none': no healthy source)",
            labels=["tier"],
        )
        for tier, value in sorted(tiers.tier_seconds.items()):
            seconds.add_metric([tier], value)
        served = CounterMetricFamily(
            f"{NAMESPACE}_tier_output_bytes",
            "Output bytes served to clients, by the tier whose input backed them "
            "(tier 'none': input credited from no source)",
            labels=["tier"],
        )
        for tier, nbytes in sorted(tiers.served_by_tier.items()):
            served.add_metric([tier], nbytes)
        buffered = GaugeMetricFamily(
            f"{NAMESPACE}_tier_buffered_bytes",
            "Output bytes ready in the pool, by the tier whose input backed them",
            labels=["tier"],
        )
        for tier, nbytes in sorted(tiers.buffered_by_tier.items()):
            buffered.add_metric([tier], nbytes)
        failures = CounterMetricFamily(
            f"{NAMESPACE}_source_test_failures",
            "Health test failures of each source, by test",
            labels=["source", "kind", "test"],
        )
        quarantines = CounterMetricFamily(
            f"{NAMESPACE}_source_quarantines",
            "Times each source was quarantined by its health tests",
            labels=["source", "kind"],
        )
        for source in self._broker.sources_status():
            health = source.health
            for test in ("rct", "apt", "repeat", "fips"):
                count = health.get(f"{test}_failures")
                if isinstance(count, int):
                    failures.add_metric([source.name, source.kind, test], count)
            if isinstance(health.get("quarantines"), int):
                quarantines.add_metric(
                    [source.name, source.kind], health["quarantines"]
                )
        yield from (active, degraded, failovers, seconds, served, buffered)
        yield from (failures, quarantines)

    def _collect_customers(self) -> Iterator[Metric]:
        # Labelled by customer only: clients are unbounded, customers are config.
        snapshot = self._broker.accounts.snapshot()
        prefix = f"{NAMESPACE}_customer"
        labels = ["customer"]
        served = CounterMetricFamily(
            f"{prefix}_served_bytes", "Entropy bytes served per customer", labels=labels
        )
        throttled = CounterMetricFamily(
            f"{prefix}_throttled_seconds",
            "Seconds clients of each customer waited on rate limits",
            labels=labels,
        )
        throttled_requests = CounterMetricFamily(
            f"{prefix}_throttled_requests",
            "Requests cut short or refused by a limit",
            labels=labels,
        )
        denied = CounterMetricFamily(
            f"{prefix}_denied", "Connections or requests refused", labels=labels
        )
        remaining = GaugeMetricFamily(
            f"{prefix}_quota_remaining_bytes",
            "Bytes left in the current quota period",
            labels=labels,
        )
        used = GaugeMetricFamily(
            f"{prefix}_quota_used_bytes",
            "Bytes drawn in the current quota period (by every broker sharing "
            "the budget store)",
            labels=labels,
        )
        limit = GaugeMetricFamily(
            f"{prefix}_quota_limit_bytes",
            "Bytes each customer may draw per quota period",
            labels=labels,
        )
        resets = GaugeMetricFamily(
            f"{prefix}_quota_reset_time_seconds",
            "Wall-clock time (Unix seconds) the current quota period ends",
            labels=labels,
        )
        clients = GaugeMetricFamily(
            f"{prefix}_clients", "Clients seen recently per customer", labels=labels
        )
        for name, customer in snapshot.get("customers", {}).items():
            served.add_metric([name], customer.get("bytes_served", 0))
            throttled.add_metric([name], customer.get("throttled_seconds", 0.0))
            throttled_requests.add_metric([name], customer.get("throttled_requests", 0))
            denied.add_metric([name], customer.get("denied", 0))
            clients.add_metric([name], customer.get("client_count", 0))
            quota = customer.get("quota")
            if quota:
                remaining.add_metric([name], quota.get("remaining", 0))
                used.add_metric([name], quota.get("used", 0))
                limit.add_metric([name], quota.get("limit", 0))
                if isinstance(quota.get("resets_at"), int | float):
                    resets.add_metric([name], quota["resets_at"])
        backend = GaugeMetricFamily(
            f"{NAMESPACE}_accounts_backend_healthy",
            "1 while the budget store (memory or Redis) answers",
        )
        backend.add_metric(
            [], 1.0 if snapshot.get("backend", {}).get("healthy", True) else 0.0
        )
        yield from (served, throttled, throttled_requests, denied, clients)
        yield from (remaining, used, limit, resets, backend)

    def _collect_device_details(self) -> Iterator[Metric]:
        # Sources that report device facts (Entropy Keys) get one series per
        # fact; the label set stays bounded by the number of configured sources.
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for source in self._broker.sources_status():
            for key, (kind, name, text) in DEVICE_DETAILS.items():
                value = source.details.get(key)
                if not isinstance(value, int | float) or isinstance(value, bool):
                    continue
                family = families.get(key)
                if family is None:
                    cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                    family = cls(f"{NAMESPACE}_{name}", text, labels=["source", "kind"])
                    families[key] = family
                family.add_metric([source.name, source.kind], float(value))
        yield from families.values()

    def _collect_sinks(self) -> Iterator[Metric]:
        prefix = f"{NAMESPACE}_sink"
        labels = ["sink", "kind"]
        connections = GaugeMetricFamily(
            f"{prefix}_open_connections", "Open client connections", labels=labels
        )
        connections_total = CounterMetricFamily(
            f"{prefix}_connections", "Client connections served", labels=labels
        )
        bytes_out = CounterMetricFamily(
            f"{prefix}_output_bytes", "Entropy bytes sent to clients", labels=labels
        )
        requests = CounterMetricFamily(
            f"{prefix}_requests", "Requests handled", labels=labels
        )
        refused = CounterMetricFamily(
            f"{prefix}_refused",
            "Connections turned away before being served, by reason",
            labels=[*labels, "reason"],
        )
        closed = CounterMetricFamily(
            f"{prefix}_closed",
            "Served connections closed for misbehaving, by reason",
            labels=[*labels, "reason"],
        )
        for sink in self._broker.sinks_status():
            values = [sink.name, sink.kind]
            connections.add_metric(values, sink.connections)
            connections_total.add_metric(values, sink.connections_total)
            bytes_out.add_metric(values, sink.bytes_out)
            requests.add_metric(values, sink.requests)
            for reason, count in sorted(sink.refused.items()):
                refused.add_metric([*values, reason], count)
            for reason, count in sorted(sink.closed.items()):
                closed.add_metric([*values, reason], count)
        yield from (
            connections,
            connections_total,
            bytes_out,
            requests,
            refused,
            closed,
        )


def create_registry(broker: BrokerView) -> CollectorRegistry:
    """
    Build a registry holding a `BrokerCollector` for ``broker``, and the
    process (``process_*``), platform (``python_info``) and garbage-collector
    (``python_gc_*``) collectors of prometheus_client.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render_metrics(
    broker: BrokerView,
    *,
    registry: CollectorRegistry | None = None,
    accept: str | None = None,
) -> tuple[bytes, str]:
    """
    Render the broker's metrics for a scrape.

    Args:
        broker: the broker to describe.
        registry: a registry from `create_registry` to reuse; a fresh one is
            built when omitted.
        accept: the scraper's ``Accept`` header; OpenMetrics is returned when it
            asks for it, the classic Prometheus text format otherwise.

    Returns:
        The body and its ``Content-Type``.
    """
    if registry is None:
        registry = create_registry(broker)
    if accept is None:
        return _generate_text(registry), CONTENT_TYPE_PLAIN_0_0_4
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
