"""
Upstream sources through the real daemons: broker B draws from brokers A1 and
A2 (``egd`` over TCP, or ``http`` with a bearer token, plain and over TLS) at
tier 0, with getrandom as its tier 1.

Each scenario SIGKILLs A1 (B's source fails over to A2 inside a read: its
status names A2, and B never leaves tier 0 nor reports itself degraded), then
A2 (no endpoint left: B's tier switches to getrandom, degraded), then restarts
A1 on the same port (B comes back to tier 0 on A1), while an EGD client of B
is served at every step. Each step prints one line::

    UPSTREAM-FAILOVER kind=egd step=a2-killed-tier-1 seconds=0.02

the time from the kill (or from A1 listening again) until B's status shows
the outcome; the first step's line adds ``tier_changes=``, how often B's
active tier changed meanwhile (0). Of the times, only "within a deadline" is
asserted: speed belongs to benchmarks.
"""

import contextlib
import hashlib
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DEADLINE, free_port
from tests.integration.clients import (
    BrokerHttp,
    EgdReader,
    log_time,
    metric_value,
    poll_until,
)
from tests.integration.daemon import Daemon, default_config, start_daemon
from tests.tls_ca import TestCA

TOKEN = "upstream-" + "7" * 32
# Restarting a broker and a source's restart backoff can take a while on a
# loaded machine; a condition that holds ends the wait at once.
RECOVERY = 2 * DEADLINE
_EGD_LISTEN = 'listen = ["tcp://127.0.0.1:0", "unix:egd.sock"]'
_HTTP_LISTEN = 'listen = ["tcp://127.0.0.1:0"]'


@dataclass
class Upstream:
    """
    One upstream broker A on fixed ports, so that it can be restarted where
    B expects it.
    """

    directory: Path
    config: str
    endpoint: str
    daemon: Daemon | None = None

    def start(self) -> None:
        self.directory.mkdir(exist_ok=True)
        self.daemon = start_daemon(self.directory, self.config)

    def kill(self) -> None:
        if self.daemon is not None and self.daemon.process.poll() is None:
            self.daemon.process.kill()
            self.daemon.process.wait()


@dataclass
class Scenario:
    kind: str
    upstreams: list[Upstream]
    source: str
    """B's upstream source entry."""
    extra_files: dict[str, str] = field(default_factory=dict)


def upstream_config(
    directory: Path, *, egd_port: int = 0, http_port: int = 0, extra: str = ""
) -> str:
    """
    A's config: `default_config` with getrandom, its EGD or tenant HTTP sink
    on a fixed port.
    """
    text = default_config(directory / "state", extra=extra)
    if egd_port:
        assert _EGD_LISTEN in text
        text = text.replace(
            _EGD_LISTEN,
            f'listen = ["tcp://127.0.0.1:{egd_port}", "unix:egd.sock"]',
            1,
        )
    if http_port:
        assert _HTTP_LISTEN in text
        text = text.replace(
            _HTTP_LISTEN, f'listen = ["tcp://127.0.0.1:{http_port}"]', 1
        )
    return text


def egd_scenario(tmp_path: Path) -> Scenario:
    ports = [free_port(), free_port()]
    upstreams = [
        Upstream(
            tmp_path / f"a{index + 1}",
            upstream_config(tmp_path / f"a{index + 1}", egd_port=port),
            f"tcp://127.0.0.1:{port}",
        )
        for index, port in enumerate(ports)
    ]
    endpoints = ", ".join(f'"{u.endpoint}"' for u in upstreams)
    source = f"""
        [[sources]]
        name = "upstream"
        kind = "egd"
        priority = 0
        endpoints = [{endpoints}]
        connect_timeout = "2 s"
        endpoint_backoff = "2 s"
        """
    return Scenario("egd", upstreams, source)


_CUSTOMERS = """
    [[customers]]
    id = "vm-brokers"
    tokens = ["sha256:{digest}"]

    [[customers]]
    id = "default"
    deny = true
    """

_TLS_SINK = """
    [[sinks]]
    name = "https"
    kind = "http"
    plane = "tenant"
    listen = ["tcp://127.0.0.1:{port}"]
    tls_cert = "{cert}"
    tls_key = "{key}"
    """


def http_scenario(tmp_path: Path, *, tls: bool) -> Scenario:
    """
    A1 and A2 serve ``/v1/entropy`` only to B's bearer token (the default
    customer is denied); with ``tls``, on an HTTPS sink whose certificate a
    test CA signed, and B trusts that CA through ``ca_file``.
    """
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    customers = textwrap.dedent(_CUSTOMERS.format(digest=digest))
    ports = [free_port(), free_port()]
    ca = TestCA(tmp_path) if tls else None
    upstreams = []
    for index, port in enumerate(ports):
        directory = tmp_path / f"a{index + 1}"
        if ca is not None:
            cert = ca.server_cert()
            sink = textwrap.dedent(
                _TLS_SINK.format(port=port, cert=cert.cert, key=cert.key)
            )
            config = upstream_config(directory, extra=sink + customers)
            endpoint = f"https://127.0.0.1:{port}/"
        else:
            config = upstream_config(directory, http_port=port, extra=customers)
            endpoint = f"http://127.0.0.1:{port}/"
        upstreams.append(Upstream(directory, config, endpoint))
    token_file = tmp_path / "b-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    urls = ", ".join(f'"{u.endpoint}"' for u in upstreams)
    ca_line = f'ca_file = "{ca.ca_path}"' if ca is not None else ""
    source = f"""
        [[sources]]
        name = "upstream"
        kind = "http"
        priority = 0
        urls = [{urls}]
        token_file = "{token_file}"
        {ca_line}
        wait = "5 s"
        connect_timeout = "2 s"
        endpoint_backoff = "2 s"
        """
    return Scenario("https" if tls else "http", upstreams, source)


