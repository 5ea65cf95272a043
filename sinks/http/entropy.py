"""
``GET /v1/entropy``: query parsing, the per-customer grant, the pool read (or
the 503 that replaces it at shutdown) and the encoding of the answer.

A request either gets exactly the bytes it asked for or none at all: whatever
was granted but not served goes back to the client's budget, and a request
blocked in ``?wait=`` when shutdown begins answers 503 at once, because another
instance behind the load balancer can serve it.
"""

import asyncio
import base64
import math
import re
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from multidict import MultiMapping

from broker.errors import PoolClosedError
from broker.pool import BLOCK_BITS, RESERVE_BITS
from broker.status import BrokerView
from sinks.http.config import HttpSinkConfig
from sinks.http.limits import grant_now, grant_within, identify, rate_headers, refusal
from sinks.http.state import (
    BROKER_KEY,
    CONFIG_KEY,
    STATE_KEY,
    echo,
    error_response,
)

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
                f"unknown query parameter {echo(key)} (allowed: {allowed})"
            )
        if len(query.getall(key)) > 1:
            raise QueryError(f"query parameter {key!r} given more than once")
    limit = config.max_request_bytes
    raw_count = query.get("bytes")
    if raw_count is None:
        raise QueryError(f"missing query parameter 'bytes' (an integer 1..{limit})")
    if not _INTEGER.match(raw_count) or not 1 <= int(raw_count) <= limit:
        raise QueryError(
            f"'bytes' must be an integer 1..{limit}, got {echo(raw_count)}"
        )
    output = query.get("format", "raw")
    if output not in FORMATS:
        raise QueryError(
            f"'format' must be one of {', '.join(FORMATS)}, got {echo(output)}"
        )
    raw_wait = query.get("wait", "0")
    if not _DECIMAL.match(raw_wait) or float(raw_wait) > config.max_wait:
        limit_wait = f"{config.max_wait:g}"
        raise QueryError(
            f"'wait' must be seconds 0..{limit_wait}, got {echo(raw_wait)}"
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
    return error_response(503, message, {"Retry-After": str(seconds)})


def _shutting_down() -> web.Response:
    # Behind a load balancer the retry lands on another instance: retry soon.
    return error_response(503, "shutting down", {"Retry-After": "1"})


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
        return error_response(400, str(exc))
    accounts = broker.accounts
    client = identify(accounts, request)
    if isinstance(client, web.Response):
        return client
    started = time.monotonic()
    if query.wait == 0:
        grant = await grant_now(accounts, client, query.count)
    else:
        grant = await grant_within(accounts, client, query.count, query.wait)
    if grant.granted < query.count:
        return refusal(grant, query.count, accounts.clock.time())
    headers = rate_headers(grant, accounts.clock.time())
    pool = broker.pool
    data = b""
    try:
        if query.wait == 0:
            # Bytes held back for a customer owed a turn are not ready for
            # this one: ask the pool what this client may take now.
            ready = pool.available(client)
            if ready < query.count:
                return _unavailable(
                    broker,
                    query.count,
                    f"only {ready} bytes ready, {query.count} asked",
                )
            data = pool.read_nowait(query.count, key=client)
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
