"""
Per-customer limits for ``GET /v1/entropy``: who is asking, and may they have it.

A request is identified by its bearer token, else by the client certificate
its HTTPS connection was verified with (if a customer lists it), else by its
address. Every decision comes from `broker.accounts.Accounts`; this module only
turns them into HTTP: 400 for a bearer token that is not printable text (bytes that
are not UTF-8, control characters), 401 for an unknown bearer token, 403 for a
denied customer or a spent quota (with a JSON body saying which limit and until
when), 429 with ``Retry-After`` and ``RateLimit-*`` headers for rate limits, 503
when the shared budget store is unreachable and the operator chose
``fail_closed``.
"""

import math
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.web_request import BaseRequest

from broker.accounts import Accounts, Client, Denied, Grant, Peer
from sinks.http.answer import json_answer
from sinks.http.state import MalformedToken, bearer_token
from sinks.http.tls import peer_certificate


def request_peer(request: BaseRequest, token: str | None) -> Peer:
    """
    What identifies a request: its bearer token, the client certificate its
    connection was verified with (HTTPS), its address; the accounts match them
    in that order.
    """
    return Peer(
        "http",
        ip=request.remote,
        token=token,
        cert=peer_certificate(request.transport),
    )


def identify(accounts: Accounts, request: BaseRequest) -> Client | web.StreamResponse:
    """
    The client behind a request, or the 400/401/403 answer refusing it.
    """
    try:
        token = bearer_token(request)
    except MalformedToken:
        return json_answer(
            {"error": "malformed bearer token", "limit": "auth"},
            status=400,
            headers={
                "WWW-Authenticate": 'Bearer realm="ebroker", error="invalid_request"'
            },
        )
    identity = accounts.identify(request_peer(request, token))
    if isinstance(identity, Denied):
        if identity.customer_id is None:
            return json_answer(
                {"error": "unknown bearer token", "limit": "auth"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="ebroker"'},
            )
        return json_answer({"error": identity.reason, "limit": "denied"}, status=403)
    return identity


def rate_headers(grant: Grant, now: float) -> dict[str, str]:
    """
    ``RateLimit-*`` headers for a grant (none when the client is unlimited).
    """
    if grant.rate_limit <= 0:
        return {}
    reset = 0 if grant.reset_at is None else max(0, math.ceil(grant.reset_at - now))
    return {
        "RateLimit-Limit": str(grant.rate_limit),
        "RateLimit-Remaining": str(max(0, grant.rate_remaining)),
        "RateLimit-Reset": str(reset),
    }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def refusal(grant: Grant, wanted: int, now: float) -> web.StreamResponse:
    """
    The answer for a grant that does not cover ``wanted`` bytes.
    """
    headers = rate_headers(grant, now)
    retry = max(1, math.ceil(grant.retry_after)) if grant.retry_after else 1
    if grant.limit == "quota":
        return json_answer(
            {
                "error": f"quota spent: {wanted} bytes asked, "
                f"{grant.remaining_quota or 0} left this period",
                "limit": "quota",
                "until": _iso(grant.reset_at),
                "reset_at": grant.reset_at,
            },
            status=403,
            headers={**headers, "Retry-After": str(retry)},
        )
    if grant.limit == "denied":
        return json_answer({"error": "access denied", "limit": "denied"}, status=403)
    if grant.limit == "unavailable":
        return json_answer(
            {"error": "budget store unavailable", "limit": "unavailable"},
            status=503,
            headers={"Retry-After": str(retry)},
        )
    if 0 < grant.rate_limit < wanted:
        message = (
            f"{wanted} bytes asked, more than the burst of {grant.rate_limit}: "
            f"ask at most {grant.rate_limit} at a time, or add wait=SECONDS"
        )
    else:
        message = f"rate limited: {wanted} bytes asked, {grant.granted} allowed now"
    return json_answer(
        {
            "error": message,
            "limit": grant.limit,
            "until": _iso(now + grant.retry_after),
        },
        status=429,
        headers={**headers, "Retry-After": str(retry)},
    )
