"""
What the accounts layer shows the outside: per-customer and per-client usage
for ``/v1/status`` and the metrics exporter.

The snapshot is plain data (JSON-ready dicts) and never holds a bearer token
or its hash: clients are listed by display key (``token:<12 hex>``). Shape::

    {
      "backend": {...},                 # QuotaBackend.status()
      "customers": {
        "<id>": {
          "implicit", "deny", "weight",
          "client_rate", "client_burst",  # per-client bucket, or None
          "rate", "burst",                # customer bucket, or None
          "bytes_served", "throttled_seconds", "throttled_requests", "denied",
          "quota": None | {"limit", "period", "used", "remaining", "resets_at"},
          "client_count",
          "clients": {"<key>": {"transport", "bytes_served",
                                "throttled_seconds", "last_seen"}},
        },
      },
    }

Quota counts are as of the last grant or housekeeping round: with Redis, other
brokers' use shows up at the next round, which `refresh_quotas` runs.
"""

from typing import Any

from broker.accounts.backend import QuotaBackend
from broker.accounts.clients import CustomerState
from broker.accounts.customers import Customers


def snapshot(customers: Customers, backend: QuotaBackend, now: float) -> dict[str, Any]:
    """
    Usage per customer and per client at ``now`` (Unix seconds).
    """
    clients: dict[str, dict[str, Any]] = {}
    for client in customers.clients.values():
        clients.setdefault(client.customer_id, {})[client.key] = {
            "transport": client.transport,
            "bytes_served": client.bytes_served,
            "throttled_seconds": round(client.throttled_seconds, 3),
            "last_seen": client.last_seen,
        }
    return {
        "backend": backend.status(),
        "customers": {
            customer.id: _customer_view(customer, clients.get(customer.id, {}), now)
            for customer in customers
        },
    }


def _customer_view(
    customer: CustomerState, clients: dict[str, Any], now: float
) -> dict[str, Any]:
    config = customer.config
    own = customer.client_bucket
    shared = customer.bucket
    return {
        "implicit": customer.implicit,
        "deny": config.deny,
        "weight": config.weight,
        "client_rate": own[0] if own else None,
        "client_burst": own[1] if own else None,
        "rate": shared.rate if shared else None,
        "burst": shared.burst if shared else None,
        "bytes_served": customer.bytes_served,
        "throttled_seconds": round(customer.throttled_seconds, 3),
        "throttled_requests": customer.throttled_requests,
        "denied": customer.denied,
        "quota": _quota_view(customer, now),
        "client_count": len(clients),
        "clients": clients,
    }


def _quota_view(customer: CustomerState, now: float) -> dict[str, Any] | None:
    quota = customer.quota_limit(now)
    if quota is None or customer.config.quota is None:
        return None
    used = customer.quota_used_at(quota)
    return {
        "limit": quota.limit,
        "period": customer.config.quota.period,
        "used": used,
        "remaining": max(0, quota.limit - used),
        "resets_at": quota.expires_at,
    }


async def refresh_quotas(
    customers: Customers, backend: QuotaBackend, now: float
) -> None:
    """
    Read every customer's quota use for the period at ``now`` from the backend,
    so the snapshot includes what other brokers charged.
    """
    for customer in customers:
        quota = customer.quota_limit(now)
        if quota is None:
            continue
        customer.quota_used = await backend.usage(
            customer.id, quota.period_key, quota.expires_at
        )
        customer.quota_key = quota.period_key
