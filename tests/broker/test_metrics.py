"""
Prometheus metrics are read from the broker view at scrape time.
"""

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from broker import __version__
from broker.accounts import Accounts
from broker.metrics import (
    HEALTH_STATES,
    SOURCE_STATES,
    create_registry,
    render_metrics,
)
from broker.pool import EntropyPool
from broker.status import (
    ConfigStatus,
    Health,
    Phase,
    SinkStatus,
    SourceStatus,
    TierStatus,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def source(
    name: str,
    state: str,
    *,
    priority: int = 0,
    restarts: int = 1,
    feeding: bool = True,
) -> SourceStatus:
    return SourceStatus(
        name=name,
        kind="device",
        priority=priority,
        state=state,
        reason="",
        since=0.0,
        bytes_in=1000,
        credited_bits=8000,
        rate=250.0,
        restarts=restarts,
        feeding=feeding,
    )


OK = Health(True, "ok", ())


@dataclass
class FakeBroker:
    """
    A `BrokerView` with fixed sources, sinks and tiers around a real pool and
    unlimited accounts; it has no simulated keys and refuses every reload.
    """

    pool: EntropyPool = field(default_factory=lambda: EntropyPool(capacity=4096))
    instance: str = "metrics-test"
    started_at: float = field(default_factory=time.time)
    sources: list[SourceStatus] = field(default_factory=list)
    sinks: list[SinkStatus] = field(default_factory=list)
    current_health: Health = OK
    is_ready: bool = True
    current_tiers: TierStatus = field(
        default_factory=lambda: TierStatus(
            active_tier=None,
            best_tier=None,
            degraded=False,
            failovers=0,
            tier_seconds={},
        )
    )
    accounts: Accounts = field(default_factory=Accounts.unlimited)
    state_dir: Path = field(default_factory=lambda: Path("/nonexistent"))

    def sources_status(self) -> list[SourceStatus]:
        return list(self.sources)

    def sinks_status(self) -> list[SinkStatus]:
        return list(self.sinks)

    def config_status(self) -> ConfigStatus:
        return ConfigStatus(sha256="0" * 64, loaded_at=0.0, path=None)

    def health(self) -> Health:
        return self.current_health

    def ready(self) -> bool:
        return self.is_ready

    def phase(self) -> Phase:
        return Phase.SERVING if self.is_ready else Phase.STARTING

    def tiers(self) -> TierStatus:
        return self.current_tiers

    async def reload(self) -> bool:
        return False

    def simulator_control(self, serial: str, action: str) -> str:
        raise KeyError(serial)


def samples(body: bytes) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_pool_series_follow_the_pool() -> None:
    """
    Pool level, capacity, waiters and in/out counters come straight from the
    pool's stats.
    """
    broker = FakeBroker()
    broker.pool.add(b"\x01" * 80, 8.0)
    broker.pool.read_nowait(10)
    body, content_type = render_metrics(broker)
    assert "text/plain; version=0.0.4; charset=utf-8" == content_type
    found = samples(body)
    stats = broker.pool.stats()
    assert stats.level == found[("ebroker_pool_level_bytes", ())]
    assert 4096 == found[("ebroker_pool_capacity_bytes", ())]
    assert 0 == found[("ebroker_pool_waiters", ())]
    assert 80 == found[("ebroker_pool_input_bytes_total", ())]
    assert 80 == found[("ebroker_pool_credited_entropy_bytes_total", ())]
    assert 10 == found[("ebroker_pool_output_bytes_total", ())]
    assert 2 == found[("ebroker_pool_output_blocks_total", ())]


def test_source_state_is_one_hot_per_source() -> None:
    """
    Each source has one state series per known state, 1 for the current one; an
    unknown state still gets its own series.
    """
    broker = FakeBroker(
        sources=[source("key1", "healthy"), source("key2", "rebooting")]
    )
    found = samples(render_metrics(broker)[0])
    for name, current, states in (
        ("key1", "healthy", SOURCE_STATES),
        ("key2", "rebooting", (*SOURCE_STATES, "rebooting")),
    ):
        series = {
            state: found[
                (
                    "ebroker_source_state",
                    (("kind", "device"), ("source", name), ("state", state)),
                )
            ]
            for state in states
        }
        assert {state: float(state == current) for state in states} == series


def test_source_counters_and_gauges() -> None:
    """
    Per-source bytes, credited bits, restarts, rate, tier and feeding are
    exported with source and kind labels.
    """
    broker = FakeBroker(
        sources=[source("key1", "healthy", priority=2, restarts=3, feeding=False)]
    )
    found = samples(render_metrics(broker)[0])
    labels = (("kind", "device"), ("source", "key1"))
    assert 1000 == found[("ebroker_source_input_bytes_total", labels)]
    assert 1000 == found[("ebroker_source_credited_entropy_bytes_total", labels)]
    assert 3 == found[("ebroker_source_restarts_total", labels)]
    assert 250 == found[("ebroker_source_rate_bytes_per_second", labels)]
    assert 2 == found[("ebroker_source_priority", labels)]
    assert 0 == found[("ebroker_source_feeding", labels)]


def test_sink_series() -> None:
    """
    Per-sink open connections, connections, bytes and requests are exported.
    """
    broker = FakeBroker(
        sinks=[SinkStatus("egd", "egd", ("tcp://[::1]:8888",), 4, 9, 512, 30)]
    )
    found = samples(render_metrics(broker)[0])
    labels = (("kind", "egd"), ("sink", "egd"))
    assert 4 == found[("ebroker_sink_open_connections", labels)]
    assert 9 == found[("ebroker_sink_connections_total", labels)]
    assert 512 == found[("ebroker_sink_output_bytes_total", labels)]
    assert 30 == found[("ebroker_sink_requests_total", labels)]


def test_refusals_and_closures_are_counted_by_reason() -> None:
    """
    Connections turned away and connections closed for misbehaving are
    separate series, each labelled with its reason.
    """
    sink = SinkStatus(
        "egd",
        "egd",
        ("tcp://127.0.0.1:8888",),
        1,
        2,
        0,
        0,
        refused={"max_connections_per_client": 936, "shutting_down": 1},
        closed={"malformed_request": 3},
    )
    found = samples(render_metrics(FakeBroker(sinks=[sink]))[0])

    def key(name: str, reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        labels = {"kind": "egd", "sink": "egd", "reason": reason}
        return (name, tuple(sorted(labels.items())))

    refused = "ebroker_sink_refused_total"
    assert 936 == found[key(refused, "max_connections_per_client")]
    assert 1 == found[key(refused, "shutting_down")]
    assert 3 == found[key("ebroker_sink_closed_total", "malformed_request")]


def test_health_readiness_and_build_info() -> None:
    """
    Health is one-hot over its statuses, serving and ready are 0/1, and build
    info names the version and hostname.
    """
    broker = FakeBroker(
        current_health=Health(False, "unhealthy", ("no healthy source",)),
        is_ready=False,
    )
    found = samples(render_metrics(broker)[0])
    assert {status: float(status == "unhealthy") for status in HEALTH_STATES} == {
        status: found[("ebroker_health_status", (("status", status),))]
        for status in HEALTH_STATES
    }
    assert 0 == found[("ebroker_serving", ())]
    assert 0 == found[("ebroker_ready", ())]
    info = (("hostname", "metrics-test"), ("version", __version__))
    assert 1 == found[("ebroker_build_info", info)]
    assert broker.started_at == found[("ebroker_start_time_seconds", ())]


def test_a_reused_registry_reads_the_broker_at_each_scrape() -> None:
    """
    A registry built once reflects changes made after it was built, and two
    brokers' registries stay independent.
    """
    first, second = FakeBroker(), FakeBroker(instance="other")
    registry = create_registry(first)
    assert (
        0
        == samples(render_metrics(first, registry=registry)[0])[
            ("ebroker_pool_level_bytes", ())
        ]
    )
    first.pool.add(b"\x02" * 40, 8.0)
    assert (
        32
        == samples(render_metrics(first, registry=registry)[0])[
            ("ebroker_pool_level_bytes", ())
        ]
    )
    assert 0 == samples(render_metrics(second)[0])[("ebroker_pool_level_bytes", ())]


def test_openmetrics_when_the_scraper_asks() -> None:
    """
    An Accept header asking for OpenMetrics gets it, terminated by ``# EOF``.
    """
    body, content_type = render_metrics(
        FakeBroker(), accept="application/openmetrics-text; version=1.0.0"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    body, content_type = render_metrics(FakeBroker(), accept="text/plain")
    assert content_type.startswith("text/plain")


def test_tier_series_and_health_test_counters() -> None:
    """
    The active tier (-1 when none is healthy), degradation, failovers, seconds
    per tier and each source's health-test failures and quarantines are
    exported.
    """
    tested = dataclasses.replace(
        source("key1", "quarantined"),
        health={
            "rct_failures": 2,
            "apt_failures": 1,
            "repeat_failures": 5,
            "quarantines": 3,
        },
    )
    broker = FakeBroker(
        sources=[tested],
        current_tiers=TierStatus(
            active_tier=1,
            best_tier=0,
            degraded=True,
            failovers=4,
            tier_seconds={"0": 10.0, "1": 2.5},
        ),
    )
    found = samples(render_metrics(broker)[0])
    assert 1 == found[("ebroker_active_tier", ())]
    assert 1 == found[("ebroker_degraded", ())]
    assert 4 == found[("ebroker_failovers_total", ())]
    assert 2.5 == found[("ebroker_tier_active_seconds_total", (("tier", "1"),))]
    labels = (("kind", "device"), ("source", "key1"))
    assert (
        2 == found[("ebroker_source_test_failures_total", (*labels, ("test", "rct")))]
    )
    repeat = (*labels, ("test", "repeat"))
    assert 5 == found[("ebroker_source_test_failures_total", repeat)]
    assert 3 == found[("ebroker_source_quarantines_total", labels)]
    assert -1 == samples(render_metrics(FakeBroker())[0])[("ebroker_active_tier", ())]


def test_customer_series_come_from_the_accounts() -> None:
    """
    Per-customer series are labelled by customer, and the budget store's
    health is exported.
    """
    found = samples(render_metrics(FakeBroker())[0])
    customer = (("customer", "default"),)
    assert 0 == found[("ebroker_customer_served_bytes_total", customer)]
    assert 0 == found[("ebroker_customer_clients", customer)]
    assert 1 == found[("ebroker_accounts_backend_healthy", ())]


def test_output_served_and_buffered_per_tier() -> None:
    """
    Output bytes served and still buffered are exported per tier, so the share
    of served entropy that hardware backed is a query away.
    """
    broker = FakeBroker(
        current_tiers=TierStatus(
            active_tier=0,
            best_tier=0,
            degraded=False,
            failovers=1,
            tier_seconds={"0": 10.0, "1": 2.5},
            served_by_tier={"0": 9000, "1": 4096, "none": 32},
            buffered_by_tier={"0": 1024, "1": 0},
        ),
    )
    found = samples(render_metrics(broker)[0])
    served = "ebroker_tier_output_bytes_total"
    assert 9000 == found[(served, (("tier", "0"),))]
    assert 4096 == found[(served, (("tier", "1"),))]
    assert 32 == found[(served, (("tier", "none"),))]
    assert 1024 == found[("ebroker_tier_buffered_bytes", (("tier", "0"),))]
    assert 0 == found[("ebroker_tier_buffered_bytes", (("tier", "1"),))]
