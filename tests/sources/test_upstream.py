"""
Endpoint selection for upstream sources: preference order, per-endpoint
backoff with jitter, waiting for the earliest, forgiveness after a stable run,
failback, and whom a failover inside a read tries, all on a time line the test
moves (`Endpoints` takes ``now``); then the async helpers, failover inside a
read among them.
"""

import asyncio
import time
from typing import Any

import pytest
import structlog

from broker.errors import SourceError
from sources.upstream.config import failover_budget
from sources.upstream.endpoints import BACKOFF_INITIAL, STABLE_SECONDS, Endpoints
from sources.upstream.failover import (
    ConnectFailed,
    UpstreamRefused,
    closed,
    fail_over,
    open_first,
    try_connect,
)
from tests.fakeclock import FakeClock

A, B, C = "a", "b", "c"


def make(
    *endpoints: str,
    backoff_max: float = 30.0,
    failback: float | None = None,
    jitter: float = 0.0,
) -> Endpoints[str]:
    return Endpoints(
        list(endpoints or (A, B, C)),
        backoff_max=backoff_max,
        failback=failback,
        rng=lambda: jitter,
    )


def test_all_candidates_in_order_of_preference_at_first() -> None:
    """
    Before any failure every endpoint may be tried, the preferred first.
    """
    assert [A, B, C] == make().candidates(0.0)


def test_needs_an_endpoint() -> None:
    """
    An empty list is refused (the config requires at least one anyway).
    """
    with pytest.raises(ValueError, match="at least one"):
        Endpoints([])


def test_a_failed_endpoint_is_skipped_until_its_backoff_ends() -> None:
    """
    After A fails, the next open tries B; A comes back once its delay is over.
    """
    endpoints = make()
    endpoints.connected(A, 0.0)
    delay = endpoints.failed(A, 0.0, "connection refused")
    assert BACKOFF_INITIAL / 2 == delay  # jitter 0: the fixed half
    assert [B, C] == endpoints.candidates(0.0)
    assert [B, C] == endpoints.candidates(delay - 0.001)
    assert [A, B, C] == endpoints.candidates(delay)
    assert endpoints.current is None


def test_backoff_doubles_per_failure_in_a_row_up_to_the_maximum() -> None:
    """
    The delay's ceiling doubles with each failure in a row and stops at
    ``endpoint_backoff``; with full jitter it reaches the ceiling.
    """
    endpoints = make(A, backoff_max=4.0, jitter=0.999999)
    delays = [round(endpoints.failed(A, 0.0, "refused"), 3) for _ in range(6)]
    assert [0.5, 1.0, 2.0, 4.0, 4.0, 4.0] == delays


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.999])
def test_jitter_spreads_half_the_delay(jitter: float) -> None:
    """
    Half of each delay is fixed and half random: never zero, never more than
    the ceiling, so brokers that lost the same upstream do not return in step.
    """
    endpoints = make(A, jitter=jitter)
    for _ in range(3):
        endpoints.failed(A, 0.0, "refused")
    delay = endpoints.failed(A, 0.0, "refused")
    ceiling = BACKOFF_INITIAL * 8
    assert ceiling / 2 + jitter * ceiling / 2 == pytest.approx(delay)
    assert ceiling / 2 <= delay < ceiling + 1e-9


def test_a_failure_never_loops_on_a_dead_endpoint_while_another_works() -> None:
    """
    A dead preferred endpoint is tried at most once per (growing) delay while
    the source runs on another one: tries over 60 s stay few.
    """
    endpoints = make(A, B)
    now, tries = 0.0, 0
    while now < 60.0:
        if A in endpoints.candidates(now):
            tries += 1
            endpoints.failed(A, now, "refused")
        endpoints.connected(B, now)
        now += 0.1
    assert tries <= 10


