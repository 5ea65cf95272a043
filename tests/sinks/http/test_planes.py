"""
The two planes of the HTTP sink: what a tenant-plane sink hides from guests
(status, metrics, the status page, admin and simulator endpoints) unless the
admin token comes with the request, the own-customer status a tenant may read,
and the operator plane that serves everything.
"""

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from broker.accounts import Accounts, AccountsConfig, CustomerConfig, hash_token
from sinks.http.app import create_app
from sinks.http.config import HttpSinkConfig
from sinks.http.server import HttpSink
from sinks.http.state import STATE_KEY
from tests.sinks.http.test_api import FakeBroker, fill, raw_exchange

ADMIN = "operator-secret"
ACME = "acme-token"
GLOBEX = "globex-token"

# What an operator endpoint (method, path) does to the fake broker when it is
# served; the tenant plane must do none of it without the admin token.
OPERATOR_ENDPOINTS = [
    ("GET", "/"),
    ("GET", "/metrics"),
    ("HEAD", "/metrics"),
    ("POST", "/v1/admin/reload"),
    ("POST", "/v1/simulator/key-1/unplug"),
]

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def config(plane: str, **overrides: Any) -> HttpSinkConfig:
    return HttpSinkConfig.model_validate(
        {
            "kind": "http",
            "listen": ["tcp://127.0.0.1:0"],
            "plane": plane,
            "admin_token": hash_token(ADMIN),
            "simulator_control": True,
            **overrides,
        }
    )


def customers(*, default_deny: bool = False) -> Accounts:
    """
    Two tokened customers (acme with limits and a quota, globex), and one that
    owns the test client's address, 127.0.0.1.
    """
    listed = [
        CustomerConfig(
            id="acme",
            tokens=[hash_token(ACME)],
            client_rate="1 KiB/s",
            client_burst="4 KiB",
            rate="2 KiB/s",
            burst="8 KiB",
            quota="1 MiB/day",
        ),
        CustomerConfig(id="globex", tokens=[hash_token(GLOBEX)]),
    ]
    if default_deny:
        listed.append(CustomerConfig(id="default", deny=True))
    else:
        listed.append(CustomerConfig(id="loopback", networks=["127.0.0.1/32"]))
    return Accounts(AccountsConfig(), listed)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def broker() -> FakeBroker:
    fake = FakeBroker(accounts=customers())
    fake.simulated_keys["key-1"] = []
    return fake


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient, broker: FakeBroker) -> MakeClient:
    async def make(plane: str, **overrides: Any) -> Client:
        return await aiohttp_client(create_app(config(plane, **overrides), broker))

    return make


@pytest.fixture
async def tenant(make_client: MakeClient) -> Client:
    return await make_client("tenant")


# ---- operator endpoints on the tenant plane ------------------------------------


@pytest.mark.parametrize(("method", "path"), OPERATOR_ENDPOINTS)
@pytest.mark.parametrize("headers", [{}, bearer("wrong"), bearer(ACME)])
async def test_tenant_plane_hides_operator_endpoints(
    tenant: Client,
    broker: FakeBroker,
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    """
    Without the admin token an operator endpoint on the tenant plane is the
    same 404 as a path that does not exist, whatever other token is offered,
    and does nothing.
    """
    response = await tenant.request(method, path, headers=headers)
    assert 404 == response.status
    if method != "HEAD":
        assert {"error": f"no such path: {path!r}"} == await response.json()
    assert (0, []) == (broker.reloads, broker.simulated_keys["key-1"])


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/admin/reload"), ("PUT", "/metrics"), ("DELETE", "/")],
)
async def test_tenant_plane_wrong_method_does_not_reveal_an_endpoint(
    tenant: Client, method: str, path: str
) -> None:
    """
    A wrong method on a hidden endpoint is 404, not a 405 whose Allow header
    would confirm the endpoint exists.
    """
    response = await tenant.request(method, path)
    assert 404 == response.status
    assert "Allow" not in response.headers


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/metrics", 200),
        ("POST", "/v1/admin/reload", 200),
        ("POST", "/v1/simulator/key-1/unplug", 200),
    ],
)
async def test_tenant_plane_serves_operator_endpoints_to_the_admin_token(
    tenant: Client, broker: FakeBroker, method: str, path: str, status: int
) -> None:
    """
    With the admin token every operator endpoint on the tenant plane answers as
    it does on the operator plane.
    """
    response = await tenant.request(method, path, headers=bearer(ADMIN))
    assert status == response.status
    body = await response.text()
    if path == "/":
        assert "<html" in body
    if path == "/metrics":
        assert "ebroker_pool_level_bytes" in body
    assert (path == "/v1/admin/reload") == (broker.reloads == 1)
    expected = ["unplug"] if "simulator" in path else []
    assert expected == broker.simulated_keys["key-1"]


