"""
``GET /v1/history``: the broker's recent past as JSON, for graphs.

An operator endpoint: the tenant plane answers it only with the admin token,
as it does ``/metrics`` (the gate in `sinks.http.app`). Query parameters:

- ``resolution``: ``10s`` (default; 24 h of 10-s points) or ``1m`` (7 days of
  1-min points);
- ``last=SECONDS``: only the points of the last SECONDS (default: all the
  ring holds), or ``since=UNIX_TIME``: only the points strictly after it, for
  a page that polls for what is new. Not both.

A bad value is a 400 with a JSON reason. The shape of the answer is in
`broker.history_query`. The window is copied on the event loop and encoded in a
worker thread, so a day of points never holds up other requests.
"""

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from multidict import MultiMapping

from broker.history import Recorded
from broker.history_query import RESOLUTIONS, encode, take
from broker.status import BrokerView
from sinks.http.answer import RawAnswer
from sinks.http.state import echo, error_response

PATH: Final = "/v1/history"
_JSON: Final = "application/json; charset=utf-8"
_KNOWN: Final = frozenset({"resolution", "last", "since"})


class BadQuery(ValueError):
    """
    A query ``GET /v1/history`` cannot answer; the message says why.
    """


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """
    What a client asked for.
    """

    resolution: str = "10s"
    last: float | None = None
    since: float | None = None


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadQuery(
            f"{name} must be a number of seconds, not {echo(text)}"
        ) from None
    if not math.isfinite(value):
        raise BadQuery(f"{name} must be a finite number, not {echo(text)}")
    return value


def parse_query(query: MultiMapping[str]) -> HistoryQuery:
    """
    The query of a ``GET /v1/history``.

    Raises:
        BadQuery: an unknown parameter or resolution, a repeated parameter,
            a value that is not a number, a negative ``last``, or both
            ``last`` and ``since``.
    """
    unknown = sorted(set(query) - _KNOWN)
    if unknown:
        raise BadQuery(f"unknown parameter {echo(unknown[0])}")
    for name in _KNOWN:
        if len(query.getall(name, [])) > 1:
            raise BadQuery(f"{name} given more than once")
    resolution = query.get("resolution", "10s")
    if resolution not in RESOLUTIONS:
        raise BadQuery(
            f"resolution must be one of {', '.join(RESOLUTIONS)}, not "
            f"{echo(resolution)}"
        )
    if "last" in query and "since" in query:
        raise BadQuery("give last or since, not both")
    last = since = None
    if "last" in query:
        last = _seconds("last", query["last"])
        if last < 0:
            raise BadQuery("last must not be negative")
    if "since" in query:
        since = _seconds("since", query["since"])
    return HistoryQuery(resolution, last, since)


def history_handler(
    broker: BrokerView,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """
    The ``GET /v1/history`` handler for ``broker``.
    """

    async def history(request: web.Request) -> web.StreamResponse:
        # A broker that keeps no history (a bare view in a test) has nothing
        # to answer with; the status page treats that as "no graphs".
        if not isinstance(broker, Recorded):
            return error_response(404, "this broker keeps no history")
        try:
            query = parse_query(request.query)
        except BadQuery as exc:
            return error_response(400, str(exc))
        window = take(
            broker.history,
            time.time(),
            query.resolution,
            last=query.last,
            since=query.since,
        )
        body = await asyncio.to_thread(encode, window)
        return RawAnswer(body, _JSON)

    return history
