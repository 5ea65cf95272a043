"""
What the upstream sources (``egd`` and ``http``) share: the keys for their
endpoint lists, and which endpoint an open tries next.

Theory of operation
-------------------
An upstream source has endpoints in order of preference and is connected to
at most one of them. `Endpoints` is the bookkeeping, with no I/O and no clock
of its own: every call that starts or checks a delay takes ``now``.

- An open tries the endpoints that are not backing off, in order of
  preference (`Endpoints.candidates`), each with a bounded connect time, and
  stays on the first that answers (`Endpoints.connected`). When every endpoint
  is backing off, it waits until the earliest is due (`Endpoints.next_due`).
- An endpoint that fails (refused, timed out, closed, answered badly, stalled)
  backs off (`Endpoints.failed`): 0.5 s doubled for each failure in a row, up
  to ``endpoint_backoff``, half of it random, so a dead endpoint is not
  hammered while another works, and brokers that lost the same upstream do
  not come back to it in step. An answer that says when to come back (an HTTP
  ``Retry-After`` on a spent quota) backs off at least that long.
- An endpoint's failures are forgiven once it has delivered for
  `STABLE_SECONDS` in a row (`Endpoints.delivered`): one that accepts and
  then dies at once keeps a growing delay instead of winning every open.
- Failback: the source stays on the endpoint that works. With ``failback``
  set, once it has been on a less preferred one for that long, the driver
  tries the most preferred endpoint that is not backing off, between two
  reads (`Endpoints.failback_due`); if that connects the source moves back,
  otherwise that endpoint backs off and the source stays where it is. Moving
  endpoints this way never interrupts the supply; moving after a failure does
  (the supervisor restarts the source, and its start-up test runs again).

Every move to another endpoint counts as a failover. Drivers never retry the
same endpoint within an open: the supervisor's restart with backoff does.
"""

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import Field

from broker.configbase import Duration, SourceConfigBase
from broker.errors import SourceError

T = TypeVar("T")

BACKOFF_INITIAL = 0.5
"""Seconds an endpoint backs off after its first failure in a row (±50 %)."""

STABLE_SECONDS = 10.0
"""Seconds an endpoint must deliver in a row before its failures are forgiven."""


class UpstreamConfigBase(SourceConfigBase):
    """
    Keys every upstream source has (``egd`` and ``http``).
    """

    connect_timeout: Duration = Field(
        default=5.0,
        gt=0,
        le=300,
        description="seconds an endpoint may take to connect and answer the first "
        "request of an open before the next endpoint is tried",
    )
    endpoint_backoff: Duration = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="longest an endpoint that failed is skipped (its delay starts "
        "at 0.5 s and doubles with each failure in a row, half of it random)",
    )
    failback: Duration | None = Field(
        default=60.0,
        gt=0,
        description="after this long on a less preferred endpoint, try the "
        "preferred ones again between reads, without interrupting the supply; "
        "unset: stay on the endpoint that works until it fails",
    )


@dataclass
class EndpointState(Generic[T]):
    """
    What is known of one endpoint.
    """

    endpoint: T
    index: int
    failures: int = 0
    due: float = 0.0
    """Monotonic time before which the endpoint is not tried."""
    last_error: str | None = None


