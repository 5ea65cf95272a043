"""
``GET /v1/entropy``: query parsing, the per-customer grant, the pool read (or
the 503 that replaces it at shutdown) and the encoding of the answer.

A request either gets exactly the bytes it asked for or none at all: whatever
was granted but not served goes back to the client's budget, and a request
blocked in ``?wait=`` when shutdown begins answers 503 at once, because another
instance behind the load balancer can serve it.

Two paths, through `broker.withdrawal.Withdrawals`:

- `EntropyEndpoint.answer_now` runs without awaiting anything: it parses the
  query (``bytes=N`` alone without building aiohttp's query multidict),
  identifies the client and takes all the bytes at once with
  `Withdrawals.now`. It answers every request that needs no wait: the bytes,
  a 400/401/403, or the limits' 429/403.
- `EntropyEndpoint.answer_later` takes what the fast path handed on as a
  `Pending`: a request that must wait for the limits or the pool
  (``wait > 0``), whose limits need their backend (Redis, a quota file), or
  that finds the pool short with ``wait=0`` (then the limits' refusal still
  comes before the 503, as if the pool had been asked second).

Another endpoint that serves pool bytes (pollen, `sinks.http.app`) identifies
its client itself and enters at `EntropyEndpoint.draw_now` with its own
encoder, so it gets the same grants, waits and refusals.
"""

import asyncio
import base64
import math
import re
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final, TypeAlias

from aiohttp import web
from multidict import MultiMapping

from broker.accounts import Client
from broker.clock import Clock
from broker.errors import PoolClosedError
from broker.pool import BLOCK_BITS, RESERVE_BITS
from broker.status import BrokerView
from broker.withdrawal import Withdrawals
from sinks.http.answer import RawAnswer
from sinks.http.config import HttpSinkConfig
from sinks.http.limits import identify, rate_headers, refusal
from sinks.http.state import HttpSinkState, echo, error_response

PATH: Final = "/v1/entropy"

FORMATS: Final = ("raw", "hex", "base64")
QUERY_PARAMETERS: Final = ("bytes", "format", "wait")
# Pool output per credited input byte at full credit (32 bytes out per 40 in).
_OUTPUT_PER_INPUT: Final = BLOCK_BITS / (BLOCK_BITS + RESERVE_BITS)
# Retry-After when no source feeds the pool: no estimate is possible, so ask the
# client to come back soon enough to notice recovery but not hammer us.
_RETRY_UNKNOWN: Final = 5
_RETRY_MAX: Final = 60
# How old the feeding rate behind a Retry-After estimate may be, in seconds.
_RATE_AGE: Final = 1.0
_INTEGER = re.compile(r"^[0-9]{1,10}$")
_DECIMAL = re.compile(r"^[0-9]{1,10}(\.[0-9]{1,9})?$")
_DIGITS_MAX: Final = 10
_BYTES_ONLY: Final = PATH + "?bytes="


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


def retry_after(broker: BrokerView, wanted: int, rate: float | None = None) -> int:
    """
    Estimate in whole seconds (at least 1) when ``wanted`` bytes may be ready,
    from the rate of the sources feeding the pool (``rate``, input bytes a
    second; read from the broker when None).
    """
    missing = max(wanted - broker.pool.level, 1)
    if rate is None:
        rate = feeding_rate(broker)
    # Assumes full credit: sources credited less fill the pool more slowly, so
    # this errs early, and an early retry only costs the client another 503.
    output_rate = rate * _OUTPUT_PER_INPUT
    if output_rate <= 0:
        return _RETRY_UNKNOWN
    return max(1, min(_RETRY_MAX, math.ceil(missing / output_rate)))


def feeding_rate(broker: BrokerView) -> float:
    """
    Input bytes a second of the sources feeding the pool now.
    """
    return sum(source.rate for source in broker.sources_status() if source.feeding)


