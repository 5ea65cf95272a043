"""
What the API's handlers share: the sink's mutable state, the application keys
they find the broker, config and state under, and the JSON error shape.

Kept apart from `sinks.http.app` so the handler modules can import it while the
application imports them.
"""

import asyncio
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.web_request import BaseRequest
from prometheus_client import CollectorRegistry

from broker.status import BrokerView
from sinks.http.answer import RawAnswer, json_answer
from sinks.http.config import HttpSinkConfig

# Echoed parameter values are cut to this length so a client cannot make us
# reflect (or log) a huge string.
_ECHO_MAX: Final = 32


@dataclass(slots=True, eq=False)
class HttpSinkState:
    """
    Mutable state shared by the application and the sink that serves it.
    """

    shutting_down: bool = False
    """Set by ``pre_shutdown``: health and readiness answer 503 from then on."""
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once shutdown starts: blocked ``?wait=`` requests answer 503 at once."""
    requests: int = 0
    bytes_out: int = 0
    connections_total: int = 0
    """Connections that sent at least one request."""
    in_flight: set["asyncio.Task[Any]"] = field(default_factory=set)
    """Requests being handled. One answered without ever yielding to the loop
    is only counted: no other code can run while it is handled."""
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever no request is being handled."""
    _seen: "weakref.WeakSet[asyncio.BaseTransport]" = field(
        default_factory=weakref.WeakSet
    )

    def __post_init__(self) -> None:
        self.idle.set()

    def request_started(
        self, task: "asyncio.Task[Any]", transport: asyncio.BaseTransport | None
    ) -> None:
        self.count_request(transport)
        self.in_flight_started(task)

    def count_request(self, transport: asyncio.BaseTransport | None) -> None:
        """
        Count a request, and its connection if this is the connection's first.
        """
        self.requests += 1
        # A weak set: connections are counted once and forgotten when they close.
        if transport is not None and transport not in self._seen:
            self._seen.add(transport)
            self.connections_total += 1

    def in_flight_started(self, task: "asyncio.Task[Any]") -> None:
        """
        A request starts to wait: shutdown waits for it, or cancels it.
        """
        self.in_flight.add(task)
        self.idle.clear()

    def request_finished(self, task: "asyncio.Task[Any]") -> None:
        self.in_flight.discard(task)
        if not self.in_flight:
            self.idle.set()


BROKER_KEY: web.AppKey[BrokerView] = web.AppKey("ebroker_broker")
CONFIG_KEY: Final = web.AppKey("ebroker_http_config", HttpSinkConfig)
STATE_KEY: Final = web.AppKey("ebroker_http_state", HttpSinkState)
REGISTRY_KEY: Final = web.AppKey("ebroker_metrics_registry", CollectorRegistry)


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> RawAnswer:
    """
    The JSON error body every refusal of the API shares: ``{"error": message}``.
    """
    return json_answer({"error": message}, status, headers)


class MalformedToken(ValueError):
    """
    The request carries a bearer token that no configured token can equal.
    """


def bearer_token(request: BaseRequest) -> str | None:
    """
    The token of an ``Authorization: Bearer <token>`` header, if there is one.

    Raises:
        MalformedToken: the token is not printable text.
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    token = token.strip()
    # aiohttp hands over header bytes that are not UTF-8 as lone surrogates,
    # which no token contains and no hash can encode.
    if not token.isprintable():
        raise MalformedToken("bearer token is not printable text")
    return token


def echo(value: str) -> str:
    """
    ``value`` quoted for an error message, cut short if a client sent a lot.
    """
    return repr(value if len(value) <= _ECHO_MAX else value[:_ECHO_MAX] + "...")
