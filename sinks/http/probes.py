"""
What load balancers, scrapers and operators read: ``/healthz``, ``/readyz``,
``/v1/status`` and ``/metrics``.

Every answer is read from the broker at request time and never cached. Once the
sink's ``pre_shutdown`` has run, health, readiness and the status document all
say so, whatever the broker itself still reports, so a load balancer stops
sending traffic before the listeners close.

Health probes are deliberately lenient: haproxy sends ``GET /healthz HTTP/1.0``
without a Host header, and plain ``option httpchk`` sends ``OPTIONS /``; both are
answered with the same 200/503 logic, for any method on ``/healthz``.
"""

import dataclasses
import time
from typing import Any

from aiohttp import web

from broker import __version__
from broker.metrics import render_metrics
from broker.status import BrokerView
from sinks.http.state import BROKER_KEY, REGISTRY_KEY, STATE_KEY


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
        "health": {
            "status": health.status,
            "serving": health.serving,
            "reasons": list(health.reasons),
        },
        "pool": dataclasses.asdict(broker.pool.stats()),
        "tiers": dataclasses.asdict(broker.tiers()),
        "accounts": dict(broker.accounts.snapshot()),
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
