"""
The pollen endpoint: the challenge as pollen finds it, the two-line answer
pollinate checks, and the route on both planes of the real application, under
the same customers and limits as ``/v1/entropy``.
"""

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from pytest_aiohttp import AiohttpClient

from broker.accounts import Accounts, AccountsConfig, CustomerConfig, hash_token
from sinks.http import pollen
from sinks.http.app import POLLEN_WAIT, create_app
from sinks.http.config import HttpSinkConfig
from sinks.http.state import STATE_KEY
from tests.sinks.http.test_api import FakeBroker, fill, until

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

ADMIN = "operator-secret"
GUEST = "guest-token"
SPENT = "spent-token"
DENIED = "denied-token"

# pollinate's challenge: sha512sum of 64 urandom bytes, as 128 hex digits.
CHALLENGE = hashlib.sha512(b"pollinate").hexdigest()
FORM = {"Content-Type": pollen.FORM_TYPE}


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


# ---- the challenge ----------------------------------------------------------------


def test_post_form_body_carries_the_challenge() -> None:
    """
    pollinate's body, ``challenge=`` and 128 hex digits, gives those digits.
    """
    body = f"challenge={CHALLENGE}".encode()
    assert CHALLENGE.encode() == pollen.find_challenge(b"", body, 8192)


def test_get_query_carries_the_challenge() -> None:
    """
    Without a form body the query's ``challenge`` is taken, as Go's FormValue.
    """
    assert b"abc" == pollen.find_challenge(b"x=1&challenge=abc", None, 8192)


def test_form_body_comes_before_the_query() -> None:
    """
    A POST's form value wins over its query's; an empty one too (then: 400).
    """
    assert b"body" == pollen.find_challenge(b"challenge=query", b"challenge=body", 99)
    assert b"" == pollen.find_challenge(b"challenge=query", b"challenge=", 99)
    assert b"query" == pollen.find_challenge(b"challenge=query", b"other=1", 99)


def test_first_challenge_wins() -> None:
    """
    A repeated key gives its first value.
    """
    assert b"one" == pollen.form_value(b"challenge=one&challenge=two")


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (b"challenge=a%20b+c", b"a b c"),
        (b"challenge=%FF%00%2B", b"\xff\x00+"),
        (b"ch%61llenge=x", b"x"),
        (b"challenge=a=b", b"a=b"),
        (b"&&challenge=x&", b"x"),
        (b"challenge", b""),
    ],
)
def test_percent_encoding_is_decoded_once(encoded: bytes, expected: bytes) -> None:
    """
    Keys and values are URL-decoded (``+`` is a space) into opaque bytes.
    """
    assert expected == pollen.form_value(encoded)


@pytest.mark.parametrize(
    "encoded", [b"", b"challenge=%zz", b"challenge=%4", b"other=1", b"challengex=1"]
)
def test_no_well_formed_challenge_is_none(encoded: bytes) -> None:
    """
    A pair with a malformed escape is skipped whole, as Go skips it.
    """
    assert pollen.form_value(encoded) is None


def test_malformed_pair_does_not_hide_a_later_one() -> None:
    """
    Parsing goes on after a malformed pair.
    """
    assert b"ok" == pollen.form_value(b"challenge=%zz&challenge=ok")


def test_oversize_challenge_is_refused() -> None:
    """
    A challenge longer than the limit raises; one at the limit is taken.
    """
    assert b"x" * 16 == pollen.find_challenge(b"challenge=" + b"x" * 16, None, 16)
    with pytest.raises(pollen.ChallengeTooLarge, match="17 bytes"):
        pollen.find_challenge(b"challenge=" + b"x" * 17, None, 16)
    with pytest.raises(pollen.ChallengeTooLarge):
        pollen.find_challenge(b"", b"challenge=" + b"%41" * 17, 16)


