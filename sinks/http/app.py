"""
The HTTP API as an aiohttp application: entropy, health, readiness, status,
metrics and a small status page.

The application only reads the broker through its `BrokerView` and keeps its own
counters and shutdown flags in an `HttpSinkState` that the owning `HttpSink`
shares; `create_app` works without a sink too, which is how tests drive it.

A sink serves one of two planes. The operator plane serves every endpoint. The
tenant plane is what guests reach: it serves ``/v1/entropy``, ``/healthz``,
``/readyz``, ``OPTIONS /`` and a ``/v1/status`` cut down to the asking
customer's own figures; every other path, operator endpoints included, answers
the same 404 as a path that does not exist unless the request carries the
admin token, so a tenant cannot even learn which operator endpoints exist.

This module wires the routes and holds the middlewares every request passes
through; the handlers live in `sinks.http.entropy` (the entropy endpoint),
`sinks.http.probes` (health, readiness, status, metrics), `sinks.http.admin`
and `sinks.http.page`.

With ``pollen = true`` the sink also answers pollinate at ``pollen_path``
(`PollenEndpoint`, protocol in `sinks.http.pollen`): a POST there, or a GET
with a ``challenge`` in its query, on both planes and under the same customers
and limits as ``/v1/entropy``. On ``/`` the two share the path: a GET without
``challenge`` is still the status page (operator plane, or the admin token).

``GET /v1/entropy`` is the one endpoint guests call at a high rate, so a sink
answers it before aiohttp's router and middlewares (`DirectEntropy`), doing
for it what they do (count, log, forbid caching, turn a failure into a 500)
and no more: the router would pick the same handler, and the tenant gate lets
that path through on both planes.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeAlias

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_request import BaseRequest

from broker.accounts import Accounts
from broker.errors import ConfigError
from broker.metrics import create_registry
from broker.status import BrokerView
from sinks.http import pollen
from sinks.http.admin import has_admin_token, reload_handler, simulator_handler
from sinks.http.answer import RawAnswer
from sinks.http.config import HttpSinkConfig, path_taken
from sinks.http.entropy import PATH, EntropyEndpoint, EntropyQuery, Pending
from sinks.http.history import PATH as HISTORY_PATH
from sinks.http.history import history_handler
from sinks.http.limits import identify
from sinks.http.page import index
from sinks.http.probes import healthz, metrics, readyz, status
from sinks.http.state import (
    BROKER_KEY,
    CONFIG_KEY,
    REGISTRY_KEY,
    STATE_KEY,
    HttpSinkState,
    echo,
    error_response,
)

log = structlog.get_logger("ebroker.sinks.http")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENTROPY_KEY: Final = web.AppKey("ebroker_http_entropy", EntropyEndpoint)

TENANT_PATHS: Final = frozenset({"/v1/entropy", "/healthz", "/readyz", "/v1/status"})
"""Paths the tenant plane serves to anyone (``/v1/status`` filters itself)."""

POLLEN_WAIT: Final = 3.0
"""
Longest a pollen request waits for its limits and the pool, in seconds (never
more than the sink's ``max_wait``): well inside pollinate's ``--max-time``
(``-w``, 10 s by default, 5 s is common), so a client that must wait its turn
gets the answer, and one that cannot be served gets a refusal in time.
"""


@web.middleware
async def observe_middleware(
    request: web.Request, handler: _Handler
) -> web.StreamResponse:
    """
    Count and log every request, and forbid caching of every response: all of
    them are live figures or fresh entropy.
    """
    state = request.app[STATE_KEY]
    # aiohttp runs every request in a task of its own.
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("request handled outside a task")
    state.request_started(task, request.transport)
    started = time.monotonic()
    status_code = 500
    try:
        response = await handler(request)
        status_code = response.status
        response.headers.setdefault("Cache-Control", "no-store")
        return response
    finally:
        state.request_finished(task)
        _log_request(log, request, status_code, started)


def _log_request(
    logger: structlog.typing.FilteringBoundLogger,
    request: BaseRequest,
    status: int,
    started: float,
) -> None:
    # Paths and status only: never the body, which may be entropy.
    logger.debug(
        "http_request",
        method=request.method,
        path=request.path,
        status=status,
        peer=request.remote,
        ms=round((time.monotonic() - started) * 1000, 3),
    )


def _failed(request: BaseRequest) -> web.StreamResponse:
    # Logged with the traceback for operators; the client only learns that
    # something failed, never how.
    log.error(
        "http_handler_failed",
        method=request.method,
        path=request.path,
        exc_info=True,
    )
    return error_response(500, "internal server error")


@web.middleware
async def error_middleware(
    request: web.Request, handler: _Handler
) -> web.StreamResponse:
    """
    Turn aiohttp's HTTP errors (404, 405, ...) into JSON bodies and any other
    exception into a 500 without a traceback.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPNotFound):
            return error_response(404, f"no such path: {echo(request.path)}")
        if isinstance(exc, web.HTTPMethodNotAllowed):
            message = (
                f"method {echo(request.method)} not allowed on {echo(request.path)}"
            )
            return error_response(405, message, {"Allow": exc.headers.get("Allow", "")})
        return error_response(exc.status, exc.reason.lower())
    except Exception:  # noqa: BLE001 - _failed logs it with its traceback
        return _failed(request)


