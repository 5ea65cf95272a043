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
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from broker.metrics import create_registry
from broker.status import BrokerView
from sinks.http.admin import has_admin_token, reload_handler, simulator_handler
from sinks.http.config import HttpSinkConfig
from sinks.http.entropy import entropy
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

TENANT_PATHS: Final = frozenset({"/v1/entropy", "/healthz", "/readyz", "/v1/status"})
"""Paths the tenant plane serves to anyone (``/v1/status`` filters itself)."""


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
        # Paths and status only: never the body, which may be entropy.
        log.debug(
            "http_request",
            method=request.method,
            path=request.path,
            status=status_code,
            peer=request.remote,
            ms=round((time.monotonic() - started) * 1000, 3),
        )


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
    except Exception:
        # Logged with the traceback for operators; the client only learns that
        # something failed, never how.
        log.error(
            "http_handler_failed",
            method=request.method,
            path=request.path,
            exc_info=True,
        )
        return error_response(500, "internal server error")


def tenant_plane_middleware(admin_token_hash: str | None) -> Middleware:
    """
    The gate of a tenant-plane sink: `TENANT_PATHS` and ``OPTIONS /`` pass;
    anything else needs the admin token and is otherwise a plain 404.
    """

    @web.middleware
    async def tenant_plane(
        request: web.Request, handler: _Handler
    ) -> web.StreamResponse:
        # An allow-list of exact paths fails closed: a path spelled in a way the
        # list does not know is refused even if the router would match it.
        public = request.path in TENANT_PATHS or (
            request.path == "/" and request.method == "OPTIONS"
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
    """
    middlewares: list[Middleware] = [observe_middleware, error_middleware]
    if config.plane == "tenant":
        middlewares.append(tenant_plane_middleware(config.admin_token))
    app = web.Application(
        middlewares=middlewares, client_max_size=config.max_body_bytes
    )
    app[BROKER_KEY] = broker
    app[CONFIG_KEY] = config
    app[STATE_KEY] = state if state is not None else HttpSinkState()
    app[REGISTRY_KEY] = create_registry(broker)
    router = app.router
    router.add_get("/", index)
    router.add_route("OPTIONS", "/", healthz)
    router.add_route("*", "/healthz", healthz)
    router.add_get("/readyz", readyz)
    # No HEAD: it would consume entropy only to throw it away.
    router.add_get("/v1/entropy", entropy, allow_head=False)
    router.add_get("/v1/status", status)
    router.add_get("/metrics", metrics)
    if config.admin_token is not None:
        router.add_post("/v1/admin/reload", reload_handler(broker, config.admin_token))
    if config.simulator_control:
        # Serials may contain '/', so the serial segment takes everything up to
        # the last path segment.
        router.add_post(
            r"/v1/simulator/{serial:.+}/{action:[a-z]+}", simulator_handler(broker)
        )
    return app
