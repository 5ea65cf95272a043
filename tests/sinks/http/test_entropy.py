"""
``GET /v1/entropy`` on a real sink, where it is answered ahead of the
application: at once through `Withdrawals.now` when nothing has to wait, else
on the waiting path, with the same answers, counts, refunds and deadlines
either way; and the quick reading of ``?bytes=N`` agrees with the full parser.
"""

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from broker.accounts import Accounts, AccountsConfig, Client, CustomerConfig, Peer
from broker.status import SourceStatus
from sinks.http.config import HttpSinkConfig
from sinks.http.entropy import (
    EntropyEndpoint,
    EntropyQuery,
    QueryError,
    parse_entropy_query,
)
from sinks.http.server import HttpSink
from sinks.http.state import HttpSinkState
from tests.fakeclock import FakeClock
from tests.sinks.http.test_api import DEADLINE, FakeBroker, fill, raw_exchange


@dataclass
class CountingBroker(FakeBroker):
    """
    A `FakeBroker` that counts how often the sources' status is built.
    """

    status_reads: int = 0

    def sources_status(self) -> list[SourceStatus]:
        self.status_reads += 1
        return super().sources_status()


def make_config(**overrides: Any) -> HttpSinkConfig:
    """
    A tenant sink on an ephemeral loopback port, as guests reach it.
    """
    return HttpSinkConfig.model_validate(
        {"kind": "http", "listen": ["tcp://127.0.0.1:0"], **overrides}
    )


def limited(**limits: str) -> Accounts:
    """
    Accounts where the test client (127.0.0.1) is a customer with ``limits``.
    """
    loopback = CustomerConfig(id="loopback", networks=["127.0.0.1/32"], **limits)
    return Accounts(AccountsConfig(), [loopback])


def loopback_client(accounts: Accounts) -> Client:
    client = accounts.identify(Peer("http", ip="127.0.0.1"))
    assert isinstance(client, Client)
    return client


@asynccontextmanager
async def serving(
    broker: FakeBroker, **overrides: Any
) -> AsyncIterator[tuple[HttpSink, aiohttp.ClientSession]]:
    """
    A started sink and a client session holding one keep-alive connection.
    """
    sink = HttpSink(make_config(**overrides), broker)
    await sink.start()
    [address] = sink.bound_addresses()
    base = address.replace("tcp://", "http://")
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    try:
        async with aiohttp.ClientSession(
            base, connector=connector, timeout=timeout
        ) as session:
            yield sink, session
    finally:
        await sink.shutdown(1.0)