@given(st.binary(max_size=300))
def test_any_challenge_survives_encoding(challenge: bytes) -> None:
    """
    Whatever bytes a client encodes, the endpoint hashes exactly those.
    """
    encoded = b"challenge=" + quote_from_bytes(challenge, safe="").encode()
    assert challenge == pollen.find_challenge(encoded, None, 300)
    assert challenge == pollen.find_challenge(b"", encoded, 300)


# ---- the answer -------------------------------------------------------------------


def test_known_challenge_gives_the_known_first_line() -> None:
    """
    Line 1 is SHA-512 of the challenge, what ``printf abc | sha512sum`` prints.
    """
    body = pollen.answer(b"abc", bytes(64))
    assert (
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
    ) == body.decode().split("\n")[0]


def test_answer_is_two_lf_terminated_hex_lines() -> None:
    """
    258 bytes: two lines of 128 lowercase hex digits, LF only; line 2 is
    SHA-512 of the challenge followed by the fresh bytes.
    """
    fresh = bytes(range(64))
    body = pollen.answer(CHALLENGE.encode(), fresh)
    assert 258 == len(body)
    expected = f"{sha512(CHALLENGE.encode())}\n{sha512(CHALLENGE.encode() + fresh)}\n"
    assert expected.encode() == body


def test_answer_needs_a_challenge_and_enough_fresh_bytes() -> None:
    """
    An empty challenge gets the 400, never an answer; 63 fresh bytes are too few.
    """
    with pytest.raises(ValueError, match="empty"):
        pollen.answer(b"", bytes(64))
    with pytest.raises(ValueError, match="63 fresh bytes"):
        pollen.answer(b"abc", bytes(63))


# ---- the endpoint -----------------------------------------------------------------


def customers() -> Accounts:
    """
    A guest, a customer whose quota is smaller than one answer, a denied one;
    the test client's own address is unlimited.
    """
    return Accounts(
        AccountsConfig(),
        [
            CustomerConfig(id="guest", tokens=[hash_token(GUEST)]),
            CustomerConfig(id="spent", tokens=[hash_token(SPENT)], quota="32 B/day"),
            CustomerConfig(id="denied", tokens=[hash_token(DENIED)], deny=True),
            CustomerConfig(id="loopback", networks=["127.0.0.1/32"]),
        ],
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def config(plane: str = "tenant", **overrides: Any) -> HttpSinkConfig:
    return HttpSinkConfig.model_validate(
        {
            "kind": "http",
            "listen": ["tcp://127.0.0.1:0"],
            "plane": plane,
            "admin_token": hash_token(ADMIN),
            "pollen": True,
            **overrides,
        }
    )


@pytest.fixture
def broker() -> FakeBroker:
    fake = FakeBroker(accounts=customers())
    fill(fake.pool, 4096)
    return fake


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient, broker: FakeBroker) -> MakeClient:
    async def make(plane: str = "tenant", **overrides: Any) -> Client:
        return await aiohttp_client(create_app(config(plane, **overrides), broker))

    return make


async def ask(
    client: Client, challenge: str = CHALLENGE, path: str = "/", **kwargs: Any
) -> tuple[int, str]:
    headers = {**FORM, **kwargs.pop("headers", {})}
    data = f"challenge={challenge}"
    async with client.post(path, data=data, headers=headers, **kwargs) as response:
        return response.status, await response.text()


async def test_post_gets_the_pollen_answer(
    make_client: MakeClient, broker: FakeBroker
) -> None:
    """
    pollinate's POST gets 200, text/plain UTF-8, the challenge's hash first,
    and 64 pool bytes are withdrawn for it and counted by the sink.
    """
    client = await make_client()
    before = broker.pool.bytes_out
    async with client.post("/", data=f"challenge={CHALLENGE}", headers=FORM) as resp:
        body = await resp.read()
        assert 200 == resp.status
        assert pollen.CONTENT_TYPE == resp.headers["Content-Type"]
        assert "no-store" == resp.headers["Cache-Control"]
    lines = body.decode().split("\n")
    assert [sha512(CHALLENGE.encode()), ""] == [lines[0], lines[2]]
    assert 64 == broker.pool.bytes_out - before
    state = client.app[STATE_KEY]
    assert (1, 64) == (state.requests, state.bytes_out)


