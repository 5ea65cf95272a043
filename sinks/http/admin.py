"""
Operator endpoints that change the broker, kept apart from the read-only API.

``POST /v1/admin/reload`` re-reads customers and limits (as SIGHUP does); it
exists only when the sink's config sets ``admin_token`` (a ``sha256:`` hash) and
needs that token as a bearer token.

``POST /v1/simulator/{serial}/{action}`` drives a simulated Entropy Key
(unplug, replug, fail, heal) so operators can rehearse failover without
hardware. It exists only when the sink's config sets ``simulator_control``,
and only answers loopback peers.

`has_admin_token` is the one check of the admin token: reload uses it, and so
does the tenant plane before it lets a request reach any operator endpoint.
"""

import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.accounts import hash_token
from broker.status import BrokerView
from sinks.http.state import MalformedToken, bearer_token

SIMULATOR_ACTIONS = ("unplug", "replug", "fail", "heal")


def _from_loopback(request: web.Request) -> bool:
    peer = request.remote
    if peer is None:
        return False
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def has_admin_token(request: web.Request, admin_token_hash: str | None) -> bool:
    """
    Whether ``request`` carries ``Authorization: Bearer <token>`` whose hash is
    ``admin_token_hash``; always False when no admin token is configured.
    """
    if admin_token_hash is None:
        return False
    try:
        token = bearer_token(request)
    except MalformedToken:
        return False
    if token is None:
        return False
    # Constant time: how long the refusal takes says nothing about the token.
    return hmac.compare_digest(hash_token(token), admin_token_hash)


def simulator_handler(
    broker: BrokerView,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """
    The handler of ``POST /v1/simulator/{serial}/{action}`` for ``broker``.
    """

    async def handle(request: web.Request) -> web.Response:
        if not _from_loopback(request):
            return web.json_response(
                {"error": "simulator control only answers loopback clients"}, status=403
            )
        serial = request.match_info["serial"]
        action = request.match_info["action"]
        if action not in SIMULATOR_ACTIONS:
            return web.json_response(
                {"error": f"action must be one of {', '.join(SIMULATOR_ACTIONS)}"},
                status=400,
            )
        try:
            broker.simulator_control(serial, action)
        except KeyError:
            return web.json_response(
                {"error": f"no simulated key with serial {serial!r}"}, status=404
            )
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"serial": serial, "action": action})

    return handle


def reload_handler(
    broker: BrokerView, admin_token_hash: str
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """
    ``POST /v1/admin/reload``: re-read customers and limits, like SIGHUP.
    Needs ``Authorization: Bearer <admin token>``.
    """

    async def handle(request: web.Request) -> web.Response:
        if not has_admin_token(request, admin_token_hash):
            return web.json_response(
                {"error": "admin token required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="ebroker-admin"'},
            )
        if await broker.reload():
            return web.json_response({"reloaded": True})
        return web.json_response(
            {"reloaded": False, "error": "new configuration refused; see the log"},
            status=409,
        )

    return handle
