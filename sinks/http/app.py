"""
The HTTP API as an aiohttp application: entropy, health, readiness, status,
metrics and a small status page.

The application only reads the broker through its `BrokerView` and keeps its own
counters and shutdown flags in an `HttpSinkState` that the owning `HttpSink`
shares; `create_app` works without a sink too, which is how tests drive it.

Health probes are deliberately lenient: haproxy sends ``GET /healthz HTTP/1.0``
without a Host header, and plain ``option httpchk`` sends ``OPTIONS /``; both are
answered with the same 200/503 logic, for any method on ``/healthz``.
"""

import asyncio
import base64
import dataclasses
import math
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from aiohttp import web
from multidict import MultiMapping
from prometheus_client import CollectorRegistry

from broker import __version__
from broker.accounts import Accounts
from broker.errors import PoolClosedError
from broker.metrics import create_registry, render_metrics
from broker.pool import BLOCK_BITS, RESERVE_BITS
from broker.status import BrokerView
from sinks.http.admin import reload_handler, simulator_handler
from sinks.http.config import HttpSinkConfig
from sinks.http.limits import grant_now, grant_within, identify, rate_headers, refusal
from sinks.http.page import index

log = structlog.get_logger("ebroker.sinks.http")

FORMATS: Final = ("raw", "hex", "base64")
QUERY_PARAMETERS: Final = ("bytes", "format", "wait")
# Pool output per credited input byte at full credit (32 bytes out per 40 in).
_OUTPUT_PER_INPUT: Final = BLOCK_BITS / (BLOCK_BITS + RESERVE_BITS)
# Retry-After when no source feeds the pool: no estimate is possible, so ask the
# client to come back soon enough to notice recovery but not hammer us.
_RETRY_UNKNOWN: Final = 5
_RETRY_MAX: Final = 60
_INTEGER = re.compile(r"^[0-9]{1,10}$")
_DECIMAL = re.compile(r"^[0-9]{1,10}(\.[0-9]{1,9})?$")
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
        self.requests += 1
        self.in_flight.add(task)
        self.idle.clear()
        # A weak set: connections are counted once and forgotten when they close.
        if transport is not None and transport not in self._seen:
            self._seen.add(transport)
            self.connections_total += 1

    def request_finished(self, task: "asyncio.Task[Any]") -> None:
        self.in_flight.discard(task)
        if not self.in_flight:
            self.idle.set()


BROKER_KEY: web.AppKey[BrokerView] = web.AppKey("ebroker_broker")
CONFIG_KEY: Final = web.AppKey("ebroker_http_config", HttpSinkConfig)
STATE_KEY: Final = web.AppKey("ebroker_http_state", HttpSinkState)
REGISTRY_KEY: Final = web.AppKey("ebroker_metrics_registry", CollectorRegistry)
ACCOUNTS_KEY: Final = web.AppKey("ebroker_accounts", Accounts)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