def test_when_all_back_off_the_earliest_is_due_first() -> None:
    """
    With every endpoint backing off there is no candidate, and `next_due` is
    when the first one may be tried again.
    """
    endpoints = make(A, B)
    endpoints.failed(A, 0.0, "refused")  # 0.25 s
    endpoints.failed(B, 0.0, "refused")
    endpoints.failed(B, 0.0, "refused")  # 0.5 s
    assert [] == endpoints.candidates(0.1)
    assert 0.25 == endpoints.next_due()
    assert [A] == endpoints.candidates(0.25)


def test_retry_after_keeps_an_endpoint_away_at_least_that_long() -> None:
    """
    An upstream that says when to come back (a spent quota) is skipped at
    least that long, even on its first failure.
    """
    endpoints = make(A, B)
    assert 600.0 == endpoints.failed(A, 0.0, "quota spent", at_least=600.0)
    assert [B] == endpoints.candidates(599.0)


def test_connected_counts_a_move_as_a_failover() -> None:
    """
    Connecting again to the same endpoint is no failover; moving to another
    is, and so is moving back.
    """
    endpoints = make()
    assert not endpoints.connected(A, 0.0)
    endpoints.failed(A, 1.0, "eof")
    assert endpoints.connected(B, 2.0)
    assert 1 == endpoints.failovers
    endpoints.disconnected()
    assert not endpoints.connected(B, 3.0)
    assert 1 == endpoints.failovers
    assert endpoints.connected(A, 4.0)
    assert 2 == endpoints.failovers
    assert A == endpoints.current == endpoints.previous


def test_failures_are_forgiven_after_a_stable_run_only() -> None:
    """
    An endpoint that accepts and dies at once keeps a growing delay; one that
    delivered for `STABLE_SECONDS` starts again from the shortest delay.
    """
    endpoints = make(A, jitter=0.999999)
    for _ in range(3):
        endpoints.failed(A, 0.0, "eof")
    endpoints.connected(A, 10.0)
    endpoints.delivered(10.0 + STABLE_SECONDS - 1)
    assert round(endpoints.failed(A, 20.0, "eof"), 3) == 4.0
    endpoints.connected(A, 30.0)
    endpoints.delivered(30.0 + STABLE_SECONDS)
    assert round(endpoints.failed(A, 50.0, "eof"), 3) == 0.5


def test_no_failback_by_default() -> None:
    """
    Without ``failback`` the source stays on the endpoint that works.
    """
    endpoints = make()
    endpoints.failed(A, 0.0, "refused")
    endpoints.connected(B, 0.0)
    assert endpoints.failback_due(1e6) is None


def test_failback_tries_the_best_endpoint_not_backing_off() -> None:
    """
    After ``failback`` seconds on B, A is proposed (when not backing off);
    whatever the attempt gives, the next proposal is a ``failback`` later.
    """
    endpoints = make(failback=60.0)
    endpoints.failed(A, 0.0, "refused")
    endpoints.connected(B, 0.0)
    assert endpoints.failback_due(59.0) is None
    assert A == endpoints.failback_due(60.0)
    assert endpoints.failback_due(61.0) is None
    endpoints.failed(A, 61.0, "still refused")
    assert B == endpoints.current
    assert A == endpoints.failback_due(120.0)
    assert endpoints.connected(A, 120.5)
    assert endpoints.failback_due(1e6) is None  # on the preferred: nothing better


def test_failback_skips_endpoints_backing_off_and_worse_ones() -> None:
    """
    On C, with A backing off, failback proposes B; on B it never proposes C.
    """
    endpoints = make(failback=10.0)
    endpoints.failed(A, 0.0, "refused", at_least=100.0)
    endpoints.connected(C, 0.0)
    assert B == endpoints.failback_due(10.0)
    endpoints.connected(B, 10.0)
    assert endpoints.failback_due(20.0) is None  # A still backs off, C is worse


