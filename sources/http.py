"""
The ``http`` source: another ebroker's ``GET /v1/entropy?format=raw``, with a
bearer token and TLS verification, failing over between a list of URLs
(`sources.upstream.driver`).

An open builds a client session (system CAs or ``ca_file``, an optional client
certificate), reads the token, and asks the first endpoint that is not
backing off for one block without waiting (``wait=0``), within
``connect_timeout``: an answer with the bytes, or a 429/503 saying "later", is
an upstream that works; anything else (refused, TLS not trusted, 401, 403, a
malformed answer) fails that endpoint over to the next. Reads then ask for
``read_size`` bytes with ``wait=`` seconds of patience, one request at a time
on a kept-alive connection.

When the endpoint in use fails during a read (refused, reset, closed, a
malformed or short answer, a refusal below), the read fails over
(`sources.upstream.failover`): the next endpoint is asked as an open asks
it (one block without waiting, within ``connect_timeout``), and the read
returns that block, or goes on asking that endpoint when it answered with
backpressure. A short or cut answer is never returned: the block is asked
again of the next endpoint.

Backpressure: a 429 (rate limit) or 503 (pool short, upstream draining) is an
upstream doing its job, not a dead one. The read waits what ``Retry-After``
says (1 s when absent, at most 60 s) and asks the same endpoint again. It
delivers nothing meanwhile, so an upstream that stays empty for longer than
the source's ``watchdog`` is a stall: the supervisor restarts the source and
the open moves to the next endpoint.

Refusals: 401 (token refused) and 403 (denied, quota spent) fail the endpoint
over with a message saying so; a spent quota's ``Retry-After`` keeps the endpoint
backing off at least that long. 400 means this source asks for more than the
upstream allows (``read_size`` over its ``max_request_bytes``, ``wait`` over
its ``max_wait``): the upstream's message is kept. Redirects are not
followed: configure the URL that answers.

The token is a secret: it goes only into the ``Authorization`` header, never
into a log, a status or an error (an upstream's message that echoes it is
redacted). A token file that its group or others may read is refused.
"""

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import structlog
from yarl import URL

from broker.errors import SourceError
from sources.http_config import HttpSourceConfig, read_token, tls_context
from sources.upstream.driver import UpstreamSource
from sources.upstream.endpoints import blame
from sources.upstream.failover import UpstreamRefused

__all__ = ["HttpSource", "HttpSourceConfig", "retry_after"]

log = structlog.get_logger("ebroker.sources.http")

PATH: Final = "v1/entropy"
_RETRY_DEFAULT: Final = 1.0
_RETRY_FLOOR: Final = 0.1
_RETRY_MAX: Final = 60.0
# A spent quota's Retry-After runs to the end of its period: up to a day.
_QUOTA_WAIT_MAX: Final = 86400.0
_MESSAGE_MAX: Final = 200
_ERROR_BODY_MAX: Final = 4096


def retry_after(headers: Any, cap: float = _RETRY_MAX) -> float:
    """
    Seconds a ``Retry-After`` header asks for (1 when absent or a date), at
    most ``cap``.
    """
    value = headers.get("Retry-After", "")
    try:
        seconds = float(value)
    except ValueError:
        return _RETRY_DEFAULT
    if not 0 <= seconds < float("inf"):
        return _RETRY_DEFAULT
    return min(cap, seconds)


