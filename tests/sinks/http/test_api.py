"""
The HTTP API: entropy, health, readiness, status, metrics and the status page,
driven through the real aiohttp application and a real pool; plus the real
`HttpSink` on loopback spoken to with raw HTTP/1.0 as haproxy does.
"""

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import MultiDict
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from broker import __version__
from broker.accounts import Accounts, hash_token
from broker.errors import BrokerError
from broker.pool import BLOCK_BYTES, EntropyPool
from broker.status import (
    ConfigStatus,
    Health,
    Phase,
    SinkStatus,
    SourceStatus,
    TierStatus,
)
from sinks.http.app import create_app
from sinks.http.config import HttpSinkConfig
from sinks.http.entropy import parse_entropy_query, retry_after
from sinks.http.server import HttpSink
from sinks.http.state import STATE_KEY, HttpSinkState

# Every wait below is for a condition; this only bounds how long a broken
# server can hang a test, so it is generous enough for a loaded CI machine.
DEADLINE = 30.0

OK = Health(True, "ok", ())
DEGRADED = Health(True, "degraded", ("only fallback tier 1 feeds the pool",))
UNHEALTHY = Health(False, "unhealthy", ("no healthy source",))


def source(
    name: str = "rng", *, rate: float = 0.0, feeding: bool = True
) -> SourceStatus:
    return SourceStatus(
        name=name,
        kind="getrandom",
        priority=0,
        state="healthy",
        reason="running",
        since=1_700_000_000.0,
        bytes_in=4000,
        credited_bits=32000,
        rate=rate,
        restarts=2,
        feeding=feeding,
    )


@dataclass
class FakeBroker:
    """
    A `BrokerView` whose health, readiness, reload outcome and simulated keys
    the test sets directly.
    """

    pool: EntropyPool = field(default_factory=lambda: EntropyPool(capacity=64 * 1024))
    instance: str = "test-broker"
    started_at: float = field(default_factory=time.time)
    # The HTTP sink listens on TCP only and never resolves a path against it.
    state_dir: Path = Path("/nonexistent")
    sources: list[SourceStatus] = field(default_factory=lambda: [source()])
    sinks: list[SinkStatus] = field(default_factory=list)
    current_health: Health = OK
    is_ready: bool = True
    health_error: Exception | None = None
    accounts: Accounts = field(default_factory=Accounts.unlimited)
    reload_accepted: bool = True
    reloads: int = 0
    simulated_keys: dict[str, list[str]] = field(default_factory=dict)
    """Actions taken on each simulated key, by serial."""

    def sources_status(self) -> list[SourceStatus]:
        return list(self.sources)

    def sinks_status(self) -> list[SinkStatus]:
        return list(self.sinks)

    def config_status(self) -> ConfigStatus:
        return ConfigStatus(sha256="0" * 64, loaded_at=0.0, path=None)

    def health(self) -> Health:
        if self.health_error is not None:
            raise self.health_error
        return self.current_health

    def ready(self) -> bool:
        return self.is_ready

    def phase(self) -> Phase:
        return Phase.SERVING if self.is_ready else Phase.STARTING

    def tiers(self) -> TierStatus:
        return TierStatus(
            active_tier=0,
            best_tier=0,
            degraded=False,
            failovers=1,
            tier_seconds={"0": 12.5},
        )

    async def reload(self) -> bool:
        self.reloads += 1
        return self.reload_accepted

    def simulator_control(self, serial: str, action: str) -> str:
        actions = self.simulated_keys[serial]
        if action not in ("unplug", "replug", "fail", "heal"):
            raise ValueError(f"unknown action {action!r}")
        actions.append(action)
        return action


def make_config(**overrides: Any) -> HttpSinkConfig:
    """
    An operator-plane sink config: these tests cover every endpoint, and what
    the tenant plane hides is tested in test_planes.py.
    """
    return HttpSinkConfig.model_validate(
        {
            "kind": "http",
            "listen": ["tcp://127.0.0.1:0"],
            "plane": "operator",
            **overrides,
        }
    )