class _FeedingRate:
    """
    `feeding_rate`, read at most once per `_RATE_AGE` seconds: every source's
    status is dear to build, and a 503 needs only a whole-second estimate.
    """

    def __init__(self, broker: BrokerView, clock: Clock) -> None:
        self._broker = broker
        self._clock = clock
        self._rate = 0.0
        self._until = -math.inf

    def __call__(self) -> float:
        now = self._clock.monotonic()
        if now >= self._until:
            self._rate = feeding_rate(self._broker)
            self._until = now + _RATE_AGE
        return self._rate


def _shutting_down() -> web.StreamResponse:
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


_TEXT: Final = "text/plain; charset=utf-8"
_RAW: Final = "application/octet-stream"


def _encode(data: bytes, output: str, headers: dict[str, str]) -> RawAnswer:
    if output == "hex":
        return RawAnswer(data.hex().encode("ascii") + b"\n", _TEXT, headers)
    if output == "base64":
        return RawAnswer(base64.b64encode(data) + b"\n", _TEXT, headers)
    return RawAnswer(data, _RAW, headers)


Encode: TypeAlias = Callable[[bytes, dict[str, str]], web.StreamResponse]
"""Turns the bytes served and their ``RateLimit-*`` headers into the answer."""


@dataclass(frozen=True, slots=True)
class Pending:
    """
    A request `EntropyEndpoint.answer_now` could not answer without waiting;
    nothing is taken or charged for it yet.
    """

    query: EntropyQuery
    client: Client
    encode: Encode | None = None
    """How the bytes are answered; None: as ``query.format`` says."""


