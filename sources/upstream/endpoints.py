"""
Which endpoint an upstream source (``egd``, ``http``) uses, tries next, or
skips for now: the bookkeeping of its endpoint list, with no I/O.

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
- Failover inside a read (`failover.fail_over`): when the endpoint in use
  fails during a read (end of file, reset, a bad answer, a refusal), it backs
  off and the same read connects to the next endpoint that answers and goes
  on from there, so the supervisor sees a read that took a little longer,
  not a failed source. Each other endpoint that is not backing off is tried
  at most once per read, within ``connect_timeout``, and the whole failover
  ends within half the source's watchdog (`config.failover_budget`), so that
  the watchdog never fires first and the endpoint moved to has the other
  half to deliver. A read never waits for an endpoint backing off: that one
  failed moments ago, and a read waiting for it would be a gap in the supply
  that the supervisor cannot see (the source still counts as healthy, so no
  fallback fills in). When no endpoint answers, the read raises: whether
  every endpoint is down is the supervisor's call (its restart with backoff,
  the open waiting for the earliest endpoint, the tier below meanwhile).
- Failback: the source stays on the endpoint that works. With ``failback``
  set, once it has been on a less preferred one for that long, the driver
  tries the most preferred endpoint that is not backing off, between two
  reads (`Endpoints.failback_due`); if that connects the source moves back,
  otherwise that endpoint backs off and the source stays where it is.

Neither move runs a fresh start-up test. The start-up test is there to catch
a device that is broken when it starts; what an upstream sends is its own
conditioned output, which says nothing of a noise source's start-up, and
every byte from any endpoint still goes through the supervisor's continuous
health tests, which would quarantine an endpoint that sent stuck or repeated
bytes just as they would a device. A restart would buy no assurance and cost
a tier flap (a degraded broker, its fallback crediting the pool) on every
upstream hiccup while another endpoint of the same source is healthy.

Every move to another endpoint counts as a failover. Drivers never retry the
endpoint that just failed within a read: the supervisor's restart with
backoff, or a later failover or open, does.
"""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

BACKOFF_INITIAL = 0.5
"""Seconds an endpoint backs off after its first failure in a row (±50 %)."""

STABLE_SECONDS = 10.0
"""Seconds an endpoint must deliver in a row before its failures are forgiven."""


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

    def next_untried(self, tried: Sequence[T], now: float) -> tuple[T, float] | None:
        """
        Whom a failover inside a read tries next, and from when: the most
        preferred endpoint not in ``tried`` that is due by ``now``, else the
        one of them due earliest.

        Returns:
            The endpoint and when it is due (monotonic seconds), or None once
            every endpoint is in ``tried``.
        """
        rest = [s for s in self._states if s.endpoint not in tried]
        if not rest:
            return None
        ready = [s for s in rest if s.due <= now]
        state = ready[0] if ready else min(rest, key=lambda s: s.due)
        return state.endpoint, state.due

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


def blame(endpoint: object, reason: str) -> str:
    """
    ``reason``, prefixed with the endpoint unless it already starts with it.
    """
    where = str(endpoint)
    return reason if reason.startswith(where) else f"{where}: {reason}"