def tenant_plane_middleware(
    admin_token_hash: str | None, pollen_path: str | None = None
) -> Middleware:
    """
    The gate of a tenant-plane sink: `TENANT_PATHS`, ``OPTIONS /`` and, when
    ``pollen_path`` is set, pollen requests (`asks_pollen`) pass; anything
    else needs the admin token and is otherwise a plain 404.
    """

    @web.middleware
    async def tenant_plane(
        request: web.Request, handler: _Handler
    ) -> web.StreamResponse:
        # An allow-list of exact paths fails closed: a path spelled in a way the
        # list does not know is refused even if the router would match it.
        public = (
            request.path in TENANT_PATHS
            or (request.path == "/" and request.method == "OPTIONS")
            or (pollen_path is not None and asks_pollen(request, pollen_path))
        )
        if public or has_admin_token(request, admin_token_hash):
            return await handler(request)
        # 404 rather than 401: a 401 would confirm the endpoint exists, and a
        # wrong method would otherwise get a 405 naming the allowed ones.
        raise web.HTTPNotFound()

    return tenant_plane


def create_app(
    config: HttpSinkConfig, broker: BrokerView, state: HttpSinkState | None = None
) -> web.Application:
    """
    Build the HTTP API application.

    Args:
        config: the sink's configuration (plane, limits, operator endpoints).
        broker: what the API reports on and draws entropy from.
        state: shared with the owning sink; a fresh one when omitted.

    Returns:
        An application ready for an `aiohttp.web.AppRunner`.

    Raises:
        ConfigError: ``pollen_path`` is the path of another endpoint.
    """
    pollen_path = config.pollen_path if config.pollen else None
    if pollen_path is not None and path_taken(pollen_path):
        raise ConfigError(
            f"pollen_path {pollen_path!r} is taken by another endpoint of the sink"
        )
    middlewares: list[Middleware] = [observe_middleware, error_middleware]
    if config.plane == "tenant":
        middlewares.append(tenant_plane_middleware(config.admin_token, pollen_path))
    app = web.Application(
        middlewares=middlewares, client_max_size=config.max_body_bytes
    )
    app[BROKER_KEY] = broker
    app[CONFIG_KEY] = config
    app[STATE_KEY] = state if state is not None else HttpSinkState()
    app[REGISTRY_KEY] = create_registry(broker)
    entropy = app[ENTROPY_KEY] = EntropyEndpoint(config, broker, app[STATE_KEY])
    router = app.router
    if pollen_path is not None:
        endpoint = PollenEndpoint(config, entropy, broker.accounts)
        router.add_post(pollen_path, endpoint.handle)
        if pollen_path == "/":
            router.add_get("/", endpoint.or_page(index))
        else:
            # No HEAD: it would consume entropy only to throw it away.
            router.add_get(pollen_path, endpoint.handle, allow_head=False)
    if pollen_path != "/":
        router.add_get("/", index)
    router.add_route("OPTIONS", "/", healthz)
    router.add_route("*", "/healthz", healthz)
    router.add_get("/readyz", readyz)
    # No HEAD: it would consume entropy only to throw it away.
    router.add_get(PATH, entropy.handle, allow_head=False)
    router.add_get("/v1/status", status)
    router.add_get("/metrics", metrics)
    router.add_get(HISTORY_PATH, history_handler(broker))
    if config.admin_token is not None:
        router.add_post("/v1/admin/reload", reload_handler(broker, config.admin_token))
    if config.simulator_control:
        # Serials may contain '/', so the serial segment takes everything up to
        # the last path segment.
        router.add_post(
            r"/v1/simulator/{serial:.+}/{action:[a-z]+}", simulator_handler(broker)
        )
    return app


def _raw_query(request: BaseRequest) -> bytes:
    # As sent: the challenge is decoded once, by `sinks.http.pollen`.
    return request.rel_url.raw_query_string.encode("utf-8", "surrogateescape")


def asks_pollen(request: BaseRequest, pollen_path: str) -> bool:
    """
    Whether ``request`` is for the pollen endpoint at ``pollen_path``: a POST
    there, or a GET there; on ``/`` only a GET whose query names a
    ``challenge``, since any other ``GET /`` is the status page.
    """
    if request.path != pollen_path:
        return False
    if request.method == "POST":
        return True
    if request.method != "GET":
        return False
    return pollen_path != "/" or pollen.form_value(_raw_query(request)) is not None


