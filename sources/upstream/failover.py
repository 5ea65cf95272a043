"""
Moves between the endpoints of an upstream source: the open that connects to
the first endpoint that answers (`open_first`), the failover inside a read
(`fail_over`), the failback between two reads (`fail_back`), and what a close
says of the endpoint it leaves (`closed`). Which endpoint is tried when is
`sources.upstream.endpoints`; this module does the connecting, the clock and
the logging around it.

A ``connect`` callable opens one endpoint and checks that it answers; it must
leave nothing open when it raises or is cancelled. Its failures are reasons,
never secrets: endpoints and what they answered.
"""

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from broker.errors import SourceError
from sources.upstream.endpoints import Endpoints, blame

T = TypeVar("T")
C = TypeVar("C")


class UpstreamRefused(SourceError):
    """
    The upstream answered, and refused: a bad token, a spent quota, a request
    it cannot serve. ``retry_after`` is how long it asked us to stay away.
    """

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """
    Why an endpoint could not be connected to.
    """

    reason: str
    retry_after: float = 0.0
    """Seconds the endpoint asked us to stay away."""


async def try_connect(
    endpoint: T,
    connect: Callable[[T], Awaitable[C]],
    timeout: float,
    *,
    limit: str = "connect_timeout",
) -> C | ConnectFailed:
    """
    Connect to ``endpoint`` within ``timeout`` seconds.

    ``connect`` must leave nothing open when it raises or is cancelled.

    Args:
        endpoint: where to connect.
        connect: opens a connection to an endpoint and checks that it answers.
        timeout: seconds the attempt may take.
        limit: what set ``timeout``, for the reason when it runs out.

    Returns:
        What ``connect`` returned, or why it failed.
    """
    try:
        async with asyncio.timeout(timeout):
            return await connect(endpoint)
    except TimeoutError:
        # Before OSError: TimeoutError is one, but "timed out" says more here.
        return ConnectFailed(f"no answer within {timeout:g} s ({limit})")
    except UpstreamRefused as exc:
        return ConnectFailed(str(exc), exc.retry_after)
    except SourceError as exc:
        return ConnectFailed(str(exc))
    except OSError as exc:
        return ConnectFailed(os_reason(exc))


def os_reason(exc: OSError) -> str:
    """
    The plain reason of an ``OSError`` ("Connection refused"), without the
    errno number or the address that asyncio adds.
    """
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


async def open_first(
    endpoints: Endpoints[T],
    connect: Callable[[T], Awaitable[C]],
    timeout: float,
    log: Any,
) -> tuple[T, C]:
    """
    Connect to the first endpoint that answers, in order of preference,
    skipping those backing off; when all are, wait for the earliest.

    Returns:
        The endpoint and what ``connect`` returned for it.

    Raises:
        SourceError: every endpoint tried failed (each now backs off).
    """
    while not (candidates := endpoints.candidates(time.monotonic())):
        wait = endpoints.next_due() - time.monotonic()
        log.info("upstream_waiting", seconds=round(wait, 3))
        await asyncio.sleep(wait)
    reasons = []
    for endpoint in candidates:
        result = await try_connect(endpoint, connect, timeout)
        if not isinstance(result, ConnectFailed):
            previous = endpoints.previous
            if endpoints.connected(endpoint, time.monotonic()):
                _moved(log, endpoints, endpoint, previous, endpoints.last_error)
            else:
                log.info("upstream_connected", endpoint=str(endpoint))
            return endpoint, result
        reasons.append(_connect_failed(endpoints, endpoint, result, log))
    raise SourceError("no upstream endpoint answered: " + "; ".join(reasons))