@contextlib.contextmanager
def brokers(tmp_path: Path, scenario: Scenario) -> Iterator[Daemon]:
    """
    Start A1, A2 and B; kill every one of them at the end.
    """
    b: Daemon | None = None
    try:
        for upstream in scenario.upstreams:
            upstream.start()
        sources = textwrap.dedent(scenario.source) + textwrap.dedent(
            """
            [[sources]]
            name = "getrandom"
            kind = "getrandom"
            priority = 1
            """
        )
        (tmp_path / "b").mkdir()
        b = start_daemon(
            tmp_path / "b", default_config(tmp_path / "b" / "state", sources)
        )
        yield b
    finally:
        if b is not None and b.process.poll() is None:
            b.process.kill()
            b.process.wait()
        for upstream in scenario.upstreams:
            upstream.kill()


def serving_from(endpoint: str) -> Callable[[dict[str, Any]], bool]:
    """
    B's upstream source is healthy on ``endpoint`` and tier 0 feeds B.
    """

    def check(source: dict[str, Any]) -> bool:
        return bool(
            "healthy" == source["state"]
            and endpoint == source["details"].get("endpoint")
            and 0 == source["_tiers"]["active_tier"]
            and source["feeding"]
        )

    return check


def degraded_to_tier_one(source: dict[str, Any]) -> bool:
    tiers = source["_tiers"]
    return bool(1 == tiers["active_tier"] and tiers["degraded"])


STEPS = ("a1-killed-serving-from-a2", "a2-killed-tier-1", "a1-restarted-back-to-tier-0")


async def run_failover(
    tmp_path: Path, scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    a1, a2 = scenario.upstreams
    kind = scenario.kind
    with brokers(tmp_path, scenario) as b:
        async with BrokerHttp(b) as http, EgdReader(b) as client:
            fetch = lambda: http.source("upstream")  # noqa: E731 - a short alias
            source = await poll_until(fetch, serving_from(a1.endpoint))
            await client.answered(10)
            restarts = source["restarts"]
            seconds: list[float] = []

            started, killed_at = time.monotonic(), time.time()
            a1.kill()
            source = await poll_until(fetch, serving_from(a2.endpoint), RECOVERY)
            seconds.append(time.monotonic() - started)
            on_a2_at = time.time()
            assert 1 <= source["details"]["failovers"]
            assert a1.endpoint in source["details"]["last_error"]
            # The move happened inside a read: no restart, B not degraded.
            assert restarts == source["restarts"]
            assert not source["_tiers"]["degraded"]
            await client.answered(10)
            assert not (await http.source("upstream"))["_tiers"]["degraded"]

            started = time.monotonic()
            a2.kill()
            source = await poll_until(fetch, degraded_to_tier_one, RECOVERY)
            seconds.append(time.monotonic() - started)
            assert "healthy" != source["state"]
            await client.answered(10)

            a1.start()  # returns once A1 listens: B's part is what is timed
            started = time.monotonic()
            source = await poll_until(fetch, serving_from(a1.endpoint), RECOVERY)
            seconds.append(time.monotonic() - started)
            assert not source["_tiers"]["degraded"]
            await client.answered(10)
            metrics = await http.metrics()
            counted = metric_value(
                metrics, "ebroker_upstream_failovers_total", source="upstream"
            )
            assert counted is not None
            assert 2 <= counted
        logs = b.logs()
    # Moving from A1 to A2 is the source's own business: B's active tier never
    # changes, and the upstream source never leaves "healthy" (no restart, no
    # fresh start-up test) while it moves.
    during = [entry for entry in logs if killed_at <= log_time(entry) <= on_a2_at]
    blips = sum(1 for entry in during if entry.get("event") == "active_tier_changed")
    state_changes = [
        entry
        for entry in during
        if entry.get("event") == "source_state_changed"
        and entry.get("source") == "upstream"
    ]
    assert 0 == blips
    assert [] == state_changes
    failovers = [entry for entry in logs if entry.get("event") == "upstream_failover"]
    assert failovers, "no upstream_failover logged"
    assert all("warning" == entry["level"] for entry in failovers)
    assert TOKEN not in b.stderr_path.read_text()
    with capsys.disabled():
        print()
        for step, took in zip(STEPS, seconds, strict=True):
            print(
                f"UPSTREAM-FAILOVER kind={kind} step={step} seconds={took:.2f}"
                + (f" tier_changes={blips}" if step == STEPS[0] else "")
            )


async def test_egd_upstream_fails_over_and_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    B on an egd upstream [A1, A2] with getrandom below: A1 killed → A2;
    A2 killed → tier 1 (degraded); A1 back → tier 0 on A1. B's EGD client is
    served throughout.
    """
    await run_failover(tmp_path, egd_scenario(tmp_path), capsys)


async def test_http_upstream_fails_over_and_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    The same over plain HTTP on loopback with a bearer token; the token
    never appears in B's log.
    """
    await run_failover(tmp_path, http_scenario(tmp_path, tls=False), capsys)


async def test_https_upstream_fails_over_and_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    The same over HTTPS: A1 and A2 serve with certificates from a test CA
    that B trusts through ``ca_file``.
    """
    await run_failover(tmp_path, http_scenario(tmp_path, tls=True), capsys)