def fill(pool: EntropyPool, count: int) -> None:
    """
    Feed fully credited input until at least ``count`` output bytes are ready
    (or, with waiters queued, until they have been handed that much).
    """
    blocks = -(-count // BLOCK_BYTES)
    # 40 input bytes at 8 bits each release one 32-byte block (256 + 64 bits).
    pool.add(b"\xa5" * 40 * blocks, 8.0)


async def until(predicate: Callable[[], bool]) -> None:
    """
    Yield to the loop until ``predicate()`` holds; a condition, not a sleep.
    """
    async with asyncio.timeout(DEADLINE):
        # The pool has no event for "a waiter queued"; sleep(0) only yields.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0)


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, broker: FakeBroker
) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(create_app(make_config(max_wait=10), broker))


# ---- entropy --------------------------------------------------------------------


async def test_raw_entropy_returns_the_bytes_asked_for(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    ``format=raw`` (the default) returns exactly N octets, uncacheable.
    """
    fill(broker.pool, 100)
    response = await client.get("/v1/entropy", params={"bytes": "100"})
    assert 200 == response.status
    assert "application/octet-stream" == response.content_type
    assert "no-store" == response.headers["Cache-Control"]
    assert 100 == len(await response.read())
    assert 100 == broker.pool.bytes_out


@pytest.mark.parametrize(
    ("output", "decode"),
    [
        ("raw", lambda body: body),
        ("hex", lambda body: binascii.unhexlify(body.strip())),
        ("base64", lambda body: base64.b64decode(body.strip(), validate=True)),
    ],
)
async def test_each_format_decodes_to_the_requested_length(
    client: TestClient[web.Request, web.Application],
    broker: FakeBroker,
    output: str,
    decode: Callable[[bytes], bytes],
) -> None:
    """
    raw, hex and base64 bodies each decode to exactly N bytes; text formats are
    served as text/plain.
    """
    fill(broker.pool, 77)
    response = await client.get("/v1/entropy", params={"bytes": "77", "format": output})
    assert 200 == response.status
    expected_type = "application/octet-stream" if output == "raw" else "text/plain"
    assert expected_type == response.content_type
    assert "no-store" == response.headers["Cache-Control"]
    assert 77 == len(decode(await response.read()))


async def test_empty_pool_without_wait_is_503_with_retry_after(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    With wait=0 and too few bytes ready, the answer is 503, a JSON reason, a
    Retry-After of at least one second, and no byte is consumed.
    """
    fill(broker.pool, 32)
    response = await client.get("/v1/entropy", params={"bytes": "64"})
    assert 503 == response.status
    assert int(response.headers["Retry-After"]) >= 1
    assert "no-store" == response.headers["Cache-Control"]
    assert "64" in (await response.json())["error"]
    assert 32 == broker.pool.level


async def test_wait_is_served_when_the_pool_is_fed_meanwhile(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    A request with wait>0 blocks in the pool and is answered as soon as enough
    output arrives.
    """
    request = asyncio.create_task(
        client.get("/v1/entropy", params={"bytes": "64", "wait": "10"})
    )
    await until(lambda: broker.pool.waiters == 1)
    fill(broker.pool, 64)
    response = await request
    assert 200 == response.status
    assert 64 == len(await response.read())
    assert 0 == broker.pool.waiters


async def test_wait_timeout_is_503_with_retry_after(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    A wait that expires answers 503 with Retry-After, and the bytes collected
    for it stay in the pool.
    """
    fill(broker.pool, 32)
    response = await client.get("/v1/entropy", params={"bytes": "64", "wait": "0.01"})
    assert 503 == response.status
    assert int(response.headers["Retry-After"]) >= 1
    assert "within" in (await response.json())["error"]
    assert 32 == broker.pool.level
    assert 0 == broker.pool.bytes_out


async def test_closed_pool_is_503(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    Once the pool is closed (broker stopping), entropy requests get 503.
    """
    broker.pool.close()
    response = await client.get("/v1/entropy", params={"bytes": "8", "wait": "1"})
    assert 503 == response.status
    assert "1" == response.headers["Retry-After"]


@pytest.mark.parametrize(
    ("query", "word"),
    [
        ({"bytes": "0"}, "bytes"),
        ({"bytes": "65537"}, "bytes"),
        ({"bytes": "abc"}, "bytes"),
        ({"bytes": "-5"}, "bytes"),
        ({"bytes": " 5"}, "bytes"),
        ({"bytes": "1e3"}, "bytes"),
        ({}, "bytes"),
        ({"bytes": "8", "format": "octal"}, "format"),
        ({"bytes": "8", "wait": "-1"}, "wait"),
        ({"bytes": "8", "wait": "11"}, "wait"),
        ({"bytes": "8", "wait": "nan"}, "wait"),
        ({"bytes": "8", "colour": "blue"}, "colour"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    client: TestClient[web.Request, web.Application],
    broker: FakeBroker,
    query: dict[str, str],
    word: str,
) -> None:
    """
    Each bad query is refused with 400 and a JSON reason naming the parameter,
    and costs the pool nothing.
    """
    fill(broker.pool, 64)
    response = await client.get("/v1/entropy", params=query)
    assert 400 == response.status
    assert "no-store" == response.headers["Cache-Control"]
    assert word in (await response.json())["error"]
    assert 0 == broker.pool.bytes_out


async def test_repeated_parameter_is_400(
    client: TestClient[web.Request, web.Application],
) -> None:
    """
    ``bytes`` given twice is ambiguous and refused.
    """
    response = await client.get("/v1/entropy?bytes=8&bytes=16")
    assert 400 == response.status
    assert "bytes" in (await response.json())["error"]


async def test_request_limit_comes_from_config(aiohttp_client: AiohttpClient) -> None:
    """
    ``max_request_bytes`` bounds ``bytes``: its value is accepted, one more is not.
    """
    broker = FakeBroker()
    client = await aiohttp_client(create_app(make_config(max_request_bytes=64), broker))
    fill(broker.pool, 64)
    assert 200 == (await client.get("/v1/entropy?bytes=64")).status
    response = await client.get("/v1/entropy?bytes=65")
    assert 400 == response.status
    assert "1..64" in (await response.json())["error"]


async def test_huge_values_are_not_echoed_in_full(
    client: TestClient[web.Request, web.Application],
) -> None:
    """
    A reason quotes at most a short prefix of a bad value.
    """
    response = await client.get("/v1/entropy", params={"bytes": "x" * 5000})
    assert 400 == response.status
    assert len((await response.json())["error"]) < 200


def test_parse_entropy_query_defaults() -> None:
    """
    Only ``bytes`` is required: format defaults to raw and wait to 0.
    """
    query = parse_entropy_query(MultiDict(bytes="16"), make_config())
    assert (16, "raw", 0.0) == (query.count, query.format, query.wait)


async def test_no_byte_is_served_twice(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    Immediate and waiting requests together never receive the same bytes.
    """
    fill(broker.pool, 20 * 64)
    bodies = [
        await (await client.get("/v1/entropy?bytes=64")).read() for _ in range(20)
    ]
    waiting = [
        asyncio.create_task(client.get("/v1/entropy?bytes=64&wait=10"))
        for _ in range(5)
    ]
    await until(lambda: broker.pool.waiters == 5)
    fill(broker.pool, 5 * 64)
    for response in await asyncio.gather(*waiting):
        assert 200 == response.status
        bodies.append(await response.read())
    assert 25 == len(bodies)
    blocks = [body[i : i + BLOCK_BYTES] for body in bodies for i in (0, BLOCK_BYTES)]
    assert len(blocks) == len(set(blocks))
    assert 25 * 64 == broker.pool.bytes_out


def test_retry_after_estimates_from_feeding_sources() -> None:
    """
    Retry-After is the missing bytes over the feeding sources' output rate,
    clamped to 1..60 s, or 5 s when nothing feeds the pool.
    """
    broker = FakeBroker(
        sources=[source(rate=100.0), source("idle", rate=1e9, feeding=False)]
    )
    # 100 B/s in gives 80 B/s out; 4000 missing bytes take 50 s.
    assert 50 == retry_after(broker, 4000)
    assert 1 == retry_after(broker, 1)
    assert 60 == retry_after(broker, 1_000_000)
    assert 5 == retry_after(FakeBroker(sources=[]), 64)


# ---- health and readiness ----------------------------------------------------------


@pytest.mark.parametrize(
    ("health", "status", "word"),
    [
        (OK, 200, "ok"),
        (DEGRADED, 200, "degraded"),
        (UNHEALTHY, 503, "no healthy source"),
        (Health(False, "shutting_down", ("shutting down",)), 503, "shutting down"),
    ],
)
async def test_healthz_follows_broker_health(
    client: TestClient[web.Request, web.Application],
    broker: FakeBroker,
    health: Health,
    status: int,
    word: str,
) -> None:
    """
    /healthz is 200 while the broker is serving (ok or degraded), 503 otherwise,
    with a short text body saying why.
    """
    broker.current_health = health
    response = await client.get("/healthz")
    assert status == response.status
    assert "text/plain" == response.content_type
    assert word in await response.text()


async def test_healthz_is_503_once_the_sink_is_shutting_down(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    After pre-shutdown the sink reports 503 even though the broker still says ok.
    """
    client.app[STATE_KEY].shutting_down = True
    response = await client.get("/healthz")
    assert 503 == response.status
    assert "shutting down" in await response.text()
    assert 503 == (await client.get("/readyz")).status
    status = await (await client.get("/v1/status")).json()
    assert "shutting_down" == status["health"]["status"]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "POST", "PUT"])
async def test_healthz_answers_any_method(
    client: TestClient[web.Request, web.Application], broker: FakeBroker, method: str
) -> None:
    """
    Whatever method a load balancer probes /healthz with, it gets the health
    status code.
    """
    assert 200 == (await client.request(method, "/healthz")).status
    broker.current_health = UNHEALTHY
    assert 503 == (await client.request(method, "/healthz")).status


async def test_head_healthz_has_no_body(
    client: TestClient[web.Request, web.Application],
) -> None:
    """
    HEAD /healthz carries the status and headers but no body.
    """
    response = await client.head("/healthz")
    assert 200 == response.status
    assert b"" == await response.read()


async def test_options_root_is_a_health_probe(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    Plain haproxy ``option httpchk`` sends OPTIONS /: same 200/503 as /healthz.
    """
    assert 200 == (await client.options("/")).status
    broker.current_health = UNHEALTHY
    assert 503 == (await client.options("/")).status


async def test_readyz_follows_broker_readiness(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    /readyz is 200 once the broker is ready and 503 before or after.
    """
    assert 200 == (await client.get("/readyz")).status
    broker.is_ready = False
    assert 503 == (await client.get("/readyz")).status


# ---- status, metrics, page, errors ---------------------------------------------------


async def test_status_json_shape(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    /v1/status reports instance, version, uptime, health, pool, tiers,
    accounts, sources and sinks.
    """
    broker.sinks = [SinkStatus("egd", "egd", ("tcp://127.0.0.1:8888",), 3, 10, 500, 20)]
    broker.current_health = DEGRADED
    fill(broker.pool, 64)
    response = await client.get("/v1/status")
    assert 200 == response.status
    assert "no-store" == response.headers["Cache-Control"]
    body = await response.json()
    assert "test-broker" == body["instance"]
    assert __version__ == body["version"]
    assert body["uptime"] >= 0
    assert {
        "status": "degraded",
        "serving": True,
        "reasons": ["only fallback tier 1 feeds the pool"],
    } == body["health"]
    pool = body["pool"]
    assert (64, 64 * 1024, 0) == (pool["level"], pool["capacity"], pool["waiters"])
    assert {"bytes_in", "credited_bits_in", "bytes_out"} <= pool.keys()
    assert {
        "active_tier": 0,
        "best_tier": 0,
        "degraded": False,
        "failovers": 1,
        "tier_seconds": {"0": 12.5},
        "served_by_tier": {},
        "buffered_by_tier": {},
    } == body["tiers"]
    assert {"kind": "memory", "healthy": True} == body["accounts"]["backend"]
    assert {"default"} == body["accounts"]["customers"].keys()
    assert [
        {
            "name": "rng",
            "kind": "getrandom",
            "priority": 0,
            "state": "healthy",
            "reason": "running",
            "since": 1_700_000_000.0,
            "bytes_in": 4000,
            "credited_bits": 32000,
            "rate": 0.0,
            "restarts": 2,
            "feeding": True,
            "health": {},
            "details": {},
        }
    ] == body["sources"]
    assert [
        {
            "name": "egd",
            "kind": "egd",
            "addresses": ["tcp://127.0.0.1:8888"],
            "connections": 3,
            "connections_total": 10,
            "bytes_out": 500,
            "requests": 20,
            "refused": {},
            "closed": {},
        }
    ] == body["sinks"]


async def test_metrics_exposes_pool_and_source_series(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    /metrics is Prometheus text with pool and per-source series read at scrape
    time.
    """
    fill(broker.pool, 96)
    response = await client.get("/metrics")
    assert 200 == response.status
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
    }
    assert 96 == samples[("ebroker_pool_level_bytes", ())]
    labels = (("kind", "getrandom"), ("source", "rng"))
    assert 4000 == samples[("ebroker_source_input_bytes_total", labels)]
    assert 1 == samples[("ebroker_source_state", (*labels, ("state", "healthy")))]
    assert 0 == samples[("ebroker_active_tier", ())]
    assert (
        0
        == samples[("ebroker_customer_served_bytes_total", (("customer", "default"),))]
    )


async def test_status_page_is_self_contained_html(
    client: TestClient[web.Request, web.Application],
) -> None:
    """
    / serves an HTML page that polls /v1/status and loads nothing external.
    """
    response = await client.get("/")
    assert 200 == response.status
    assert "text/html" == response.content_type
    page = await response.text()
    assert "/v1/status" in page
    assert "<svg" in page
    assert "http://" not in page
    assert "https://" not in page


async def test_unknown_path_is_404_json(
    client: TestClient[web.Request, web.Application],
) -> None:
    """
    An unknown path gets a JSON 404 naming it.
    """
    response = await client.get("/nope")
    assert 404 == response.status
    assert "/nope" in (await response.json())["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/entropy"), ("HEAD", "/v1/entropy"), ("DELETE", "/")],
)
async def test_wrong_method_is_405_json(
    client: TestClient[web.Request, web.Application],
    broker: FakeBroker,
    method: str,
    path: str,
) -> None:
    """
    A wrong method gets 405 with Allow; HEAD on entropy is refused rather than
    consuming bytes it cannot return.
    """
    fill(broker.pool, 64)
    response = await client.request(method, path, params={"bytes": "8"})
    assert 405 == response.status
    assert "GET" in response.headers["Allow"]
    if method != "HEAD":
        assert method in (await response.json())["error"]
    assert 0 == broker.pool.bytes_out


async def test_unexpected_error_is_500_without_traceback(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    A failing handler answers a generic JSON 500 and logs the exception with
    its traceback; the client learns nothing of it.
    """
    broker.health_error = RuntimeError("secret detail")
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/healthz")
    assert 500 == response.status
    text = await response.text()
    assert "secret detail" not in text
    assert "Traceback" not in text
    assert {"error": "internal server error"} == await response.json()
    failures = [entry for entry in logs if entry["event"] == "http_handler_failed"]
    assert 1 == len(failures)
    assert failures[0]["exc_info"] is True


async def test_requests_log_no_entropy(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    The request log names method, path and status, and never the bytes served.
    """
    fill(broker.pool, 32)
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/v1/entropy?bytes=32&format=hex")
        body = (await response.text()).strip()
    entries = [entry for entry in logs if entry["event"] == "http_request"]
    assert [("GET", "/v1/entropy", 200)] == [
        (entry["method"], entry["path"], entry["status"]) for entry in entries
    ]
    assert body not in repr(logs)


async def test_state_counts_requests_and_bytes(aiohttp_client: AiohttpClient) -> None:
    """
    The shared state counts requests, entropy bytes out and connections.
    """
    broker = FakeBroker()
    state = HttpSinkState()
    client = await aiohttp_client(create_app(make_config(), broker, state))
    fill(broker.pool, 64)
    await (await client.get("/v1/entropy?bytes=40")).read()
    await (await client.get("/healthz")).read()
    assert (2, 40) == (state.requests, state.bytes_out)
    assert 1 <= state.connections_total <= 2
    assert state.idle.is_set()


# ---- operator endpoints ----------------------------------------------------------

ADMIN_BEARER = "let-me-in"


@pytest.fixture
async def admin(
    aiohttp_client: AiohttpClient, broker: FakeBroker
) -> TestClient[web.Request, web.Application]:
    config = make_config(admin_token=hash_token(ADMIN_BEARER), simulator_control=True)
    return await aiohttp_client(create_app(config, broker))


@pytest.mark.parametrize(("accepted", "status"), [(True, 200), (False, 409)])
async def test_reload_reports_whether_the_broker_took_the_new_config(
    admin: TestClient[web.Request, web.Application],
    broker: FakeBroker,
    accepted: bool,
    status: int,
) -> None:
    """
    POST /v1/admin/reload with the admin token reloads the broker once: 200
    when the new configuration is in force, 409 when it was refused.
    """
    broker.reload_accepted = accepted
    response = await admin.post(
        "/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_BEARER}"}
    )
    assert status == response.status
    assert accepted == (await response.json())["reloaded"]
    assert 1 == broker.reloads


@pytest.mark.parametrize("authorization", ["", "Bearer wrong", f"Basic {ADMIN_BEARER}"])
async def test_reload_needs_the_admin_token(
    admin: TestClient[web.Request, web.Application],
    broker: FakeBroker,
    authorization: str,
) -> None:
    """
    Without the admin bearer token, reload answers 401 and reloads nothing.
    """
    response = await admin.post(
        "/v1/admin/reload", headers={"Authorization": authorization}
    )
    assert 401 == response.status
    assert 0 == broker.reloads


async def test_admin_routes_exist_only_when_configured(
    client: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    Without admin_token and simulator_control the operator endpoints are 404.
    """
    broker.simulated_keys["key-1"] = []
    response = await client.post(
        "/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_BEARER}"}
    )
    assert 404 == response.status
    assert 404 == (await client.post("/v1/simulator/key-1/unplug")).status
    assert (0, []) == (broker.reloads, broker.simulated_keys["key-1"])


async def test_simulator_control_acts_on_a_known_key(
    admin: TestClient[web.Request, web.Application], broker: FakeBroker
) -> None:
    """
    A loopback client drives a simulated key by serial, even a serial with '/'.
    """
    broker.simulated_keys["ab/cd"] = []
    response = await admin.post("/v1/simulator/ab/cd/unplug")
    assert 200 == response.status
    assert {"serial": "ab/cd", "action": "unplug"} == await response.json()
    assert ["unplug"] == broker.simulated_keys["ab/cd"]


@pytest.mark.parametrize(
    ("path", "status"),
    [("/v1/simulator/nokey/unplug", 404), ("/v1/simulator/key-1/explode", 400)],
)
async def test_simulator_control_refuses_unknown_keys_and_actions(
    admin: TestClient[web.Request, web.Application],
    broker: FakeBroker,
    path: str,
    status: int,
) -> None:
    """
    An unknown serial is 404 and an unknown action 400; nothing is done.
    """
    broker.simulated_keys["key-1"] = []
    response = await admin.post(path)
    assert status == response.status
    assert "error" in await response.json()
    assert [] == broker.simulated_keys["key-1"]


# ---- the real sink on loopback -------------------------------------------------------


async def raw_exchange(address: str, request: bytes) -> bytes:
    """
    Send ``request`` over a fresh TCP connection and read until the server
    closes it, as haproxy's HTTP/1.0 health check does.
    """
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    async with asyncio.timeout(DEADLINE):
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        try:
            writer.write(request)
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()


@pytest.fixture
async def sink() -> Any:
    broker = FakeBroker()
    running = HttpSink(make_config(max_wait=30), broker)
    await running.start()
    try:
        yield running, broker
    finally:
        await running.shutdown(1.0)


async def test_sink_answers_haproxy_probes_without_host(sink: Any) -> None:
    """
    The real sink answers ``GET /healthz HTTP/1.0`` and ``OPTIONS / HTTP/1.0``
    without a Host header, then 503 from pre-shutdown on.
    """
    running, _broker = sink
    [address] = running.bound_addresses()
    assert address.startswith("tcp://127.0.0.1:")
    assert not address.endswith(":0")
    response = await raw_exchange(address, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert response.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), response[:40]
    assert response.endswith(b"\r\n\r\nok\n")
    response = await raw_exchange(address, b"OPTIONS / HTTP/1.0\r\n\r\n")
    assert response.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), response[:40]
    running.pre_shutdown()
    assert running.shutting_down
    response = await raw_exchange(address, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert response.startswith((b"HTTP/1.0 503", b"HTTP/1.1 503")), response[:40]


async def test_sink_status_counts_traffic(sink: Any) -> None:
    """
    The sink's status names it, lists its real address and counts requests,
    connections and entropy bytes.
    """
    running, broker = sink
    fill(broker.pool, 64)
    [address] = running.bound_addresses()
    await raw_exchange(address, b"GET /v1/entropy?bytes=48 HTTP/1.0\r\n\r\n")
    await raw_exchange(address, b"GET /healthz HTTP/1.0\r\n\r\n")
    status = running.status()
    assert ("http", "http", (address,)) == (status.name, status.kind, status.addresses)
    assert (2, 2, 48) == (status.requests, status.connections_total, status.bytes_out)


async def test_shutdown_answers_blocked_waiters_with_503() -> None:
    """
    At shutdown a request blocked in ?wait= is answered 503 at once (another
    instance can serve it), its bytes stay unserved, and the port closes.
    """
    broker = FakeBroker()
    running = HttpSink(make_config(max_wait=30), broker)
    await running.start()
    [address] = running.bound_addresses()
    request = asyncio.create_task(
        raw_exchange(address, b"GET /v1/entropy?bytes=64&wait=30 HTTP/1.0\r\n\r\n")
    )
    await until(lambda: broker.pool.waiters == 1)
    running.pre_shutdown()
    await running.shutdown(DEADLINE)
    response = await request
    assert response.startswith((b"HTTP/1.0 503", b"HTTP/1.1 503")), response[:40]
    assert b"\r\nRetry-After: 1\r\n" in response
    assert 0 == broker.pool.waiters
    assert 0 == broker.pool.bytes_out
    with pytest.raises(OSError):  # noqa: PT011 - refused connections vary by platform
        await raw_exchange(address, b"GET /healthz HTTP/1.0\r\n\r\n")


def test_sink_refuses_unix_addresses() -> None:
    """
    The HTTP sink listens on TCP only; a Unix address is refused at config load.
    """
    with pytest.raises(ValueError, match="TCP addresses only"):
        HttpSinkConfig.model_validate({"kind": "http", "listen": ["unix:http.sock"]})


async def test_sink_reports_an_address_in_use(sink: Any) -> None:
    """
    Binding a port already taken fails with a BrokerError naming the address.
    """
    running, _broker = sink
    [address] = running.bound_addresses()
    second = HttpSink(make_config(listen=[address]), FakeBroker())
    with pytest.raises(BrokerError, match="cannot listen on"):
        await second.start()
    await second.shutdown(0)