def test_next_untried_prefers_the_best_due_then_the_earliest() -> None:
    """
    A failover inside a read tries the most preferred endpoint it has not
    tried that is due; when none is, the one due earliest (and when); None
    once every endpoint was tried.
    """
    endpoints = make(A, B, C)
    endpoints.failed(A, 0.0, "eof")  # due at 0.25
    endpoints.failed(B, 0.0, "refused", at_least=5.0)
    assert (C, 0.0) == endpoints.next_untried([A], 0.0)
    assert (A, 0.25) == endpoints.next_untried([C], 0.0)
    assert (A, 0.25) == endpoints.next_untried([C], 0.25)
    assert (B, 5.0) == endpoints.next_untried([A, C], 1.0)
    assert endpoints.next_untried([A, B, C], 1.0) is None


def test_the_failover_budget_is_half_the_watchdog() -> None:
    """
    A read may spend half its watchdog failing over (the supervisor's 30 s
    default when unset), so the watchdog never fires first and the endpoint
    moved to has the other half to deliver.
    """
    assert 5.0 == failover_budget(10.0)
    assert 15.0 == failover_budget(None)


def test_details_name_endpoints_and_errors_only() -> None:
    """
    The status shows the endpoint in use, each endpoint's failures and
    backoff left, the failovers and the last error.
    """
    endpoints = make(A, B)
    endpoints.connected(A, 0.0)
    endpoints.failed(A, 1.0, "connection refused")
    endpoints.connected(B, 1.0)
    details = endpoints.details(1.1)
    assert "b" == details["endpoint"]
    assert 1 == details["failovers"]
    assert "a: connection refused" == details["last_error"]
    assert {
        "endpoint": "a",
        "failures": 1,
        "backoff": 0.15,
        "last_error": "connection refused",
    } == details["endpoints"][0]


# ---- the async helpers -------------------------------------------------------


async def test_open_first_skips_failing_endpoints_and_logs_the_failover() -> None:
    """
    An open tries A (refused), then B (connects); moving from A, where the
    source was before, is a failover logged at warning with the reason.
    """
    endpoints = make(A, B)
    endpoints.connected(A, 0.0)
    endpoints.failed(A, 0.0, "eof", at_least=0.0)
    endpoints._states[0].due = 0.0  # A is due again, and still dead

    async def connect(endpoint: str) -> str:
        if endpoint == A:
            raise ConnectionRefusedError(111, "Connection refused")
        return f"connection to {endpoint}"

    with structlog.testing.capture_logs() as logs:
        endpoint, connection = await open_first(
            endpoints, connect, 1.0, structlog.get_logger()
        )
    assert (B, "connection to b") == (endpoint, connection)
    failover = [entry for entry in logs if entry["event"] == "upstream_failover"]
    assert 1 == len(failover)
    assert "warning" == failover[0]["log_level"]
    assert ("b", "a") == (failover[0]["endpoint"], failover[0]["previous"])
    assert "Connection refused" in failover[0]["reason"]


async def test_open_first_fails_with_every_reason() -> None:
    """
    When no endpoint answers, the error names each one and why; all back off.
    """
    endpoints = make(A, B)

    async def connect(endpoint: str) -> str:
        raise SourceError(f"{endpoint} said no")

    with pytest.raises(SourceError, match="a said no; b said no"):
        await open_first(endpoints, connect, 1.0, structlog.get_logger())
    assert [] == endpoints.candidates(0.0)


async def test_open_first_waits_for_the_earliest_endpoint() -> None:
    """
    With every endpoint backing off, an open waits until one is due.
    """
    endpoints = make(A)
    loop = asyncio.get_running_loop()
    endpoints.failed(A, time.monotonic(), "eof")  # 0.25 s
    started = loop.time()

    async def connect(endpoint: str) -> str:
        return endpoint

    assert (A, A) == await open_first(endpoints, connect, 1.0, structlog.get_logger())
    assert loop.time() - started >= 0.2


