"""
What load balancers, scrapers and operators read: ``/healthz``, ``/readyz``,
``/v1/status`` and ``/metrics``.

Every answer is read from the broker at request time and never cached. Once the
sink's ``pre_shutdown`` has run, health, readiness and the status document all
say so, whatever the broker itself still reports, so a load balancer stops
sending traffic before the listeners close.

On a tenant-plane sink ``/v1/status`` is cut down to what the asker may see
(`tenant_status_document`): the health word, and for a client that a customer
owns, that customer's own limits and usage and the asking client's own
counters. No other customer, no client address but the asker's own, no
source, sink or pool figure. The full document needs the admin token there.

Health probes are deliberately lenient: haproxy sends ``GET /healthz HTTP/1.0``
without a Host header, and plain ``option httpchk`` sends ``OPTIONS /``; both are
answered with the same 200/503 logic, for any method on ``/healthz``.
"""

import dataclasses
import time
from typing import Any, Final

from aiohttp import web

from broker import __version__
from broker.accounts import DEFAULT_CUSTOMER, Client, Denied
from broker.metrics import render_metrics
from broker.status import BrokerView
from sinks.http.admin import has_admin_token
from sinks.http.limits import request_peer
from sinks.http.state import (
    BROKER_KEY,
    CONFIG_KEY,
    REGISTRY_KEY,
    STATE_KEY,
    MalformedToken,
    bearer_token,
)

# The customer figures a tenant may read about its own customer.
_TENANT_CUSTOMER_FIELDS: Final = (
    "rate",
    "burst",
    "client_rate",
    "client_burst",
    "bytes_served",
    "throttled_seconds",
    "throttled_requests",
    "quota",
    "client_count",
)
_TENANT_CLIENT_FIELDS: Final = ("transport", "bytes_served", "throttled_seconds")


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
        "phase": str(broker.phase()),
        "health": {
            "status": health.status,
            "serving": health.serving,
            "reasons": list(health.reasons),
        },
        "config": dataclasses.asdict(broker.config_status()),
        "pool": dataclasses.asdict(broker.pool.stats()),
        "tiers": dataclasses.asdict(broker.tiers()),
        "accounts": dict(broker.accounts.snapshot()),
        "sources": [dataclasses.asdict(source) for source in broker.sources_status()],
        "sinks": [
            {**dataclasses.asdict(sink), "addresses": list(sink.addresses)}
            for sink in broker.sinks_status()
        ],
    }


def _customer_client(broker: BrokerView, request: web.Request) -> Client | None:
    """
    The client a customer owns behind ``request``, or None for a refused or
    unknown token, a denied customer, or a client only ``default`` catches.
    """
    try:
        token = bearer_token(request)
    except MalformedToken:
        return None
    client = broker.accounts.identify(request_peer(request, token))
    if isinstance(client, Denied) or client.customer_id == DEFAULT_CUSTOMER:
        return None
    return client


def tenant_status_document(broker: BrokerView, request: web.Request) -> dict[str, Any]:
    """
    The JSON body of ``GET /v1/status`` on the tenant plane without the admin
    token::

        {"health": {"status", "serving"},
         "customer": {"id", "rate", "burst", "client_rate", "client_burst",
                      "bytes_served", "throttled_seconds", "throttled_requests",
                      "quota", "client_count"},
         "client": {"key", "transport", "bytes_served", "throttled_seconds"}}

    ``customer`` and ``client`` are there only for a client a customer owns
    (by token, network or uid); health reasons are left out since they name
    the broker's internals.
    """
    health = broker.health()
    document: dict[str, Any] = {
        "health": {"status": health.status, "serving": health.serving}
    }
    client = _customer_client(broker, request)
    if client is None:
        return document
    view = broker.accounts.snapshot()["customers"].get(client.customer_id)
    if view is None:
        return document
    document["customer"] = {
        "id": client.customer_id,
        **{name: view[name] for name in _TENANT_CUSTOMER_FIELDS},
    }
    own = view["clients"].get(client.key, {})
    document["client"] = {
        "key": client.key,
        **{name: own.get(name) for name in _TENANT_CLIENT_FIELDS},
    }
    return document


async def status(request: web.Request) -> web.Response:
    """
    ``GET /v1/status``: instance, health, pool, sources and sinks as JSON; on
    the tenant plane without the admin token, `tenant_status_document`.
    """
    broker = request.app[BROKER_KEY]
    config = request.app[CONFIG_KEY]
    if config.plane == "operator" or has_admin_token(request, config.admin_token):
        document = status_document(broker)
    else:
        document = tenant_status_document(broker, request)
    health = document["health"]
    if request.app[STATE_KEY].shutting_down and health["serving"]:
        health.update(status="shutting_down", serving=False)
        if "reasons" in health:
            health["reasons"] = ["shutting down"]
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
