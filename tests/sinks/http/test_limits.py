"""
HTTP answers for the limits: a request waiting under ?wait= when a reload
denies its customer gets a 403, and a bearer token that is not text a 400, not
a server error.
"""

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from broker.accounts import Accounts, AccountsConfig, Client, CustomerConfig, Peer
from broker.pool import EntropyPool
from broker.withdrawal import Withdrawals
from sinks.http.limits import identify, refusal
from tests.helpers import eventually

# Only bounds how long a broken wait can hang the test.
DEADLINE = 30.0


async def test_denied_while_waiting_is_a_403(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A reload that denies the customer mid-wait ends the wait with a denial
    that renders as 403, and the bytes collected so far are handed back.
    """
    slow = CustomerConfig(
        id="slow", networks=["127.0.0.2/32"], client_rate="10 B/s", client_burst="10 B"
    )
    accounts = Accounts(AccountsConfig(), [slow])
    client = accounts.identify(Peer("http", ip="127.0.0.2"))
    assert isinstance(client, Client)
    calls = 0
    wait_grant = accounts.wait_grant

    async def counted(client: Client, wanted: int) -> int:
        nonlocal calls
        calls += 1
        return await wait_grant(client, wanted)

    monkeypatch.setattr(accounts, "wait_grant", counted)
    withdrawals = Withdrawals(EntropyPool(), accounts)
    waiting = asyncio.create_task(withdrawals.grant_all_within(client, 1000, DEADLINE))
    # The first call takes the burst; a second means the request is waiting.
    await eventually(lambda: calls >= 2, timeout=DEADLINE)
    accounts.reload([slow.model_copy(update={"deny": True})])
    async with asyncio.timeout(DEADLINE):
        grant = await waiting
    assert (0, "denied") == (grant.granted, grant.limit)
    assert 403 == refusal(grant, 1000, 0.0).status
    assert 0 == client.bytes_served


@pytest.mark.parametrize(
    "header",
    [
        "Bearer ab\x01cd",
        "Bearer tok\x7fen",
    ],
)
def test_a_token_that_is_not_printable_text_is_a_400(header: str) -> None:
    """
    A bearer token carrying control characters is answered 400, before any
    hash is taken of it (bytes that are not UTF-8 are covered on loopback in
    test_connections.py: a mocked request cannot carry them).
    """
    request = make_mocked_request(
        "GET", "/v1/entropy", headers={"Authorization": header}
    )
    answer = identify(Accounts.unlimited(), request)
    assert isinstance(answer, web.StreamResponse)
    assert 400 == answer.status
