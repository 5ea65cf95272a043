"""
Metric names, units and labels follow the Prometheus conventions, for a broker
that exports every family it can: an Entropy Key with its status records, a
customer with a quota, refusals, tiers and the configuration's low watermark.
"""

import dataclasses
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from broker.accounts import Accounts, AccountsConfig, CustomerConfig
from broker.config import Config, load_config
from broker.metrics import render_metrics
from broker.status import SinkStatus, TierStatus
from tests.broker.test_metrics import FakeBroker, source

REPO = Path(__file__).parents[2]

BASE_UNITS = ("bytes", "seconds", "celsius", "volts", "ratio")
"""Units a name may end in (before ``_total``), as Prometheus prefers them."""

NOT_BASE_UNITS = frozenset(
    {
        "bits",
        "kilobytes",
        "megabytes",
        "kib",
        "mib",
        "kb",
        "mb",
        "milliseconds",
        "microseconds",
        "ms",
        "minutes",
        "hours",
        "days",
        "kelvin",
        "fahrenheit",
        "millivolts",
        "percent",
    }
)

BOUNDED_LABELS = frozenset(
    {
        # broker: each bounded by the configuration or by a fixed list
        "source",
        "kind",
        "state",
        "sink",
        "reason",
        "tier",
        "test",
        "customer",
        "status",
        "hostname",
        "version",
        # prometheus_client's platform and GC collectors
        "implementation",
        "major",
        "minor",
        "patchlevel",
        "generation",
    }
)
"""Every label the broker may use: none grows with clients or addresses."""


@dataclass
class ConfiguredBroker(FakeBroker):
    """
    A `FakeBroker` with the configuration a running broker has.
    """

    config: Config = dataclasses.field(
        default_factory=lambda: load_config(REPO / "config" / "ebroker.toml")
    )


def full_broker() -> ConfiguredBroker:
    key = dataclasses.replace(
        source("ekey-a", "healthy"),
        kind="entropykey",
        since=1_700_000_000.0,
        health={"rct_failures": 0, "apt_failures": 1, "quarantines": 1},
        details={
            "serial": "KO2SYaMsVZBC9AXq",
            "temperature_c": 41.9,
            "voltage_v": 3.254,
            "fips_failures": 0,
            "frames_ok": 120,
            "mac_failures": 1,
            "resets": 1,
            "rekeys": 2,
        },
    )
    acme = CustomerConfig.model_validate(
        {"id": "acme", "networks": ["10.1.0.0/16"], "quota": "1 MiB/day"}
    )
    return ConfiguredBroker(
        sources=[key, source("getrandom", "starting", priority=1)],
        sinks=[
            SinkStatus(
                "egd",
                "egd",
                ("tcp://127.0.0.1:8888",),
                1,
                2,
                64,
                3,
                refused={"max_connections": 2},
                closed={"malformed_request": 1},
            )
        ],
        current_tiers=TierStatus(
            active_tier=0,
            best_tier=0,
            degraded=False,
            failovers=1,
            tier_seconds={"0": 5.0, "none": 0.1},
            served_by_tier={"0": 64},
            buffered_by_tier={"0": 0},
        ),
        accounts=Accounts(AccountsConfig(), [acme]),
    )


def exposition() -> str:
    return render_metrics(full_broker())[0].decode()


def all_samples() -> list[tuple[str, str, Sample]]:
    """
    ``(family name, family type, sample)`` for every sample of a full scrape.
    """
    return [
        (family.name, family.type, sample)
        for family in text_string_to_metric_families(exposition())
        for sample in family.samples
    ]


def test_names_have_a_namespace_and_base_units() -> None:
    """
    Every name is the broker's (``ebroker_``) or a standard collector's
    (``process_``, ``python_``), and names no unit but a base one.
    """
    for family, _, sample in all_samples():
        assert re.fullmatch(r"(ebroker|process|python)_[a-z0-9_]+", sample.name)
        words = set(family.split("_"))
        assert set() == words & NOT_BASE_UNITS, family