async def test_second_line_is_fresh_every_time(make_client: MakeClient) -> None:
    """
    Two requests with one challenge: the same first line, different second.
    """
    client = await make_client()
    first = (await ask(client))[1].split("\n")
    second = (await ask(client))[1].split("\n")
    assert first[0] == second[0]
    assert first[1] != second[1]


async def test_get_with_percent_encoded_challenge(make_client: MakeClient) -> None:
    """
    ``GET /?challenge=`` works on the tenant plane; the decoded value is hashed.
    """
    client = await make_client()
    async with client.get("/?challenge=a%20b%2Bc") as response:
        assert 200 == response.status
        assert sha512(b"a b+c") == (await response.text()).split("\n")[0]


@pytest.mark.parametrize(
    ("method", "target", "data"),
    [
        ("POST", "/", "challenge="),
        ("POST", "/", "other=1"),
        ("POST", "/", ""),
        ("GET", "/?challenge=", None),
    ],
)
async def test_missing_or_empty_challenge_is_400(
    make_client: MakeClient,
    broker: FakeBroker,
    method: str,
    target: str,
    data: str | None,
) -> None:
    """
    No challenge: pollen's 400 text, and nothing withdrawn.
    """
    client = await make_client()
    before = broker.pool.bytes_out
    async with client.request(method, target, data=data, headers=FORM) as response:
        assert 400 == response.status
        assert pollen.CONTENT_TYPE == response.headers["Content-Type"]
        assert pollen.NO_CHALLENGE == await response.read()
    assert before == broker.pool.bytes_out


async def test_body_of_another_type_is_not_read(make_client: MakeClient) -> None:
    """
    Like pollen, only a form body carries the challenge.
    """
    client = await make_client()
    headers = {"Content-Type": "text/plain"}
    async with client.post("/", data=f"challenge={CHALLENGE}", headers=headers) as r:
        assert 400 == r.status


async def test_oversize_challenge_is_413(make_client: MakeClient) -> None:
    """
    A challenge beyond ``max_body_bytes``, in the body or the query, is refused.
    """
    client = await make_client(max_body_bytes=256)
    assert 200 == (await ask(client, "x" * 246))[0]
    assert 413 == (await ask(client, "x" * 247))[0]
    async with client.get("/", params={"challenge": "x" * 257}) as response:
        assert 413 == response.status


async def test_denied_and_spent_customers_get_the_entropy_refusals(
    make_client: MakeClient, broker: FakeBroker
) -> None:
    """
    The same 401/403 bodies as ``/v1/entropy``, and nothing withdrawn; another
    customer is served meanwhile.
    """
    client = await make_client()
    before = broker.pool.bytes_out
    cases = [
        ("wrong-token", 401, "auth"),
        (DENIED, 403, "denied"),
        (SPENT, 403, "quota"),
    ]
    for token, status, limit in cases:
        async with client.post(
            "/", data=f"challenge={CHALLENGE}", headers={**FORM, **bearer(token)}
        ) as response:
            assert status == response.status
            assert limit == json.loads(await response.read())["limit"]
            async with client.get(
                "/v1/entropy?bytes=64", headers=bearer(token)
            ) as entropy:
                assert status == entropy.status
    assert before == broker.pool.bytes_out
    assert 200 == (await ask(client, headers=bearer(GUEST)))[0]


async def test_waits_for_the_pool_within_the_pollen_wait(
    make_client: MakeClient, broker: FakeBroker
) -> None:
    """
    With the pool short, the request waits its turn and is answered when the
    bytes arrive (within `POLLEN_WAIT`).
    """
    assert POLLEN_WAIT < 5
    client = await make_client()
    broker.pool.read_nowait(broker.pool.level)
    request = asyncio.create_task(ask(client))
    await until(lambda: broker.pool.waiters == 1)
    fill(broker.pool, 64)
    status, body = await request
    assert 200 == status
    assert sha512(CHALLENGE.encode()) == body.split("\n")[0]