class EntropyEndpoint:
    """
    ``GET /v1/entropy?bytes=N[&format=raw|hex|base64][&wait=SECONDS]``.

    Args:
        config: the sink's limits.
        broker: whose pool and accounts serve the bytes.
        state: the sink's counters and shutdown flags.
    """

    def __init__(
        self, config: HttpSinkConfig, broker: BrokerView, state: HttpSinkState
    ) -> None:
        self._config = config
        self._broker = broker
        self._state = state
        self._withdrawals = Withdrawals(broker.pool, broker.accounts)
        self._feeding = _FeedingRate(broker, broker.accounts.clock)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """
        The whole exchange, as an aiohttp handler.
        """
        answer = self.answer_now(request)
        if isinstance(answer, Pending):
            return await self.answer_later(answer)
        return answer

    def query(self, request: web.BaseRequest) -> EntropyQuery:
        """
        The request's validated parameters.

        Raises:
            QueryError: as `parse_entropy_query`.
        """
        # The common ``?bytes=N``: with nothing but ASCII digits after it the
        # target cannot hold another parameter, an escape or a fragment, so
        # aiohttp's parsed query would be {"bytes": N} too. Anything else, or
        # a value out of range, gets the full parser and its messages.
        target = request.raw_path
        if target.startswith(_BYTES_ONLY):
            digits = target[len(_BYTES_ONLY) :]
            if len(digits) <= _DIGITS_MAX and digits.isascii() and digits.isdigit():
                count = int(digits)
                if 1 <= count <= self._config.max_request_bytes:
                    return EntropyQuery(count, "raw", 0.0)
        return parse_entropy_query(request.query, self._config)

    def answer_now(self, request: web.BaseRequest) -> web.StreamResponse | Pending:
        """
        Answer without awaiting anything, or hand the request on as `Pending`
        when it must wait.

        Raises:
            RuntimeError: the pool gave fewer bytes than it said were ready
                (a bug; those bytes are dropped, never served).
        """
        try:
            query = self.query(request)
        except QueryError as exc:
            return error_response(400, str(exc))
        client = identify(self._withdrawals.accounts, request)
        if isinstance(client, web.StreamResponse):
            return client
        return self.draw_now(client, query)

    def draw_now(
        self, client: Client, query: EntropyQuery, encode: Encode | None = None
    ) -> web.StreamResponse | Pending:
        """
        `answer_now` for a client already identified: the same grant, pool
        read and refusals for any endpoint that serves pool bytes, answered
        by ``encode`` (None: as ``query.format`` says).

        Raises:
            RuntimeError: as `answer_now`.
        """
        if query.wait and self._state.draining.is_set():
            # Shutdown began: the slow path answers 503 after the limits.
            return Pending(query, client, encode)
        count = query.count
        withdrawals = self._withdrawals
        try:
            taken = withdrawals.now(client, count, least=count)
        except PoolClosedError:
            return _shutting_down()
        if taken is None:
            return Pending(query, client, encode)  # the limits need their backend
        data = taken.data
        grant = taken.grant
        if grant is not None and len(data) == count:
            self._state.bytes_out += count
            headers = rate_headers(grant, taken.granted_at)
            if encode is not None:
                return encode(data, headers)
            return _encode(data, query.format, headers)
        if data:
            withdrawals.unserved(client, len(data), taken.granted_at)
            raise RuntimeError(f"pool returned {len(data)} of {count} bytes")
        if grant is not None and not query.wait:
            return refusal(grant, count, taken.granted_at)
        if grant is None and not query.wait:
            # The pool is short: the limits still speak first (429/403).
            full = withdrawals.grant_all_nowait(client, count)
            if full is None:
                return Pending(query, client, encode)  # the limits need their backend
            if full.granted < count:
                return refusal(full, count, full.charged_at or taken.granted_at)
            withdrawals.unserved(client, count, full.charged_at)
            ready = self._broker.pool.available(client)
            return self._unavailable(count, f"only {ready} bytes ready, {count} asked")
        # Limits short with time to wait: the limits decide (and may wait),
        # then the pool.
        return Pending(query, client, encode)

    async def answer_later(self, pending: Pending) -> web.StreamResponse:
        """
        The exchange for a request that waits: the limits, then the pool.

        Raises:
            RuntimeError: as `answer_now`.
        """
        query, client = pending.query, pending.client
        count = query.count
        broker = self._broker
        withdrawals = self._withdrawals
        clock = withdrawals.accounts.clock
        started = time.monotonic()
        if query.wait == 0:
            grant = await withdrawals.grant_all_now(client, count)
        else:
            grant = await withdrawals.grant_all_within(client, count, query.wait)
        if grant.granted < count:
            return refusal(grant, count, clock.time())
        headers = rate_headers(grant, clock.time())
        pool = broker.pool
        data = b""
        try:
            if query.wait == 0:
                # Bytes held back for a customer owed a turn are not ready for
                # this one: ask the pool what this client may take now.
                ready = pool.available(client)
                if ready < count:
                    return self._unavailable(
                        count, f"only {ready} bytes ready, {count} asked"
                    )
                data = pool.read_nowait(count, key=client)
            else:
                left = max(0.001, query.wait - (time.monotonic() - started))
                result = await _read_or_drain(
                    broker, count, left, self._state.draining, key=client
                )
                if result is None:
                    return _shutting_down()
                data = result
        except TimeoutError:
            return self._unavailable(
                count, f"{count} bytes not ready within {query.wait:g} s"
            )
        except PoolClosedError:
            return _shutting_down()
        finally:
            # Whatever was granted but not served goes back to the client's budget.
            withdrawals.unserved(client, count - len(data), grant.charged_at)
        if len(data) != count:
            # The pool only has bytes ready when nobody waits, so this is a bug;
            # the short read is dropped rather than served twice.
            raise RuntimeError(f"pool returned {len(data)} of {count} bytes")
        self._state.bytes_out += count
        if pending.encode is not None:
            return pending.encode(data, headers)
        return _encode(data, query.format, headers)

    def _unavailable(self, wanted: int, message: str) -> web.StreamResponse:
        seconds = retry_after(self._broker, wanted, self._feeding())
        return error_response(503, message, {"Retry-After": str(seconds)})