async def test_try_connect_bounds_the_connect_time() -> None:
    """
    A connect that hangs is abandoned after ``connect_timeout`` with a reason
    that says so.
    """
    forever = asyncio.Event()

    async def connect(endpoint: str) -> Any:
        await forever.wait()

    assert ConnectFailed(
        "no answer within 0.01 s (connect_timeout)"
    ) == await try_connect(A, connect, 0.01)


async def test_closed_blames_the_endpoint_for_errors_only() -> None:
    """
    An error ending the source fails the endpoint (a refusal's Retry-After
    included); a cancellation (shutdown) or a clean close does not.
    """
    log = structlog.get_logger()
    endpoints = make(A, B)
    endpoints.connected(A, 0.0)
    closed(endpoints, asyncio.CancelledError(), log)
    assert [A, B] == endpoints.candidates(time.monotonic())
    endpoints.connected(A, 0.0)
    closed(endpoints, UpstreamRefused("quota spent", retry_after=300.0), log)
    assert [B] == endpoints.candidates(time.monotonic() + 299.0)
    assert "a: quota spent" == endpoints.last_error


async def test_backoff_on_a_fake_time_line() -> None:
    """
    Driven by a fake clock: an endpoint failing every time it is tried is
    tried at 0, then after 0.5, 1, 2, 4 ... s (jitter 1: the full ceiling).
    """
    clock = FakeClock()
    endpoints = make(A, backoff_max=8.0, jitter=0.999999)
    tries: list[float] = []

    async def source() -> None:
        while True:
            now = clock.monotonic()
            if endpoints.candidates(now):
                tries.append(round(now, 2))
                endpoints.failed(A, now, "refused")
            await clock.sleep(max(0.01, endpoints.next_due() - now))

    task = asyncio.create_task(source())
    await clock.advance(40.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 23.5, 31.5, 39.5] == tries


# ---- failover inside a read ----------------------------------------------------


def refusing(*dead: str) -> Any:
    async def connect(endpoint: str) -> str:
        if endpoint in dead:
            raise ConnectionRefusedError(111, "Connection refused")
        return f"connection to {endpoint}"

    return connect


async def test_fail_over_moves_to_the_next_endpoint_and_backs_the_failed_off() -> None:
    """
    The endpoint in use failed inside a read: it backs off, the next one that
    answers is connected (C after B refuses), the move counts as a failover
    and is logged at warning with the reason.
    """
    endpoints = make(A, B, C)
    endpoints.connected(A, time.monotonic())
    with structlog.testing.capture_logs() as logs:
        endpoint, connection = await fail_over(
            endpoints,
            A,
            SourceError("a closed the connection"),
            refusing(B),
            1.0,
            time.monotonic() + 5.0,
            structlog.get_logger(),
        )
    assert (C, "connection to c") == (endpoint, connection)
    assert C == endpoints.current
    assert 1 == endpoints.failovers
    details = endpoints.details(time.monotonic())
    assert [1, 1, 0] == [entry["failures"] for entry in details["endpoints"]]
    assert 0 < details["endpoints"][0]["backoff"]
    assert "a closed the connection" == details["endpoints"][0]["last_error"]
    failover = [entry for entry in logs if entry["event"] == "upstream_failover"]
    assert 1 == len(failover)
    assert "warning" == failover[0]["log_level"]
    assert ("c", "a") == (failover[0]["endpoint"], failover[0]["previous"])
    failed = [entry for entry in logs if entry["event"] == "upstream_endpoint_failed"]
    assert ["a", "b"] == [entry["endpoint"] for entry in failed]
    assert "warning" == failed[0]["log_level"]