async def fail_over(
    endpoints: Endpoints[T],
    failed: T,
    error: Exception,
    connect: Callable[[T], Awaitable[C]],
    timeout: float,
    deadline: float,
    log: Any,
) -> tuple[T, C]:
    """
    Inside a read, the endpoint in use failed: back it off and connect to the
    next endpoint that answers, so that the read goes on from there.

    Each other endpoint is tried at most once, in order of preference, within
    ``timeout``; one backing off is not waited for, and nothing runs past
    ``deadline``.

    Args:
        endpoints: the source's bookkeeping; ``failed`` is its current one.
        failed: the endpoint that failed.
        error: how it failed (an `UpstreamRefused` keeps it away at least
            its ``retry_after``).
        connect: as for `open_first`; it must leave nothing open when it
            raises or is cancelled.
        timeout: seconds one attempt may take (``connect_timeout``).
        deadline: monotonic time by which the failover gives up.
        log: the source's logger.

    Returns:
        The endpoint moved to and what ``connect`` returned for it.

    Raises:
        SourceError: no other endpoint answered by ``deadline``; the message
            says why ``failed`` was left, then why each other one was not
            used.
    """
    _blame(endpoints, failed, error, log)
    tried = [failed]
    reasons: list[str] = []
    while (pick := endpoints.next_untried(tried, time.monotonic())) is not None:
        endpoint, due = pick
        now = time.monotonic()
        tried.append(endpoint)
        if due > now:
            reasons.append(f"{endpoint}: backing off {due - now:.3g} s more")
            continue
        left = deadline - now
        if left <= 0:
            reasons.append(f"{endpoint}: not tried, the read's failover budget ran out")
            continue
        if left < timeout:
            result = await try_connect(
                endpoint, connect, left, limit="the read's failover budget"
            )
        else:
            result = await try_connect(endpoint, connect, timeout)
        if not isinstance(result, ConnectFailed):
            endpoints.connected(endpoint, time.monotonic())
            _moved(log, endpoints, endpoint, failed, endpoints.last_error)
            return endpoint, result
        reasons.append(_connect_failed(endpoints, endpoint, result, log))
    message = blame(failed, _reason(error))
    if reasons:
        message += "; no other endpoint answered: " + "; ".join(reasons)
    raise SourceError(message) from error


async def fail_back(
    endpoints: Endpoints[T],
    connect: Callable[[T], Awaitable[C]],
    timeout: float,
    log: Any,
) -> tuple[T, C] | None:
    """
    Between two reads, once ``failback`` is due, connect to the most
    preferred endpoint not backing off; if it does not answer, it backs off
    and the source stays where it is.

    Returns:
        The endpoint moved back to (now the current one) and what ``connect``
        returned for it, or None when the source stays put: the caller then
        keeps its connection, else drops it for the new one.
    """
    preferred = endpoints.failback_due(time.monotonic())
    if preferred is None:
        return None
    result = await try_connect(preferred, connect, timeout)
    if isinstance(result, ConnectFailed):
        _connect_failed(
            endpoints, preferred, result, log, event="upstream_failback_failed"
        )
        return None
    previous = endpoints.current
    endpoints.connected(preferred, time.monotonic())
    _moved(log, endpoints, preferred, previous, "failback to a preferred endpoint")
    return preferred, result


def closed(endpoints: Endpoints[Any], exc: BaseException | None, log: Any) -> None:
    """
    Record how a source left its endpoint: a failure of the endpoint when an
    error ended the source (a driver error, a stall, a health failure), no
    blame when it was stopped (cancelled) or closed cleanly. An endpoint that
    a read already failed over from is not blamed twice.
    """
    current = endpoints.current
    if current is None:
        return
    if not isinstance(exc, Exception):
        endpoints.disconnected()
        return
    _blame(endpoints, current, exc, log)


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _blame(endpoints: Endpoints[T], endpoint: T, exc: Exception, log: Any) -> None:
    """
    ``endpoint`` failed with ``exc``: back it off, and say so at warning.
    """
    at_least = exc.retry_after if isinstance(exc, UpstreamRefused) else 0.0
    reason = _reason(exc)
    delay = endpoints.failed(endpoint, time.monotonic(), reason, at_least=at_least)
    log.warning(
        "upstream_endpoint_failed",
        endpoint=str(endpoint),
        reason=reason,
        retry_in=round(delay, 3),
    )


def _connect_failed(
    endpoints: Endpoints[T],
    endpoint: T,
    failure: ConnectFailed,
    log: Any,
    *,
    event: str = "upstream_endpoint_failed",
) -> str:
    """
    Connecting to ``endpoint`` failed: back it off, and say so at info.

    Returns:
        The reason, blaming the endpoint.
    """
    delay = endpoints.failed(
        endpoint, time.monotonic(), failure.reason, at_least=failure.retry_after
    )
    log.info(
        event,
        endpoint=str(endpoint),
        reason=failure.reason,
        retry_in=round(delay, 3),
    )
    return blame(endpoint, failure.reason)


def _moved(
    log: Any, endpoints: Endpoints[T], endpoint: T, previous: T | None, reason: object
) -> None:
    log.warning(
        "upstream_failover",
        endpoint=str(endpoint),
        previous=str(previous),
        reason=reason,
        failovers=endpoints.failovers,
    )