async def test_tenant_plane_without_admin_token_configured_hides_everything(
    make_client: MakeClient, broker: FakeBroker
) -> None:
    """
    A tenant-plane sink without an admin token has no way in to its operator
    endpoints: every one is 404.
    """
    client = await make_client("tenant", admin_token=None)
    for method, path in OPERATOR_ENDPOINTS:
        response = await client.request(method, path, headers=bearer(ADMIN))
        assert 404 == response.status, (method, path)
    assert (0, []) == (broker.reloads, broker.simulated_keys["key-1"])


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_tenant_plane_serves_probes_to_anyone(tenant: Client, path: str) -> None:
    """
    Health and readiness answer any client on the tenant plane.
    """
    assert 200 == (await tenant.get(path)).status
    assert 200 == (await tenant.post("/healthz")).status
    assert 200 == (await tenant.options("/")).status


async def test_tenant_plane_serves_entropy(tenant: Client, broker: FakeBroker) -> None:
    """
    Entropy is what the tenant plane is for: a customer draws it with its token.
    """
    fill(broker.pool, 32)
    response = await tenant.get("/v1/entropy?bytes=32", headers=bearer(ACME))
    assert 200 == response.status
    assert 32 == len(await response.read())


# ---- /v1/status on the tenant plane ----------------------------------------------


async def test_tenant_status_shows_only_the_tokened_customer(
    tenant: Client, broker: FakeBroker
) -> None:
    """
    A customer's token gets that customer's own limits, quota and usage and its
    own client's counters; no other customer, and none of the broker's pool,
    source or sink figures.
    """
    fill(broker.pool, 64)
    await (await tenant.get("/v1/entropy?bytes=16", headers=bearer(ACME))).read()
    await (await tenant.get("/v1/entropy?bytes=8", headers=bearer(GLOBEX))).read()
    response = await tenant.get("/v1/status", headers=bearer(ACME))
    assert 200 == response.status
    document = await response.json()
    assert {"health", "customer", "client"} == set(document)
    assert {"status": "ok", "serving": True} == document["health"]
    customer = document["customer"]
    assert ("acme", 16, 1) == (
        customer["id"],
        customer["bytes_served"],
        customer["client_count"],
    )
    assert (1024, 4096, 2048, 8192) == (
        customer["client_rate"],
        customer["client_burst"],
        customer["rate"],
        customer["burst"],
    )
    assert (1 << 20, 16, (1 << 20) - 16) == (
        customer["quota"]["limit"],
        customer["quota"]["used"],
        customer["quota"]["remaining"],
    )
    assert "clients" not in customer
    client = document["client"]
    assert client["key"].startswith("token:")
    assert ("http", 16) == (client["transport"], client["bytes_served"])
    text = json.dumps(document)
    assert "globex" not in text
    assert "loopback" not in text
    assert "127.0.0.1" not in text


async def test_tenant_status_identifies_a_client_by_address(tenant: Client) -> None:
    """
    Without a token a client is known by its address: the customer owning
    127.0.0.1 sees itself and only itself.
    """
    document = await (await tenant.get("/v1/status")).json()
    assert {"health", "customer", "client"} == set(document)
    assert "loopback" == document["customer"]["id"]
    assert "ip:127.0.0.1" == document["client"]["key"]
    assert "acme" not in json.dumps(document)


@pytest.mark.parametrize("headers", [{}, bearer("not-a-customer-token")])
async def test_tenant_status_tells_a_denied_client_only_health(
    aiohttp_client: AiohttpClient, headers: dict[str, str]
) -> None:
    """
    A client of the denied default customer, or one offering an unknown token,
    learns the health word and nothing else.
    """
    broker = FakeBroker(accounts=customers(default_deny=True))
    tenant = await aiohttp_client(create_app(config("tenant"), broker))
    response = await tenant.get("/v1/status", headers=headers)
    assert 200 == response.status
    assert {"health": {"status": "ok", "serving": True}} == await response.json()