async def test_fail_over_raises_at_once_when_no_other_endpoint_answers() -> None:
    """
    Every other endpoint refuses: each is tried once, the error names every
    endpoint and why, every one backs off, and the source is on none (so
    closing it blames nobody twice).
    """
    endpoints = make(A, B, C)
    endpoints.connected(A, time.monotonic())
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SourceError) as caught:
        await fail_over(
            endpoints,
            A,
            SourceError("a: read failed: Connection reset by peer"),
            refusing(A, B, C),
            1.0,
            time.monotonic() + 5.0,
            structlog.get_logger(),
        )
    assert loop.time() - started < 1.0
    assert (
        "a: read failed: Connection reset by peer; no other endpoint answered: "
        "b: Connection refused; c: Connection refused"
    ) == str(caught.value)
    assert [] == endpoints.candidates(time.monotonic())
    assert endpoints.current is None
    closed(endpoints, caught.value, structlog.get_logger())
    assert [1, 1, 1] == [
        entry["failures"] for entry in endpoints.details(0.0)["endpoints"]
    ]


async def test_fail_over_keeps_a_refusal_away_for_its_retry_after() -> None:
    """
    An endpoint that refused with Retry-After (a spent quota) backs off at
    least that long, as it does when an open fails.
    """
    endpoints = make(A, B)
    endpoints.connected(A, time.monotonic())
    await fail_over(
        endpoints,
        A,
        UpstreamRefused("a denied access (403)", retry_after=300.0),
        refusing(),
        1.0,
        time.monotonic() + 5.0,
        structlog.get_logger(),
    )
    assert [B] == endpoints.candidates(time.monotonic() + 299.0)


async def test_fail_over_does_not_wait_for_an_endpoint_backing_off() -> None:
    """
    An endpoint backing off, even for a moment, is not waited for inside a
    read: the read fails at once, saying so, and the supervisor decides what
    an upstream with every endpoint down means.
    """
    loop = asyncio.get_running_loop()
    endpoints = make(A, B)
    endpoints.connected(A, time.monotonic())
    endpoints.failed(B, time.monotonic(), "eof")  # 0.25 s
    started = loop.time()
    with pytest.raises(SourceError, match=r"b: backing off 0\.2\d* s more"):
        await fail_over(
            endpoints,
            A,
            SourceError("eof"),
            refusing(),
            1.0,
            time.monotonic() + 5.0,
            structlog.get_logger(),
        )
    assert loop.time() - started < 0.2


async def test_fail_over_never_runs_past_its_deadline() -> None:
    """
    Endpoints that accept and never answer are abandoned at the deadline,
    whatever ``connect_timeout`` allows each, and the reason says so.
    """
    loop = asyncio.get_running_loop()
    endpoints = make(A, B, C)
    endpoints.connected(A, time.monotonic())

    async def hang(endpoint: str) -> str:
        await asyncio.Event().wait()
        return endpoint

    started = loop.time()
    with pytest.raises(SourceError) as caught:
        await fail_over(
            endpoints,
            A,
            SourceError("eof"),
            hang,
            10.0,
            time.monotonic() + 0.2,
            structlog.get_logger(),
        )
    assert loop.time() - started < 0.5
    assert "(the read's failover budget)" in str(caught.value)
    assert "c: not tried, the read's failover budget ran out" in str(caught.value)


async def test_a_cancelled_fail_over_leaves_nothing_connected() -> None:
    """
    Cancelled while it connects (the watchdog, a shutdown), a failover leaves
    the source on no endpoint, and the one that failed backed off: closing
    the source then has nothing to undo.
    """
    endpoints = make(A, B)
    endpoints.connected(A, time.monotonic())
    started = asyncio.Event()

    async def hang(endpoint: str) -> str:
        started.set()
        await asyncio.Event().wait()
        return endpoint

    task = asyncio.create_task(
        fail_over(
            endpoints,
            A,
            SourceError("eof"),
            hang,
            10.0,
            time.monotonic() + 10.0,
            structlog.get_logger(),
        )
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert endpoints.current is None
    closed(endpoints, asyncio.CancelledError(), structlog.get_logger())
    assert [1, 0] == [
        entry["failures"] for entry in endpoints.details(0.0)["endpoints"]
    ]