async def test_empty_pool_answers_503_with_retry_after(
    make_client: MakeClient, broker: FakeBroker
) -> None:
    """
    With nothing to serve the refusal is ``/v1/entropy``'s 503 (``max_wait=0``:
    no waiting).
    """
    client = await make_client(max_wait=0)
    broker.pool.read_nowait(broker.pool.level)
    async with client.post("/", data=f"challenge={CHALLENGE}", headers=FORM) as r:
        assert 503 == r.status
        assert "Retry-After" in r.headers


# ---- the route and the planes ------------------------------------------------------


async def test_tenant_plane_get_root_without_challenge_stays_hidden(
    make_client: MakeClient,
) -> None:
    """
    The status page at ``/`` still needs the admin token on the tenant plane.
    """
    client = await make_client()
    async with client.get("/") as response:
        assert 404 == response.status
    async with client.get("/?other=1") as response:
        assert 404 == response.status
    async with client.get("/", headers=bearer(ADMIN)) as response:
        assert 200 == response.status
        assert "text/html" == response.content_type


async def test_operator_plane_root_is_page_and_pollen(make_client: MakeClient) -> None:
    """
    On the operator plane ``GET /`` is the page, HEAD too; with a challenge,
    or as a POST, it is pollen.
    """
    client = await make_client("operator")
    async with client.get("/") as response:
        assert 200 == response.status
        assert "text/html" == response.content_type
    async with client.head("/?challenge=x") as response:
        assert 200 == response.status
        assert "text/html" == response.content_type
    async with client.get("/", params={"challenge": CHALLENGE}) as response:
        assert 200 == response.status
        assert pollen.CONTENT_TYPE == response.headers["Content-Type"]
    assert 200 == (await ask(client))[0]


async def test_configured_path(make_client: MakeClient) -> None:
    """
    At ``pollen_path`` only: ``/`` is left to the status page, HEAD is refused.
    """
    client = await make_client("operator", pollen_path="/pollen/v1")
    assert 200 == (await ask(client, path="/pollen/v1"))[0]
    async with client.get("/pollen/v1?challenge=abc") as response:
        assert sha512(b"abc") == (await response.text()).split("\n")[0]
    async with client.get("/pollen/v1") as response:
        assert 400 == response.status
    async with client.head("/pollen/v1") as response:
        assert 405 == response.status
    assert 405 == (await ask(client, path="/"))[0]
    async with client.get("/?challenge=abc") as response:
        assert "text/html" == response.content_type

    tenant = await make_client(pollen_path="/pollen/v1")
    assert 200 == (await ask(tenant, path="/pollen/v1"))[0]
    assert 404 == (await ask(tenant, path="/"))[0]
    async with tenant.put("/pollen/v1") as response:
        assert 404 == response.status


@pytest.mark.parametrize(
    ("plane", "post", "get"), [("tenant", 404, 404), ("operator", 405, 200)]
)
async def test_disabled_pollen_answers_nothing(
    make_client: MakeClient, plane: str, post: int, get: int
) -> None:
    """
    With ``pollen = false`` a challenge gets no pollen answer: the tenant
    plane hides ``/``, the operator plane shows its page to any GET.
    """
    client = await make_client(plane, pollen=False)
    assert post == (await ask(client))[0]
    async with client.get("/", params={"challenge": CHALLENGE}) as response:
        assert get == response.status
        assert pollen.CONTENT_TYPE != response.headers["Content-Type"]


@pytest.mark.parametrize(
    "path",
    ["/healthz", "/v1/entropy", "/metrics", "/v1/admin/reload", "/v1/simulator/k"],
)
def test_pollen_path_of_another_endpoint_is_refused(path: str) -> None:
    """
    pollen cannot take over an API path: the config is refused at load.
    """
    with pytest.raises(ValidationError, match="pollen_path"):
        config(pollen_path=path)