async def test_tenant_status_tells_an_unidentified_client_only_health(
    aiohttp_client: AiohttpClient,
) -> None:
    """
    Without customers every client is the implicit default customer's: nobody
    it could be told about but the whole broker, so it gets health only.
    """
    tenant = await aiohttp_client(create_app(config("tenant"), FakeBroker()))
    assert {"health": {"status": "ok", "serving": True}} == await (
        await tenant.get("/v1/status")
    ).json()


async def test_tenant_status_says_shutting_down_without_reasons(
    tenant: Client,
) -> None:
    """
    Once the sink is shutting down the tenant's health word says so.
    """
    tenant.app[STATE_KEY].shutting_down = True
    document = await (await tenant.get("/v1/status", headers=bearer(ACME))).json()
    assert {"status": "shutting_down", "serving": False} == document["health"]


async def test_tenant_status_with_admin_token_is_the_full_document(
    tenant: Client,
) -> None:
    """
    The admin token gets the operator's full status on the tenant plane too.
    """
    document = await (await tenant.get("/v1/status", headers=bearer(ADMIN))).json()
    assert {"acme", "globex", "loopback", "default"} <= set(
        document["accounts"]["customers"]
    )
    assert {"pool", "sources", "sinks", "tiers"} <= set(document)


# ---- the operator plane --------------------------------------------------------


async def test_operator_plane_serves_every_endpoint_without_a_token(
    make_client: MakeClient, broker: FakeBroker
) -> None:
    """
    The operator plane serves status, metrics, the page and the simulator to
    any (loopback) client; only reload still needs the admin token.
    """
    operator = await make_client("operator")
    document = await (await operator.get("/v1/status")).json()
    assert {"acme", "globex"} <= set(document["accounts"]["customers"])
    assert 200 == (await operator.get("/metrics")).status
    assert 200 == (await operator.get("/")).status
    assert 200 == (await operator.post("/v1/simulator/key-1/unplug")).status
    assert 401 == (await operator.post("/v1/admin/reload")).status
    reload = await operator.post("/v1/admin/reload", headers=bearer(ADMIN))
    assert 200 == reload.status
    assert (1, ["unplug"]) == (broker.reloads, broker.simulated_keys["key-1"])


# ---- two real sinks on loopback ------------------------------------------------


async def test_real_sinks_split_the_planes() -> None:
    """
    One broker behind a tenant sink and an operator sink: haproxy's HTTP/1.0
    probe without Host works on the tenant port, metrics are refused there and
    served on the operator port.
    """
    broker = FakeBroker(accounts=customers())
    tenant = HttpSink(config("tenant", name="tenant"), broker)
    operator = HttpSink(config("operator", name="operator"), broker)
    await tenant.start()
    try:
        await operator.start()
        try:
            [tenant_address] = tenant.bound_addresses()
            [operator_address] = operator.bound_addresses()
            probe = await raw_exchange(tenant_address, b"GET /healthz HTTP/1.0\r\n\r\n")
            assert probe.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), probe[:40]
            hidden = await raw_exchange(
                tenant_address, b"GET /metrics HTTP/1.0\r\n\r\n"
            )
            assert hidden.startswith((b"HTTP/1.0 404", b"HTTP/1.1 404")), hidden[:40]
            shown = await raw_exchange(
                operator_address, b"GET /metrics HTTP/1.0\r\n\r\n"
            )
            assert shown.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), shown[:40]
            assert b"ebroker_pool_level_bytes" in shown
        finally:
            await operator.shutdown(1.0)
    finally:
        await tenant.shutdown(1.0)


@pytest.mark.parametrize("path", [b"/metrics", b"/v1/status", b"/v1/admin/reload"])
async def test_undecodable_token_on_a_guarded_endpoint_is_no_token(path: bytes) -> None:
    """
    A bearer token that is not UTF-8 on an admin-guarded path is treated as no
    token at all: the tenant sees what any tenant sees, never a 500.
    """
    broker = FakeBroker(accounts=customers())
    tenant = HttpSink(config("tenant", name="tenant"), broker)
    await tenant.start()
    try:
        [address] = tenant.bound_addresses()
        method = b"POST" if path.endswith(b"reload") else b"GET"
        answer = await raw_exchange(
            address,
            method + b" " + path + b" HTTP/1.0\r\n"
            b"Authorization: Bearer \xff\xfe\x80\r\n\r\n",
        )
    finally:
        await tenant.shutdown(1.0)
    status_line = answer.split(b"\r\n", 1)[0]
    assert not status_line.endswith(b"500 Internal Server Error"), status_line
    assert int(status_line.split()[1]) < 500, status_line
