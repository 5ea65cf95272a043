"""
The real daemon's ``/metrics`` against Prometheus's own checker, and the
shipped monitoring files against that output: ``promtool check metrics`` lints
a live scrape of a broker with a simulated Entropy Key and a customer with a
quota; the alert rules, the scrape example and the alert unit tests pass
promtool; and every metric the dashboard and the alert rules query is one the
broker exports.
"""

import json
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.clients import metric_value, running_daemon
from tests.integration.daemon import REPO, Daemon, default_config
from tests.promql import (
    dashboard_expressions,
    grafana_to_promql,
    metric_names,
    rule_expressions,
)

ALERTS = REPO / "config" / "prometheus-alerts.yml"
SCRAPE_CONFIG = REPO / "config" / "prometheus.yml"
DASHBOARD = REPO / "config" / "grafana-dashboard.json"
ALERT_TESTS = REPO / "tests" / "data" / "prometheus-alerts-test.yml"

KEY_DEADLINE = 90.0
"""Seconds to wait for the key's first status record (sent every 10 s)."""

FROM_PROMETHEUS = frozenset({"up"})
"""Series Prometheus writes itself for every target."""

pytestmark = pytest.mark.timeout(300)

SOURCES = """
    [[sources]]
    name = "ekey"
    kind = "entropykey"
    serial = "KO2SYaMsVZBC9AXq"
    transport = "simulated"
    keyring = "{keyring}"
    simulated_rate = 20000
    priority = 0

    [[sources]]
    name = "getrandom"
    kind = "getrandom"
    priority = 1
    """

CUSTOMERS = """
    [[customers]]
    id = "acme"
    networks = ["127.0.0.0/8"]
    quota = "1 GiB/day"
    """


def fetch(url: str) -> bytes:
    # S310 (URL schemes): this is the loopback URL of the test's own daemon.
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        body: bytes = response.read()
        return body


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """
    A broker with a simulated Entropy Key over getrandom, and one customer
    with a quota that every loopback client belongs to.
    """
    tmp_path = tmp_path_factory.mktemp("metrics")
    sources = SOURCES.format(keyring=tmp_path / "keys" / "keyring")
    config = default_config(tmp_path / "state", sources, CUSTOMERS)
    with running_daemon(tmp_path, config) as running:
        yield running
        running.stop()


@pytest.fixture(scope="module")
def scrape(daemon: Daemon) -> str:
    """
    ``/metrics`` once the key has reported its temperature and voltage.

    A client draws meanwhile: a full pool pauses the key, and a paused key
    sends no status records. This waits on a condition in another process;
    the draws are what make it come true.
    """
    entropy = daemon.http_url + "/v1/entropy?bytes=4096&wait=1"
    deadline = time.monotonic() + KEY_DEADLINE
    while True:
        try:
            fetch(entropy)
        except urllib.error.HTTPError as exc:
            # An empty pool (503) just means the key is being read: go on.
            if exc.code != 503:
                raise
        text = fetch(daemon.operator_url + "/metrics").decode()
        if metric_value(text, "ebroker_device_supply_voltage_volts") is not None:
            return text
        assert time.monotonic() < deadline, f"no key status within {KEY_DEADLINE} s"