def _wait_text(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") or "0"


class Backpressure(Exception):
    """
    The upstream answered 429 or 503: come back after ``seconds``.
    """

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.seconds = seconds


@dataclass
class _Answered:
    """
    An endpoint that answered an open's request: the block it answered with
    until a read returns it (b"": it answered with backpressure).
    """

    first: bytes


class HttpSource(UpstreamSource[str, _Answered]):
    """
    ``read_size`` bytes a request from an upstream broker's HTTP API, on the
    first endpoint that answers, one request at a time on one session.

    Args:
        config: the source's settings.
        rng: jitter for endpoint backoff, a float in [0, 1).
    """

    kind = "http"

    def __init__(
        self,
        config: HttpSourceConfig,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(config, config.urls, log=log, rng=rng)
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._backpressure = 0

    async def _setup(self) -> None:
        config = self._config
        # Read at every open: a rotated token or certificate is picked up by
        # the next restart of the source.
        self._token = read_token(config)
        connector = aiohttp.TCPConnector(ssl=tls_context(config), limit=4)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=config.connect_timeout
            ),
        )

    async def _teardown(self) -> None:
        session, self._session = self._session, None
        self._token = None
        if session is not None:
            await session.close()

    async def _connect(self, endpoint: str) -> _Answered:
        """
        One request without waiting: the bytes, or b"" when the upstream
        answered with backpressure (it works, and is busy).
        """
        try:
            return _Answered(await self._request(endpoint, 0.0))
        except Backpressure as exc:
            self._log.info(
                "upstream_backpressure",
                endpoint=endpoint,
                reason=str(exc),
                seconds=exc.seconds,
            )
            return _Answered(b"")

    def _pending(self, connection: _Answered) -> bytes:
        first, connection.first = connection.first, b""
        return first

    async def _receive(self, endpoint: str, connection: _Answered) -> bytes:
        while True:
            try:
                return await self._request(endpoint, self._config.wait)
            except Backpressure as exc:
                self._backpressure += 1
                self._log.debug(
                    "upstream_backpressure",
                    endpoint=endpoint,
                    reason=str(exc),
                    seconds=exc.seconds,
                )
                # A floor: "Retry-After: 0" on every answer must not become
                # a busy loop against the upstream.
                await asyncio.sleep(max(_RETRY_FLOOR, exc.seconds))

    async def _request(self, endpoint: str, wait: float) -> bytes:
        """
        One ``GET /v1/entropy``: exactly ``read_size`` bytes.

        Raises:
            Backpressure: 429 or 503.
            UpstreamRefused: 400, 401, 403, a redirect.
            SourceError: any other failure.
        """
        session = self._session
        if session is None:
            raise SourceError("http source is not open")
        count = self._config.read_size
        params = {"bytes": str(count), "format": "raw"}
        if wait > 0:
            params["wait"] = _wait_text(wait)
        headers = {"Accept": "application/octet-stream"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            async with session.get(
                URL(endpoint).join(URL(PATH)),
                params=params,
                headers=headers,
                allow_redirects=False,
            ) as response:
                if response.status == 200:
                    return await self._body(endpoint, response, count)
                raise await self._refusal(endpoint, response)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise SourceError(
                f"{endpoint}: TLS certificate not trusted: {exc.certificate_error}"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise SourceError(f"{endpoint}: TLS handshake failed: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc.os_error)
            raise SourceError(f"{endpoint}: cannot connect: {reason}") from None
        except aiohttp.ServerDisconnectedError:
            raise SourceError(
                f"{endpoint} closed the connection without answering"
            ) from None
        except aiohttp.ClientPayloadError:
            raise SourceError(f"{endpoint}: answer cut short") from None
        except aiohttp.ClientError as exc:
            raise SourceError(blame(endpoint, f"{type(exc).__name__}: {exc}")) from None

    async def _body(
        self, endpoint: str, response: aiohttp.ClientResponse, count: int
    ) -> bytes:
        if response.content_type != "application/octet-stream":
            raise SourceError(
                f"{endpoint} answered {response.content_type!r}, not raw bytes "
                "(not an ebroker?)"
            )
        if response.content_length not in (None, count):
            raise SourceError(
                f"{endpoint} answered {response.content_length} bytes, {count} asked"
            )
        data = bytearray()
        while len(data) <= count:
            chunk = await response.content.read(count + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) != count:
            raise SourceError(f"{endpoint} answered {len(data)} bytes, {count} asked")
        return bytes(data)

    async def _refusal(
        self, endpoint: str, response: aiohttp.ClientResponse
    ) -> Exception:
        status = response.status
        message = self._message(await response.content.read(_ERROR_BODY_MAX))
        said = f" ({message})" if message else ""
        if status in (429, 503):
            return Backpressure(retry_after(response.headers), f"{status}{said}")
        if status == 401:
            return UpstreamRefused(
                f"{endpoint} refused the bearer token (401){said}: check "
                "token_file or token_env, and the upstream's customers"
            )
        if status == 403:
            seconds = 0.0
            if "Retry-After" in response.headers:
                seconds = retry_after(response.headers, _QUOTA_WAIT_MAX)
            return UpstreamRefused(f"{endpoint} denied access (403){said}", seconds)
        if status == 400:
            return UpstreamRefused(
                f"{endpoint} refused the request (400){said}: is read_size within "
                "its max_request_bytes and wait within its max_wait?"
            )
        if 300 <= status < 400:
            location = response.headers.get("Location", "")
            return UpstreamRefused(
                f"{endpoint} redirects ({status}) to {location[:_MESSAGE_MAX]!r}: "
                "configure the URL that answers"
            )
        return SourceError(f"{endpoint} answered {status}{said}")

    def _message(self, body: bytes) -> str:
        """
        The ``error`` of an upstream's JSON answer, short, and never the token.
        """
        text = body.decode("utf-8", "replace")
        with contextlib.suppress(ValueError):
            document = json.loads(text)
            if isinstance(document, dict) and isinstance(document.get("error"), str):
                text = document["error"]
        if self._token:
            text = text.replace(self._token, "[token]")
        return " ".join(text.split())[:_MESSAGE_MAX]

    def _details(self) -> dict[str, Any]:
        return {"backpressure_waits": self._backpressure}