class Endpoints(Generic[T]):
    """
    Endpoint selection with per-endpoint backoff and failback, I/O-free.

    Args:
        endpoints: in order of preference (at least one).
        backoff_max: longest backoff of a failed endpoint, in seconds.
        failback: seconds on a less preferred endpoint before the preferred
            ones are tried again (None: never).
        rng: jitter, a float in [0, 1).
    """

    def __init__(
        self,
        endpoints: Sequence[T],
        *,
        backoff_max: float = 30.0,
        failback: float | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not endpoints:
            raise ValueError("an upstream source needs at least one endpoint")
        self._states = [EndpointState(e, i) for i, e in enumerate(endpoints)]
        self._backoff_max = backoff_max
        self._failback = failback
        self._rng = rng
        self._current: EndpointState[T] | None = None
        self._previous: EndpointState[T] | None = None
        self._since = 0.0
        self._failback_at: float | None = None
        self.failovers = 0
        self.last_error: str | None = None

    @property
    def current(self) -> T | None:
        """
        The endpoint the source is connected to, if any.
        """
        return None if self._current is None else self._current.endpoint

    @property
    def previous(self) -> T | None:
        """
        The endpoint the source was last connected to (now or before).
        """
        return None if self._previous is None else self._previous.endpoint

    def _state(self, endpoint: T) -> EndpointState[T]:
        for state in self._states:
            if state.endpoint == endpoint:
                return state
        raise KeyError(f"unknown endpoint {endpoint!r}")

    def candidates(self, now: float) -> list[T]:
        """
        Endpoints an open may try now, in order of preference: those not
        backing off. Empty when all are; then wait until `next_due`.
        """
        return [s.endpoint for s in self._states if s.due <= now]

    def next_due(self) -> float:
        """
        When the earliest endpoint stops backing off (monotonic seconds).
        """
        return min(s.due for s in self._states)

    def connected(self, endpoint: T, now: float) -> bool:
        """
        The source is now connected to ``endpoint``.

        Returns:
            Whether this is a move away from the endpoint used before (a
            failover, counted).
        """
        state = self._state(endpoint)
        moved = self._previous is not None and self._previous is not state
        if moved:
            self.failovers += 1
        self._current = self._previous = state
        self._since = now
        self._failback_at = None
        if self._failback is not None and state.index > 0:
            self._failback_at = now + self._failback
        return moved

    def delivered(self, now: float) -> None:
        """
        The current endpoint answered a request in full.
        """
        state = self._current
        if state is not None and state.failures and now - self._since >= STABLE_SECONDS:
            state.failures = 0
            state.last_error = None

    def disconnected(self) -> None:
        """
        The source closed its connection without blaming the endpoint (the
        broker stops, or the source is restarted for a reason of its own).
        """
        self._current = None

    def failed(
        self, endpoint: T, now: float, reason: str, *, at_least: float = 0.0
    ) -> float:
        """
        ``endpoint`` failed: back it off; the source is no longer on it.

        Args:
            endpoint: the endpoint that failed.
            now: monotonic time.
            reason: why, for status and logs (never a secret).
            at_least: seconds the endpoint asked us to stay away.

        Returns:
            Seconds the endpoint now backs off.
        """
        state = self._state(endpoint)
        ceiling = min(
            self._backoff_max, BACKOFF_INITIAL * 2.0 ** min(state.failures, 32)
        )
        state.failures += 1
        delay = max(at_least, ceiling / 2 + float(self._rng()) * ceiling / 2)
        state.due = now + delay
        state.last_error = reason
        self.last_error = blame(endpoint, reason)
        if self._current is state:
            self._current = None
        return delay

    def failback_due(self, now: float) -> T | None:
        """
        A more preferred endpoint to try now, between two reads, or None.

        Once it is returned, the next one is due a ``failback`` later, whatever
        the attempt gives: report it with `connected` or `failed`.
        """
        current = self._current
        failback = self._failback
        if current is None or failback is None or self._failback_at is None:
            return None
        if now < self._failback_at:
            return None
        self._failback_at = now + failback
        for state in self._states[: current.index]:
            if state.due <= now:
                return state.endpoint
        return None

    def details(self, now: float) -> dict[str, Any]:
        """
        Facts for the status page: endpoints, the one in use, failovers and
        the last error (no secrets: endpoints and reasons only).
        """
        return {
            "endpoint": None if self._current is None else str(self._current.endpoint),
            "endpoints": [
                {
                    "endpoint": str(s.endpoint),
                    "failures": s.failures,
                    "backoff": round(max(0.0, s.due - now), 3),
                    "last_error": s.last_error,
                }
                for s in self._states
            ],
            "failovers": self.failovers,
            "last_error": self.last_error,
        }


C = TypeVar("C")


def blame(endpoint: object, reason: str) -> str:
    """
    ``reason``, prefixed with the endpoint unless it already starts with it.
    """
    where = str(endpoint)
    return reason if reason.startswith(where) else f"{where}: {reason}"


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """
    Why an endpoint could not be connected to.
    """

    reason: str
    retry_after: float = 0.0
    """Seconds the endpoint asked us to stay away."""


async def try_connect(
    endpoint: T, connect: Callable[[T], Awaitable[C]], timeout: float
) -> C | ConnectFailed:
    """
    Connect to ``endpoint`` within ``timeout`` seconds.

    ``connect`` must leave nothing open when it raises or is cancelled.

    Returns:
        What ``connect`` returned, or why it failed.
    """
    try:
        async with asyncio.timeout(timeout):
            return await connect(endpoint)
    except TimeoutError:
        # Before OSError: TimeoutError is one, but "timed out" says more here.
        return ConnectFailed(f"no answer within {timeout:g} s (connect_timeout)")
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
                log.warning(
                    "upstream_failover",
                    endpoint=str(endpoint),
                    previous=str(previous),
                    reason=endpoints.last_error,
                    failovers=endpoints.failovers,
                )
            else:
                log.info("upstream_connected", endpoint=str(endpoint))
            return endpoint, result
        delay = endpoints.failed(
            endpoint, time.monotonic(), result.reason, at_least=result.retry_after
        )
        log.info(
            "upstream_endpoint_failed",
            endpoint=str(endpoint),
            reason=result.reason,
            retry_in=round(delay, 3),
        )
        reasons.append(blame(endpoint, result.reason))
    raise SourceError("no upstream endpoint answered: " + "; ".join(reasons))


def closed(endpoints: Endpoints[Any], exc: BaseException | None, log: Any) -> None:
    """
    Record how a source left its endpoint: a failure of the endpoint when an
    error ended the source (a driver error, a stall, a health failure), no
    blame when it was stopped (cancelled) or closed cleanly.
    """
    current = endpoints.current
    if current is None:
        return
    if not isinstance(exc, Exception):
        endpoints.disconnected()
        return
    at_least = exc.retry_after if isinstance(exc, UpstreamRefused) else 0.0
    reason = str(exc) or type(exc).__name__
    delay = endpoints.failed(current, time.monotonic(), reason, at_least=at_least)
    log.warning(
        "upstream_endpoint_failed",
        endpoint=str(current),
        reason=reason,
        retry_in=round(delay, 3),
    )


class UpstreamRefused(SourceError):
    """
    The upstream answered, and refused: a bad token, a spent quota, a request
    it cannot serve. ``retry_after`` is how long it asked us to stay away.
    """

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