# ---- middlewares ----------------------------------------------------------------


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
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers.setdefault("Cache-Control", "no-store")
        return response
    finally:
        state.request_finished(task)
        # Paths and status only: never the body, which may be entropy.
        log.debug(
            "http_request",
            method=request.method,
            path=request.path,
            status=status,
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
            return _error(404, f"no such path: {_echo(request.path)}")
        if isinstance(exc, web.HTTPMethodNotAllowed):
            message = (
                f"method {_echo(request.method)} not allowed on {_echo(request.path)}"
            )
            return _error(405, message, {"Allow": exc.headers.get("Allow", "")})
        return _error(exc.status, exc.reason.lower())
    except Exception:
        # Logged with the traceback for operators; the client only learns that
        # something failed, never how.
        log.error(
            "http_handler_failed",
            method=request.method,
            path=request.path,
            exc_info=True,
        )
        return _error(500, "internal server error")


# ---- entropy --------------------------------------------------------------------


class QueryError(ValueError):
    """
    A query string the entropy endpoint cannot honour; the message names the
    parameter.
    """


@dataclass(frozen=True, slots=True)
class EntropyQuery:
    """
    Validated parameters of ``GET /v1/entropy``.
    """

    count: int
    format: str
    wait: float


def _echo(value: str) -> str:
    return repr(value if len(value) <= _ECHO_MAX else value[:_ECHO_MAX] + "...")


def parse_entropy_query(
    query: MultiMapping[str], config: HttpSinkConfig
) -> EntropyQuery:
    """
    Validate the query string of ``GET /v1/entropy``.

    Args:
        query: the request's query (a multidict: repeated keys are errors).
        config: the sink's limits.

    Returns:
        The validated parameters.

    Raises:
        QueryError: a parameter is missing, repeated, unknown or out of range.
    """
    for key in query:
        if key not in QUERY_PARAMETERS:
            allowed = ", ".join(QUERY_PARAMETERS)
            raise QueryError(
                f"unknown query parameter {_echo(key)} (allowed: {allowed})"
            )
        if len(query.getall(key)) > 1:
            raise QueryError(f"query parameter {key!r} given more than once")
    limit = config.max_request_bytes
    raw_count = query.get("bytes")
    if raw_count is None:
        raise QueryError(f"missing query parameter 'bytes' (an integer 1..{limit})")
    if not _INTEGER.match(raw_count) or not 1 <= int(raw_count) <= limit:
        raise QueryError(
            f"'bytes' must be an integer 1..{limit}, got {_echo(raw_count)}"
        )
    output = query.get("format", "raw")
    if output not in FORMATS:
        raise QueryError(
            f"'format' must be one of {', '.join(FORMATS)}, got {_echo(output)}"
        )
    raw_wait = query.get("wait", "0")
    if not _DECIMAL.match(raw_wait) or float(raw_wait) > config.max_wait:
        limit_wait = f"{config.max_wait:g}"
        raise QueryError(
            f"'wait' must be seconds 0..{limit_wait}, got {_echo(raw_wait)}"
        )
    return EntropyQuery(int(raw_count), output, float(raw_wait))


def retry_after(broker: BrokerView, wanted: int) -> int:
    """
    Estimate in whole seconds (at least 1) when ``wanted`` bytes may be ready,
    from the rate of the sources feeding the pool now.
    """
    missing = max(wanted - broker.pool.level, 1)
    rate = sum(source.rate for source in broker.sources_status() if source.feeding)
    # Assumes full credit: sources credited less fill the pool more slowly, so
    # this errs early, and an early retry only costs the client another 503.
    output_rate = rate * _OUTPUT_PER_INPUT
    if output_rate <= 0:
        return _RETRY_UNKNOWN
    return max(1, min(_RETRY_MAX, math.ceil(missing / output_rate)))


def _unavailable(broker: BrokerView, wanted: int, message: str) -> web.Response:
    seconds = retry_after(broker, wanted)
    return _error(503, message, {"Retry-After": str(seconds)})


def _shutting_down() -> web.Response:
    # Behind a load balancer the retry lands on another instance: retry soon.
    return _error(503, "shutting down", {"Retry-After": "1"})


async def _read_or_drain(
    broker: BrokerView,
    count: int,
    wait: float,
    draining: asyncio.Event,
    key: Hashable = None,
) -> bytes | None:
    """
    Wait up to ``wait`` s for ``count`` bytes; return None if shutdown began
    first.

    Raises:
        TimeoutError: the wait expired; no byte was consumed.
        PoolClosedError: the pool closed while waiting.
    """
    if draining.is_set():
        return None
    read = asyncio.create_task(broker.pool.read(count, timeout=wait, key=key))
    drained = asyncio.create_task(draining.wait())
    try:
        await asyncio.wait((read, drained), return_when=asyncio.FIRST_COMPLETED)
    finally:
        drained.cancel()
        # On cancellation (client gone) the read is cancelled too, and the pool
        # puts back whatever it had collected for us.
        read.cancel()
    try:
        return await read
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # Our own cancel() above won: shutdown began before the bytes arrived.
        return None


def _encode(data: bytes, output: str) -> web.Response:
    if output == "hex":
        return web.Response(text=data.hex() + "\n", content_type="text/plain")
    if output == "base64":
        return web.Response(
            text=base64.b64encode(data).decode("ascii") + "\n",
            content_type="text/plain",
        )
    return web.Response(body=data, content_type="application/octet-stream")


async def entropy(request: web.Request) -> web.StreamResponse:
    """
    ``GET /v1/entropy?bytes=N[&format=raw|hex|base64][&wait=SECONDS]``.
    """
    broker = request.app[BROKER_KEY]
    state = request.app[STATE_KEY]
    try:
        query = parse_entropy_query(request.query, request.app[CONFIG_KEY])
    except QueryError as exc:
        return _error(400, str(exc))
    accounts = request.app[ACCOUNTS_KEY]
    client = identify(accounts, request)
    if isinstance(client, web.Response):
        return client
    started = time.monotonic()
    if query.wait == 0:
        grant = await grant_now(accounts, client, query.count)
    else:
        grant = await grant_within(accounts, client, query.count, query.wait)
    if grant.granted < query.count:
        return refusal(grant, query.count, time.time())
    headers = rate_headers(grant, time.time())
    pool = broker.pool
    data = b""
    try:
        if query.wait == 0:
            if pool.level < query.count:
                return _unavailable(
                    broker,
                    query.count,
                    f"only {pool.level} bytes ready, {query.count} asked",
                )
            data = pool.read_nowait(query.count)
        else:
            left = max(0.001, query.wait - (time.monotonic() - started))
            result = await _read_or_drain(
                broker, query.count, left, state.draining, key=client
            )
            if result is None:
                return _shutting_down()
            data = result
    except TimeoutError:
        return _unavailable(
            broker,
            query.count,
            f"{query.count} bytes not ready within {query.wait:g} s",
        )
    except PoolClosedError:
        return _shutting_down()
    finally:
        # Whatever was granted but not served goes back to the client's budget.
        accounts.refund(client, query.count - len(data), grant.charged_at)
    if len(data) != query.count:
        # The pool only has bytes ready when nobody waits, so this is a bug;
        # the short read is dropped rather than served twice.
        raise RuntimeError(f"pool returned {len(data)} of {query.count} bytes")
    state.bytes_out += len(data)
    response = _encode(data, query.format)
    response.headers.update(headers)
    return response


# ---- health, readiness, status, metrics --------------------------------------------


def _health_text(request: web.Request) -> tuple[bool, str]:
    if request.app[STATE_KEY].shutting_down:
        return False, "shutting down"
    health = request.app[BROKER_KEY].health()
    text = health.status.replace("_", " ")
    if health.reasons:
        text += ": " + "; ".join(health.reasons)
    return health.serving, text


async def healthz(request: web.Request) -> web.Response:
    """
    Any method on ``/healthz`` (and ``OPTIONS /``): 200 while this instance
    should receive traffic, 503 otherwise; the body says why.
    """
    serving, text = _health_text(request)
    return web.Response(status=200 if serving else 503, text=text + "\n")


async def readyz(request: web.Request) -> web.Response:
    """
    ``GET /readyz``: 200 once start-up is complete and until shutdown begins.
    """
    ready = request.app[BROKER_KEY].ready() and not request.app[STATE_KEY].shutting_down
    return web.Response(
        status=200 if ready else 503, text="ready\n" if ready else "not ready\n"
    )


def _tiers(broker: BrokerView) -> dict[str, Any] | None:
    # Optional in the view: test doubles and future brokers may have no tiers.
    tiers = getattr(broker, "tiers", None)
    if tiers is None:
        return None
    return dataclasses.asdict(tiers())


def _accounts(broker: BrokerView) -> dict[str, Any] | None:
    accounts = getattr(broker, "accounts", None)
    return None if accounts is None else dict(accounts.snapshot())


def status_document(broker: BrokerView) -> dict[str, Any]:
    """
    The JSON body of ``GET /v1/status``.
    """
    health = broker.health()
    now = time.time()
    return {
        "instance": broker.instance,
        "version": __version__,
        "time": now,
        "started_at": broker.started_at,
        "uptime": round(now - broker.started_at, 3),
        "ready": broker.ready(),
        "health": {
            "status": health.status,
            "serving": health.serving,
            "reasons": list(health.reasons),
        },
        "pool": dataclasses.asdict(broker.pool.stats()),
        "tiers": _tiers(broker),
        "accounts": _accounts(broker),
        "sources": [dataclasses.asdict(source) for source in broker.sources_status()],
        "sinks": [
            {**dataclasses.asdict(sink), "addresses": list(sink.addresses)}
            for sink in broker.sinks_status()
        ],
    }


async def status(request: web.Request) -> web.Response:
    """
    ``GET /v1/status``: instance, health, pool, sources and sinks as JSON.
    """
    document = status_document(request.app[BROKER_KEY])
    if request.app[STATE_KEY].shutting_down and document["health"]["serving"]:
        document["health"] = {
            "status": "shutting_down",
            "serving": False,
            "reasons": ["shutting down"],
        }
    return web.json_response(document)


async def metrics(request: web.Request) -> web.Response:
    """
    ``GET /metrics``: Prometheus text format (OpenMetrics if the scraper asks).
    """
    body, content_type = render_metrics(
        request.app[BROKER_KEY],
        registry=request.app[REGISTRY_KEY],
        accept=request.headers.get("Accept"),
    )
    return web.Response(body=body, headers={"Content-Type": content_type})


def create_app(
    config: HttpSinkConfig, broker: BrokerView, state: HttpSinkState | None = None
) -> web.Application:
    """
    Build the HTTP API application.

    Args:
        config: the sink's configuration (limits).
        broker: what the API reports on and draws entropy from.
        state: shared with the owning sink; a fresh one when omitted.

    Returns:
        An application ready for an `aiohttp.web.AppRunner`.
    """
    app = web.Application(middlewares=[observe_middleware, error_middleware])
    app[BROKER_KEY] = broker
    app[CONFIG_KEY] = config
    app[STATE_KEY] = state if state is not None else HttpSinkState()
    app[REGISTRY_KEY] = create_registry(broker)
    # Without the broker's accounts (tests, embedding) nobody is limited.
    accounts = getattr(broker, "accounts", None)
    app[ACCOUNTS_KEY] = accounts if accounts is not None else Accounts.unlimited()
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
