"""
``GET /v1/history`` on the HTTP sink: the query it accepts, the planes that
serve it, and the shape of its answer.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import MultiDict
from pytest_aiohttp import AiohttpClient

from broker.accounts import hash_token
from broker.history import CustomerPoint, Event, History, Sample, SourcePoint
from sinks.http.app import create_app
from sinks.http.config import HttpSinkConfig
from sinks.http.history import BadQuery, HistoryQuery, parse_query
from tests.sinks.http.test_api import FakeBroker

ADMIN = "operator-secret"
STEP = 10.0

Client = TestClient[web.Request, web.Application]


@dataclass
class RecordedBroker(FakeBroker):
    """
    A fake broker that keeps a history, filled up to the present.
    """

    history: History = field(default_factory=History)


def filled(points: int = 30) -> History:
    """
    A history whose newest point is the current 10-s slot: a pool, one Entropy
    Key, one getrandom source, one customer and one event.
    """
    history = History()
    now = time.time()
    first = now - (points - 1) * STEP
    for index in range(points):
        history.record(
            first + index * STEP,
            Sample(
                level_bytes=1000.0 + index,
                in_bytes_per_s=4000.0,
                out_bytes_per_s=3000.0,
                connections=3.0,
                sources={
                    "ekey": SourcePoint(0, "entropykey", 4096.0, 32768.0, "healthy")
                    if index % 2
                    else SourcePoint(
                        0, "entropykey", 4096.0, 32768.0, "healthy", 41.5, 5.02
                    ),
                    "getrandom": SourcePoint(1, "getrandom", 0.0, 0.0, "healthy"),
                },
                customers={"acme": CustomerPoint(100.0, 0.5)},
            ),
        )
    history.add_event(Event(now - 5, "phase", "broker", "starting", "serving", ""))
    return history


def config(plane: str) -> HttpSinkConfig:
    return HttpSinkConfig.model_validate(
        {
            "kind": "http",
            "listen": ["tcp://127.0.0.1:0"],
            "plane": plane,
            "admin_token": hash_token(ADMIN),
        }
    )


@pytest.fixture
def broker() -> RecordedBroker:
    return RecordedBroker(history=filled())


@pytest.fixture
async def operator(aiohttp_client: AiohttpClient, broker: RecordedBroker) -> Client:
    return await aiohttp_client(create_app(config("operator"), broker))


@pytest.fixture
async def tenant(aiohttp_client: AiohttpClient, broker: RecordedBroker) -> Client:
    return await aiohttp_client(create_app(config("tenant"), broker))


async def history(client: Client, **query: str) -> dict[str, Any]:
    response = await client.get("/v1/history", params=query)
    assert 200 == response.status, await response.text()
    assert response.content_type == "application/json"
    assert "no-store" == response.headers["Cache-Control"]
    document: dict[str, Any] = await response.json()
    return document


# ---- query ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, HistoryQuery()),
        ({"resolution": "1m"}, HistoryQuery("1m")),
        ({"last": "600"}, HistoryQuery(last=600.0)),
        ({"since": "1764543000.5"}, HistoryQuery(since=1764543000.5)),
        ({"resolution": "10s", "last": "0"}, HistoryQuery(last=0.0)),
    ],
)
def test_query_accepted(query: dict[str, str], expected: HistoryQuery) -> None:
    """
    Resolution, last and since parse to what the client asked for.
    """
    assert expected == parse_query(MultiDict(query))


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ([("resolution", "1h")], "resolution must be one of 10s, 1m"),
        ([("last", "ten")], "last must be a number"),
        ([("last", "-5")], "last must not be negative"),
        ([("since", "nan")], "since must be a finite number"),
        ([("since", "inf")], "since must be a finite number"),
        ([("last", "60"), ("since", "1")], "not both"),
        ([("last", "60"), ("last", "120")], "more than once"),
        ([("points", "5")], "unknown parameter"),
    ],
)
async def test_bad_query_is_a_400_with_a_reason(
    operator: Client, query: list[tuple[str, str]], reason: str
) -> None:
    """
    A value the endpoint cannot use is refused with a JSON reason.
    """
    with pytest.raises(BadQuery, match=reason):
        parse_query(MultiDict(query))
    response = await operator.get("/v1/history", params=query)
    assert 400 == response.status
    assert reason in (await response.json())["error"]


# ---- planes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer x"}]
)
async def test_tenant_plane_hides_history(
    tenant: Client, headers: dict[str, str]
) -> None:
    """
    Without the admin token the tenant plane answers the same 404 as for a
    path that does not exist.
    """
    response = await tenant.get("/v1/history", headers=headers)
    missing = await tenant.get("/v1/nothing-here", headers=headers)
    assert 404 == response.status == missing.status
    assert {"error": "no such path: '/v1/history'"} == await response.json()


async def test_tenant_plane_serves_history_with_admin_token(tenant: Client) -> None:
    """
    With the admin token the tenant plane answers as the operator plane does.
    """
    response = await tenant.get(
        "/v1/history", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert 200 == response.status
    assert 30 == (await response.json())["points"]


async def test_broker_without_history(aiohttp_client: AiohttpClient) -> None:
    """
    A broker that keeps no history answers 404 with a reason.
    """
    client = await aiohttp_client(create_app(config("operator"), FakeBroker()))
    response = await client.get("/v1/history")
    assert 404 == response.status
    assert "keeps no history" in (await response.json())["error"]


# ---- shape ------------------------------------------------------------------------


async def test_shape_of_the_answer(operator: Client, broker: RecordedBroker) -> None:
    """
    Every series has one value (or null) per point; point i is at start +
    i * step; sources carry tier, kind and state names; temperature and
    voltage are null where a source reports none.
    """
    document = await history(operator)
    assert {
        "now",
        "resolution",
        "step",
        "start",
        "points",
        "pool",
        "sources",
        "customers",
        "events",
        "memory_bytes",
    } == set(document)
    count = document["points"]
    assert 30 == count
    assert "10s" == document["resolution"]
    assert STEP == document["step"]
    assert broker.history.fine.head is not None
    newest = broker.history.fine.head * STEP
    assert newest == document["start"] + (count - 1) * document["step"]
    assert document["start"] <= document["now"] < newest + 2 * STEP
    pool = document["pool"]
    assert {"level_bytes", "in_bytes_per_s", "out_bytes_per_s", "connections"} == set(
        pool
    )
    assert [1000.0 + index for index in range(30)] == pool["level_bytes"]
    assert all(len(values) == count for values in pool.values())
    ekey = document["sources"]["ekey"]
    assert 0 == ekey["tier"]
    assert "entropykey" == ekey["kind"]
    assert ["healthy"] * count == ekey["state"]
    assert [41.5 if index % 2 == 0 else None for index in range(count)] == ekey[
        "temperature_c"
    ]
    getrandom = document["sources"]["getrandom"]
    assert [None] * count == getrandom["temperature_c"]
    assert [None] * count == getrandom["voltage_v"]
    assert {"bytes_per_s": [100.0] * count, "throttled_per_s": [0.5] * count} == (
        document["customers"]["acme"]
    )
    assert [
        {
            "time": pytest.approx(document["now"] - 5, abs=2),
            "kind": "phase",
            "subject": "broker",
            "from": "starting",
            "to": "serving",
            "reason": "",
        }
    ] == document["events"]
    assert broker.history.memory_bytes() == document["memory_bytes"]


async def test_last_and_since_cut_the_window(operator: Client) -> None:
    """
    ``last`` keeps the points of the last seconds, ``since`` those strictly
    after a time: what a polling page asks for.
    """
    whole = await history(operator)
    recent = await history(operator, last="60")
    assert 5 <= recent["points"] <= 7
    assert (
        whole["pool"]["level_bytes"][-recent["points"] :]
        == recent["pool"]["level_bytes"]
    )
    newest = whole["start"] + (whole["points"] - 1) * whole["step"]
    after = await history(operator, since=str(newest - STEP))
    assert 1 == after["points"]
    assert newest == after["start"]
    assert [] == (await history(operator, since=str(newest)))["pool"]["level_bytes"]
    assert [] == (await history(operator, since=str(time.time() + 1)))["events"]


async def test_minute_resolution(operator: Client) -> None:
    """
    ``resolution=1m`` answers the minute ring: a step of 60 s and one point
    per minute the 10-s points cover.
    """
    document = await history(operator, resolution="1m")
    assert "1m" == document["resolution"]
    assert 60.0 == document["step"]
    assert 5 <= document["points"] <= 6
    assert all(not math.isnan(value) for value in document["pool"]["in_bytes_per_s"])
