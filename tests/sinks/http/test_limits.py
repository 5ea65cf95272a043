"""
HTTP answers for the limits: a request waiting under ?wait= when a reload
denies its customer gets a 403, not a server error.
"""

import asyncio

from broker.accounts import Accounts, AccountsConfig, Client, CustomerConfig, Peer
from sinks.http.limits import grant_within, refusal


async def test_denied_while_waiting_is_a_403() -> None:
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
    waiting = asyncio.create_task(grant_within(accounts, client, 1000, 30))
    for _ in range(5):
        await asyncio.sleep(0)
    accounts.reload([slow.model_copy(update={"deny": True})])
    async with asyncio.timeout(5):
        grant = await waiting
    assert (0, "denied") == (grant.granted, grant.limit)
    assert 403 == refusal(grant, 1000, 0.0).status
    assert 0 == client.bytes_served