def _pollen_answer(
    challenge: bytes, fresh: bytes, headers: dict[str, str]
) -> web.StreamResponse:
    return RawAnswer(pollen.answer(challenge, fresh), pollen.CONTENT_TYPE, headers)


class PollenEndpoint:
    """
    pollinate's server: the challenge's hash, and a hash over it and
    `pollen.FRESH_BYTES` pool bytes withdrawn as ``/v1/entropy`` withdraws
    them (the same client identity, grants, quotas, weighted wait and
    refusals), waiting at most `POLLEN_WAIT` s.

    Args:
        config: the sink's limits (``max_body_bytes`` bounds the challenge).
        entropy: the application's entropy endpoint, which does the withdrawal.
        accounts: who the clients are.
    """

    def __init__(
        self, config: HttpSinkConfig, entropy: EntropyEndpoint, accounts: Accounts
    ) -> None:
        self._entropy = entropy
        self._accounts = accounts
        self._limit = config.max_body_bytes
        self._query = EntropyQuery(
            pollen.FRESH_BYTES, "raw", min(POLLEN_WAIT, config.max_wait)
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """
        ``POST`` (form body) or ``GET`` (query) with ``challenge=...``.
        """
        form = None
        if request.method == "POST" and request.content_type == pollen.FORM_TYPE:
            # Bounded by the application's client_max_size (max_body_bytes).
            form = await request.read()
        try:
            challenge = pollen.find_challenge(_raw_query(request), form, self._limit)
        except pollen.ChallengeTooLarge as exc:
            return error_response(413, str(exc))
        if not challenge:
            return RawAnswer(pollen.NO_CHALLENGE, pollen.CONTENT_TYPE, status=400)
        client = identify(self._accounts, request)
        if isinstance(client, web.StreamResponse):
            return client
        encode = functools.partial(_pollen_answer, challenge)
        answer = self._entropy.draw_now(client, self._query, encode)
        if isinstance(answer, Pending):
            return await self._entropy.answer_later(answer)
        return answer

    def or_page(self, page: _Handler) -> _Handler:
        """
        The ``GET /`` handler when pollen lives at ``/``: pollen for a query
        naming a ``challenge``, ``page`` (the status page) for anything else,
        HEAD included.
        """

        async def root(request: web.Request) -> web.StreamResponse:
            if asks_pollen(request, "/"):
                return await self.handle(request)
            return await page(request)

        return root


Later: TypeAlias = Callable[[], Awaitable[web.StreamResponse]]
"""The rest of a request that must wait, to be awaited under its deadline."""

_PATH_QUERY: Final = PATH + "?"


class DirectEntropy:
    """
    ``GET /v1/entropy`` ahead of the application: an answer at once when the
    endpoint has one (`EntropyEndpoint.answer_now`), else the rest to await.

    A request answered at once is counted but never in flight: it never
    yields to the loop, so shutdown can neither see it nor need to cancel it.
    One that waits is in flight until it is answered, as every request of the
    application is.

    Args:
        endpoint: the application's entropy endpoint.
        state: the sink's counters and in-flight requests.
        logger: where the request log goes (at debug level only).
    """

    def __init__(
        self,
        endpoint: EntropyEndpoint,
        state: HttpSinkState,
        logger: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._endpoint = endpoint
        self._state = state
        self._log = logger

    def __call__(self, request: BaseRequest) -> web.StreamResponse | Later | None:
        """
        The answer, the rest to await, or None: not this route's request.
        """
        if request.method != "GET":
            return None
        # The raw target, so that only a spelling the router would take for
        # this path is taken here; any other goes through the application.
        target = request.raw_path
        if target != PATH and not target.startswith(_PATH_QUERY):
            return None
        logged = self._log.is_enabled_for(logging.DEBUG)
        started = time.monotonic() if logged else 0.0
        self._state.count_request(request.transport)
        try:
            answer = self._endpoint.answer_now(request)
        except Exception:  # noqa: BLE001 - _failed logs it with its traceback
            answer = _failed(request)
        if isinstance(answer, Pending):
            return functools.partial(self._later, request, answer, started)
        answer.headers.setdefault("Cache-Control", "no-store")
        if logged:
            _log_request(self._log, request, answer.status, started)
        return answer

    async def _later(
        self, request: BaseRequest, pending: Pending, started: float
    ) -> web.StreamResponse:
        state = self._state
        # aiohttp runs every request in a task of its own.
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("request handled outside a task")
        state.in_flight_started(task)
        status = 500
        try:
            try:
                answer = await self._endpoint.answer_later(pending)
            except Exception:  # noqa: BLE001 - _failed logs it with its traceback
                answer = _failed(request)
            answer.headers.setdefault("Cache-Control", "no-store")
            status = answer.status
            return answer
        finally:
            state.request_finished(task)
            if self._log.is_enabled_for(logging.DEBUG):
                _log_request(self._log, request, status, started)