async def get(
    session: aiohttp.ClientSession, query: str, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    async with session.get(f"/v1/entropy?{query}", **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


# ---- reading the query ----------------------------------------------------------


def both_readings(target: str) -> tuple[EntropyQuery | str, EntropyQuery | str]:
    """
    What the endpoint reads from ``target``, and what the full parser reads
    from aiohttp's parsed query: the parameters, or the error message.
    """
    config = make_config()
    endpoint = EntropyEndpoint(config, FakeBroker(), HttpSinkState())
    request = make_mocked_request("GET", target)
    return reading(endpoint.query, request), reading(
        lambda request: parse_entropy_query(request.query, config), request
    )


def reading(
    read: Callable[[web.BaseRequest], EntropyQuery], request: web.BaseRequest
) -> EntropyQuery | str:
    try:
        return read(request)
    except QueryError as exc:
        return str(exc)


@pytest.mark.parametrize(
    "value",
    [
        "32",
        "0032",
        "1",
        "65536",
        "65537",
        "0",
        "",
        "99999999999",
        "\u0663\u0662",  # Arabic-Indic digits: str.isdigit() says yes
        "32&format=hex",
        "32&wait=1",
        "32&bytes=32",
        "32#fragment",
        "%33%32",
        "3%32",
        "+32",
        "32 ",
    ],
)
def test_quick_reading_of_bytes_agrees_with_the_full_parser(value: str) -> None:
    """
    ``/v1/entropy?bytes=...`` reads the same, or fails with the same message,
    whether or not the endpoint's quick reading takes it.
    """
    quick, full = both_readings(f"/v1/entropy?bytes={value}")
    assert full == quick


@given(
    st.one_of(
        st.integers(min_value=0, max_value=10**12).map(str),
        st.text(alphabet="0123456789%&#=+-. x\u0663", max_size=14),
    )
)
def test_any_bytes_value_reads_the_same_either_way(value: str) -> None:
    """
    Property: whatever follows ``bytes=``, both readings agree.
    """
    quick, full = both_readings(f"/v1/entropy?bytes={value}")
    assert full == quick


# ---- served at once ---------------------------------------------------------------


async def test_entropy_is_served_counted_and_never_cached() -> None:
    """
    Requests answered at once get exactly their bytes, no-store, and count as
    requests of one connection; nothing waits and nothing stays in flight.
    """
    broker = FakeBroker()
    fill(broker.pool, 64)
    async with serving(broker) as (sink, session):
        bodies = []
        for _ in range(2):
            status, headers, body = await get(session, "bytes=32")
            assert 200 == status
            assert "no-store" == headers["Cache-Control"]
            assert "application/octet-stream" == headers["Content-Type"]
            bodies.append(body)
        stats = sink.status()
    assert [32, 32] == [len(body) for body in bodies]
    assert bodies[0] != bodies[1]
    assert (2, 1, 64) == (stats.requests, stats.connections_total, stats.bytes_out)
    assert (64, 0) == (broker.pool.bytes_out, broker.pool.waiters)


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET /v1/entropy?bytes=%33%32", 200),
        (b"GET /v1/entropy?bytes=32&format=raw", 200),
        (b"HEAD /v1/entropy?bytes=32", 405),
        (b"POST /v1/entropy?bytes=32", 405),
        (b"GET /v1/entropy/?bytes=32", 404),
        (b"GET /v1/entropyx?bytes=32", 404),
        (b"GET /v1/entropy?bytes=32&bytes=32", 400),
        (b"GET /v1/entropy?bytes=0", 400),
    ],
)
async def test_every_spelling_gets_the_applications_answer(
    request_line: bytes, status: int
) -> None:
    """
    Targets the sink does not answer ahead of the application (escapes, other
    methods, other paths) get the same answers as ever, JSON errors and
    no-store included.
    """
    broker = FakeBroker()
    fill(broker.pool, 32)
    async with serving(broker) as (sink, _session):
        [address] = sink.bound_addresses()
        answer = await raw_exchange(address, request_line + b" HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status == int(head.split(b" ", 2)[1])
    assert b"\r\nCache-Control: no-store" in head
    if status == 200:
        assert 32 == len(body) == broker.pool.bytes_out
    elif b"HEAD" not in request_line:
        assert "error" in json.loads(body)
        assert 0 == broker.pool.bytes_out


async def test_a_closed_pool_without_wait_is_503_shutting_down() -> None:
    """
    Once the pool is closed, a request with no wait is told the broker is
    shutting down, so it retries elsewhere at once.
    """
    broker = FakeBroker()
    async with serving(broker) as (_sink, session):
        broker.pool.close()
        status, headers, body = await get(session, "bytes=8")
    assert (503, "1") == (status, headers["Retry-After"])
    assert "shutting down" == json.loads(body)["error"]


async def test_a_failure_is_a_500_without_traceback() -> None:
    """
    A short read from the pool (a bug) is a logged 500 that tells the client
    nothing, and the client's budget gets the bytes back.
    """
    accounts = limited(client_rate="1 KiB/s", client_burst="64 B")
    broker = FakeBroker(accounts=accounts)
    fill(broker.pool, 64)
    read_nowait = broker.pool.read_nowait

    def short(count: int, key: object = None) -> bytes:
        return read_nowait(count - 1, key)

    broker.pool.read_nowait = short  # type: ignore[method-assign]
    async with serving(broker) as (_sink, session):
        with structlog.testing.capture_logs() as logs:
            status, _headers, body = await get(session, "bytes=32")
    assert 500 == status
    assert {"error": "internal server error"} == json.loads(body)
    failures = [entry for entry in logs if entry["event"] == "http_handler_failed"]
    assert 1 == len(failures)
    assert failures[0]["exc_info"] is True
    assert 0 == loopback_client(accounts).bytes_served


async def test_requests_are_logged_at_debug_without_entropy() -> None:
    """
    The request log names method, path and status, never the bytes served.
    """
    broker = FakeBroker()
    fill(broker.pool, 32)
    with structlog.testing.capture_logs() as logs:
        async with serving(broker) as (_sink, session):
            _status, _headers, body = await get(session, "bytes=32&format=hex")
    entries = [entry for entry in logs if entry["event"] == "http_request"]
    assert [("GET", "/v1/entropy", 200)] == [
        (entry["method"], entry["path"], entry["status"]) for entry in entries
    ]
    assert body.strip().decode() not in repr(logs)


async def test_503s_read_the_sources_rate_at_most_once_a_second() -> None:
    """
    Retry-After comes from the feeding sources' rate, which a flood of 503s
    reads once a second rather than on every answer.
    """
    clock = FakeClock()
    broker = CountingBroker(accounts=Accounts.unlimited(clock=clock))
    async with serving(broker) as (_sink, session):
        answers = [await get(session, "bytes=64") for _ in range(3)]
        await clock.advance(1.0)
        answers.append(await get(session, "bytes=64"))
    assert [503] * 4 == [status for status, _headers, _body in answers]
    assert all(int(headers["Retry-After"]) >= 1 for _s, headers, _b in answers)
    assert 2 == broker.status_reads


# ---- limits ---------------------------------------------------------------------


async def test_limits_refuse_at_once_and_keep_nothing_of_a_partial_grant() -> None:
    """
    With bytes ready and the burst spent, the answer is 429 with Retry-After
    and RateLimit headers, and the part the limits could grant is handed back.
    """
    accounts = limited(client_rate="1 KiB/s", client_burst="64 B")
    broker = FakeBroker(accounts=accounts)
    fill(broker.pool, 128)
    async with serving(broker) as (_sink, session):
        first = await get(session, "bytes=64")
        second = await get(session, "bytes=64")
    assert (200, "64", "0") == (
        first[0],
        first[1]["RateLimit-Limit"],
        first[1]["RateLimit-Remaining"],
    )
    assert 429 == second[0]
    assert int(second[1]["Retry-After"]) >= 1
    assert "RateLimit-Reset" in second[1]
    assert 64 == loopback_client(accounts).bytes_served == broker.pool.bytes_out


async def test_a_short_pool_without_wait_answers_the_limits_first() -> None:
    """
    With too few bytes ready, a request the limits refuse gets their 429; one
    they allow gets the 503, and its grant goes back to the budget.
    """
    accounts = limited(client_rate="1 KiB/s", client_burst="64 B")
    broker = FakeBroker(accounts=accounts)
    async with serving(broker) as (_sink, session):
        over_burst = await get(session, "bytes=128")
        unavailable = await get(session, "bytes=64")
        fill(broker.pool, 64)
        served = await get(session, "bytes=64")
    assert 429 == over_burst[0]
    assert "burst" in json.loads(over_burst[2])["error"]
    assert 503 == unavailable[0]
    assert int(unavailable[1]["Retry-After"]) >= 1
    # The 503's grant was refunded: the whole burst was still there.
    assert (200, 64) == (served[0], len(served[2]))
    assert 64 == loopback_client(accounts).bytes_served


async def test_limits_short_with_wait_are_waited_for() -> None:
    """
    With bytes ready but the burst spent, ``wait=`` paces the request through
    the limits rather than refusing it.
    """
    accounts = limited(client_rate="6400 B/s", client_burst="64 B")
    broker = FakeBroker(accounts=accounts)
    fill(broker.pool, 128)
    async with serving(broker) as (_sink, session):
        first = await get(session, "bytes=64")
        paced = await get(session, "bytes=64&wait=10")
    assert [(200, 64), (200, 64)] == [
        (first[0], len(first[2])),
        (paced[0], len(paced[2])),
    ]
    assert 128 == broker.pool.bytes_out


@pytest.mark.parametrize("wait", ["0", "5"])
async def test_limits_that_need_their_backend_give_the_same_answers(
    monkeypatch: pytest.MonkeyPatch, wait: str
) -> None:
    """
    When the limits cannot decide without I/O (a shared budget store), the
    request takes the waiting path and gets what the quick path would give:
    the bytes with their RateLimit headers, then a 429 (or, with wait, the
    bytes once the bucket refills).
    """
    accounts = limited(client_rate="6400 B/s", client_burst="64 B")
    asked: list[int] = []

    def undecided(client: Client, wanted: int, now: float) -> None:
        asked.append(wanted)

    monkeypatch.setattr(accounts, "try_grant", undecided)
    broker = FakeBroker(accounts=accounts)
    fill(broker.pool, 128)
    async with serving(broker) as (sink, session):
        first = await get(session, f"bytes=64&wait={wait}")
        second = await get(session, f"bytes=64&wait={wait}")
        in_flight = len(sink._state.in_flight)
    assert [64, 64] == asked
    assert (200, 64, "64") == (first[0], len(first[2]), first[1]["RateLimit-Limit"])
    assert (429 if wait == "0" else 200) == second[0]
    assert 0 == in_flight


# ---- deadlines and bodies -------------------------------------------------------


async def test_a_wait_past_the_request_deadline_is_503() -> None:
    """
    A request still waiting at ``request_timeout`` is answered 503 and
    counted; its place in the pool's queue is given up.
    """
    broker = FakeBroker()
    async with serving(broker, request_timeout=0.05) as (sink, session):
        status, headers, body = await get(session, "bytes=64&wait=20")
        stats = sink.status()
    assert (503, "1") == (status, headers["Retry-After"])
    assert "request took too long" == json.loads(body)["error"]
    assert 1 == stats.refused["request_timeout"]
    assert (0, 0) == (broker.pool.waiters, broker.pool.bytes_out)


async def test_an_oversized_body_is_refused_before_any_entropy() -> None:
    """
    A ``Content-Length`` over ``max_body_bytes`` is a 413, entropy path or not.
    """
    broker = FakeBroker()
    fill(broker.pool, 32)
    async with serving(broker) as (sink, _session):
        [address] = sink.bound_addresses()
        answer = await raw_exchange(
            address,
            b"GET /v1/entropy?bytes=32 HTTP/1.0\r\nContent-Length: 9000\r\n\r\n",
        )
    assert answer.startswith((b"HTTP/1.0 413", b"HTTP/1.1 413")), answer[:40]
    assert 0 == broker.pool.bytes_out