def exported_names(text: str) -> set[str]:
    """
    Every name a query may use against ``text``: each family (a family with
    no samples yet is still declared) and each sample name.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(sample.name for sample in family.samples)
    return names


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.needs_tool("promtool")
def test_live_metrics_pass_promtool(scrape: str) -> None:
    """
    ``promtool check metrics`` finds nothing to say about a live scrape.
    """
    result = promtool("check", "metrics", stdin=scrape)
    assert (0, "", "") == (result.returncode, result.stdout, result.stderr)


def test_entropy_key_gauges_and_standard_collectors(scrape: str) -> None:
    """
    The key's temperature and voltage are gauges per source in base units,
    and the process and Python collectors come along.
    """
    # The simulator reports 315.0 K and 3,254 mV.
    labels = {"source": "ekey", "kind": "entropykey"}
    assert 41.9 == metric_value(scrape, "ebroker_device_temperature_celsius", **labels)
    assert 3.254 == metric_value(
        scrape, "ebroker_device_supply_voltage_volts", **labels
    )
    assert 1024 == metric_value(scrape, "ebroker_pool_low_watermark_bytes")
    assert 1 << 30 == metric_value(
        scrape, "ebroker_customer_quota_limit_bytes", customer="acme"
    )
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert metric_value(scrape, name) is not None, name
    assert 1 == metric_value(scrape, "python_info")


def test_dashboard_and_alerts_query_only_exported_metrics(scrape: str) -> None:
    """
    Every metric named in the dashboard's queries and in the alert rules is in
    the live output (``up`` aside, which Prometheus writes itself).
    """
    exported = exported_names(scrape) | FROM_PROMETHEUS
    for path, expressions in (
        (DASHBOARD, dashboard_expressions(DASHBOARD)),
        (ALERTS, rule_expressions(ALERTS)),
    ):
        assert expressions, path
        wanted = set().union(*map(metric_names, expressions))
        assert wanted, path
        assert set() == wanted - exported, path


@pytest.mark.needs_tool("promtool")
def test_alert_rules_pass_promtool() -> None:
    """
    ``promtool check rules`` accepts the alert rules, and finds as many rules
    as there are expressions the name check above reads.
    """
    result = promtool("check", "rules", str(ALERTS))
    assert 0 == result.returncode, result.stdout + result.stderr
    expected = f"SUCCESS: {len(rule_expressions(ALERTS))} rules found"
    assert expected in result.stdout


@pytest.mark.needs_tool("promtool")
def test_scrape_example_passes_promtool() -> None:
    """
    ``promtool check config`` accepts the scrape example, and with it the rule
    file it names (resolved relative to the config).
    """
    result = promtool("check", "config", str(SCRAPE_CONFIG))
    assert 0 == result.returncode, result.stdout + result.stderr
    assert "prometheus-alerts.yml" in result.stdout


@pytest.mark.needs_tool("promtool")
def test_alerts_fire_as_their_unit_tests_say() -> None:
    """
    ``promtool test rules``: degraded, Entropy Key too hot, down, pool low and
    near-quota alerts fire after their ``for:``, and not before.
    """
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert 0 == result.returncode, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.needs_tool("promtool")
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """
    Every dashboard query, with Grafana's variables filled in, is PromQL that
    promtool accepts (as recording rules).
    """
    expressions = dashboard_expressions(DASHBOARD)
    rules = [
        {"record": f"dashboard:query_{index}", "expr": grafana_to_promql(expr)}
        for index, expr in enumerate(expressions)
    ]
    path = tmp_path / "dashboard-rules.yml"
    # JSON is YAML: promtool reads it as it is.
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert 0 == result.returncode, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_dashboard_is_importable_and_filters_by_instance() -> None:
    """
    The dashboard asks for its Prometheus data source on import
    (``${DS_PROMETHEUS}``), every panel uses it, and every query but the
    variable's own is narrowed by the ``instance`` variable.
    """
    dashboard = json.loads(DASHBOARD.read_text())
    assert ["DS_PROMETHEUS"] == [item["name"] for item in dashboard["__inputs"]]
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert "datasource" == variables["DS_PROMETHEUS"]["type"]
    assert "query" == variables["instance"]["type"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert panels
    for panel in panels:
        assert "${DS_PROMETHEUS}" == panel["datasource"]["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], panel["title"]


def test_metric_names_are_found_in_promql() -> None:
    """
    Names are what selectors select: not functions, keywords, label names in
    grouping clauses, matchers, durations or numbers.
    """
    expr = textwrap.dedent(
        """
        sum by (customer, sink) (rate(a_total{x="b_total", y=~"$v"}[$__rate_interval]
          offset 1h)) > bool 1e3
        and on (instance) b_bytes / ignoring(job) group_left c:recorded
        unless histogram_quantile(0.9, d_bucket) - -0.5
        """
    )
    assert {"a_total", "b_bytes", "c:recorded", "d_bucket"} == metric_names(expr)