def test_counters_end_in_total_and_gauges_do_not() -> None:
    """
    Counter samples end in ``_total``; gauges never do; ``_info`` series are 1.
    """
    kinds: dict[str, set[str]] = {}
    for family, kind, sample in all_samples():
        kinds.setdefault(kind, set()).add(family)
        if kind == "counter":
            assert sample.name.endswith("_total"), sample.name
        if kind == "gauge":
            assert not sample.name.endswith("_total"), sample.name
        if sample.name.endswith("_info"):
            assert 1 == sample.value, sample.name
    assert {"counter", "gauge"} <= kinds.keys()


def test_units_come_last() -> None:
    """
    A name that carries a base unit carries it at the end (``_bytes``,
    ``_bytes_total``); a rate per second is the one other place for one.
    """
    for family, _, _ in all_samples():
        words = family.split("_")
        for unit in BASE_UNITS:
            if unit in words[:-1]:
                assert "_".join(words[words.index(unit) :]) == f"{unit}_per_second", (
                    family
                )


def test_no_label_prometheus_owns_and_none_unbounded() -> None:
    """
    No series has an ``instance`` or ``job`` label (Prometheus sets those to
    the target), and every label is one whose values the config bounds.
    """
    for _, _, sample in all_samples():
        assert set() == sample.labels.keys() & {"instance", "job"}, sample
        assert sample.labels.keys() <= BOUNDED_LABELS, sample
    info = [
        sample for _, _, sample in all_samples() if sample.name == "ebroker_build_info"
    ]
    assert ["metrics-test"] == [sample.labels["hostname"] for sample in info]


def test_entropy_key_temperature_and_voltage_gauges() -> None:
    """
    An Entropy Key's status records become gauges in celsius and volts,
    labelled by source; a source without them has no such series.
    """
    found = {
        (sample.name, sample.labels["source"]): sample.value
        for _, kind, sample in all_samples()
        if kind == "gauge" and sample.name.startswith("ebroker_device_")
    }
    assert 41.9 == found[("ebroker_device_temperature_celsius", "ekey-a")]
    assert 3.254 == found[("ebroker_device_supply_voltage_volts", "ekey-a")]
    assert ("ebroker_device_temperature_celsius", "getrandom") not in found


def test_credited_entropy_is_counted_in_bytes() -> None:
    """
    Credited entropy is exported in bytes: the bits credited divided by 8.
    """
    broker = full_broker()
    broker.pool.add(b"\x01" * 80, 4.0)
    found = {
        (sample.name, sample.labels.get("source")): sample.value
        for family in text_string_to_metric_families(render_metrics(broker)[0].decode())
        for sample in family.samples
    }
    assert 40 == found[("ebroker_pool_credited_entropy_bytes_total", None)]
    # source() credits 8,000 bits.
    assert 1000 == found[("ebroker_source_credited_entropy_bytes_total", "ekey-a")]


def test_quota_low_watermark_and_state_change_time() -> None:
    """
    A customer with a quota has its limit, use and remainder; the pool's low
    watermark comes from the configuration; each source has the time of its
    last state change.
    """
    found = {
        (sample.name, sample.labels.get("customer") or sample.labels.get("source")): (
            sample.value
        )
        for _, _, sample in all_samples()
    }
    assert 1 << 20 == found[("ebroker_customer_quota_limit_bytes", "acme")]
    assert 0 == found[("ebroker_customer_quota_used_bytes", "acme")]
    assert 1 << 20 == found[("ebroker_customer_quota_remaining_bytes", "acme")]
    assert found[("ebroker_customer_quota_reset_time_seconds", "acme")] > 0
    assert ("ebroker_customer_quota_limit_bytes", "default") not in found
    assert 4096 == found[("ebroker_pool_low_watermark_bytes", None)]
    assert (
        1_700_000_000.0 == found[("ebroker_source_state_change_time_seconds", "ekey-a")]
    )


def test_process_and_python_collectors_are_registered() -> None:
    """
    ``process_*`` and ``python_*`` come from prometheus_client's collectors.
    """
    names = {sample.name for _, _, sample in all_samples()}
    assert {
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "python_info",
        "python_gc_collections_total",
    } <= names


@pytest.mark.needs_tool("promtool")
def test_promtool_finds_nothing_to_lint() -> None:
    """
    ``promtool check metrics`` accepts a full scrape without a remark.
    """
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (0, "", "") == (result.returncode, result.stdout, result.stderr)
