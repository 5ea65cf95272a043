"""
The ``http`` source: another ebroker's ``GET /v1/entropy?format=raw``, with a
bearer token and TLS verification, failing over between a list of URLs
(`sources.upstream`).

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
(`sources.upstream.fail_over`): the next endpoint is asked as an open asks
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
import ipaddress
import json
import os
import random
import ssl
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Final, Literal, Self

import aiohttp
import structlog
from pydantic import AfterValidator, Field, model_validator
from yarl import URL

from broker.configbase import Duration, Size
from broker.errors import SourceError
from sources.upstream import (
    ConnectFailed,
    Endpoints,
    UpstreamConfigBase,
    UpstreamRefused,
    blame,
    closed,
    fail_over,
    failover_budget,
    open_first,
    try_connect,
)

log = structlog.get_logger("ebroker.sources.http")

PATH: Final = "v1/entropy"
_RETRY_DEFAULT: Final = 1.0
_RETRY_FLOOR: Final = 0.1
_RETRY_MAX: Final = 60.0
# A spent quota's Retry-After runs to the end of its period: up to a day.
_QUOTA_WAIT_MAX: Final = 86400.0
_MESSAGE_MAX: Final = 200
_ERROR_BODY_MAX: Final = 4096


def _base_url(value: str) -> str:
    try:
        url = URL(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"{value!r}: an upstream broker URL is 'https://HOST:PORT/' "
            "(or 'http://' on loopback)"
        )
    if url.user is not None or url.password is not None:
        raise ValueError(
            f"{value!r}: no credentials in the URL; use token_file or token_env"
        )
    if url.query_string or url.fragment:
        raise ValueError(f"{value!r}: a base URL has no query or fragment")
    path = url.path if url.path.endswith("/") else url.path + "/"
    return str(url.with_path(path))


def _is_loopback(url: str) -> bool:
    host = URL(url).host or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


BaseUrl = Annotated[str, AfterValidator(_base_url)]


class HttpSourceConfig(UpstreamConfigBase):
    """
    ``kind = "http"``: an upstream broker over HTTP(S).
    """

    kind: Literal["http"] = Field(description="source driver")
    urls: list[BaseUrl] = Field(
        min_length=1,
        description="base URLs of upstream brokers in order of preference, "
        "such as 'https://broker-a.example:8889/' ('http://' for loopback)",
    )
    token_file: Path | None = Field(
        default=None,
        description="file holding the bearer token (mode 0600 or 0400: a file "
        "its group or others may read is refused)",
    )
    token_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the bearer token",
    )
    ca_file: Path | None = Field(
        default=None,
        description="CA certificates (PEM) that verify the upstream's certificate "
        "(unset: the system's CAs)",
    )
    client_cert: Path | None = Field(
        default=None,
        description="client certificate (PEM) for upstreams that map certificates "
        "to customers",
    )
    client_key: Path | None = Field(
        default=None,
        description="private key of client_cert (PEM; unset: in client_cert)",
    )
    read_size: Size = Field(
        default=4096,
        ge=1,
        le=1 << 20,
        description="bytes per request (at most the upstream's max_request_bytes)",
    )
    wait: Duration = Field(
        default=10.0,
        le=300,
        description="seconds each request may wait upstream for its bytes "
        "(?wait=; at most the upstream's max_wait, and below watchdog)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("set token_file or token_env, not both")
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        if self.token_file is not None or self.token_env is not None:
            for url in self.urls:
                if url.startswith("http://") and not _is_loopback(url):
                    raise ValueError(
                        f"{url!r}: a bearer token is not sent in clear text over "
                        "the network; use https:// (http:// only on loopback)"
                    )
        watchdog = self.watchdog if self.watchdog is not None else 30.0
        if self.wait >= watchdog:
            raise ValueError(
                f"wait ({self.wait:g} s) must be shorter than the watchdog "
                f"({watchdog:g} s), or every slow answer is a stall"
            )
        return self


def file_problem(path: Path) -> str | None:
    """
    Why a secret file at ``path`` must not be trusted: group or other access.

    Raises:
        OSError: the file cannot be examined.
    """
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        who = "others" if mode & 0o007 else "its group"
        return f"{path} is accessible to {who} (mode {mode:04o}): chmod 600 it"
    return None


def read_token(config: HttpSourceConfig) -> str | None:
    """
    The bearer token from ``token_file`` or ``token_env`` (None: no token).

    Raises:
        SourceError: the file is unsafe or unreadable, the variable unset, or
            the token empty or not printable (the message never holds it).
    """
    if config.token_file is not None:
        path = config.token_file
        try:
            problem = file_problem(path)
            if problem is not None:
                raise SourceError(f"token_file {problem}")
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise SourceError(f"cannot read token_file {path}: {reason}") from None
        where = f"token_file {path}"
    elif config.token_env is not None:
        token = os.environ.get(config.token_env, "").strip()
        where = f"environment variable {config.token_env}"
    else:
        return None
    if not token:
        raise SourceError(f"{where} holds no token")
    if not token.isprintable() or not token.isascii() or " " in token:
        raise SourceError(f"{where}: the token must be printable ASCII, no spaces")
    return token


def tls_context(config: HttpSourceConfig) -> ssl.SSLContext:
    """
    Verification on, with the system's CAs or ``ca_file``; the client
    certificate if configured.

    Raises:
        SourceError: a file is missing, unsafe or not PEM.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(f"cannot load ca_file {config.ca_file}: {exc}") from None
    if config.client_cert is not None:
        key = config.client_key
        try:
            if key is not None:
                problem = file_problem(key)
                if problem is not None:
                    raise SourceError(f"client_key {problem}")
            context.load_cert_chain(config.client_cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(
                f"cannot load client_cert {config.client_cert}: {exc}"
            ) from None
    return context


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


class HttpSource:
    """
    Reads blocks from the first reachable endpoint.

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
        self.name = config.name
        self.priority = config.priority
        self.credit = config.credit
        self._config = config
        self._budget = failover_budget(config.watchdog)
        self._endpoints: Endpoints[str] = Endpoints(
            config.urls,
            backoff_max=config.endpoint_backoff,
            failback=config.failback,
            rng=rng,
        )
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._first: bytes = b""
        self._backpressure = 0
        self._log = log.bind(source=config.name, kind=self.kind)

    @property
    def nominal_rate(self) -> float | None:
        return None

    @property
    def endpoints(self) -> Endpoints[str]:
        return self._endpoints

    async def __aenter__(self) -> Self:
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
        try:
            _, self._first = await open_first(
                self._endpoints, self._probe, config.connect_timeout, self._log
            )
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._first = b""
        await self._close()
        closed(self._endpoints, exc, self._log)

    async def _close(self) -> None:
        session, self._session = self._session, None
        self._token = None
        if session is not None:
            await session.close()

    async def _probe(self, endpoint: str) -> bytes:
        """
        One request without waiting: the bytes, or b"" when the upstream
        answered with backpressure (it works, and is busy).
        """
        try:
            return await self._request(endpoint, 0.0)
        except Backpressure as exc:
            self._log.info(
                "upstream_backpressure",
                endpoint=endpoint,
                reason=str(exc),
                seconds=exc.seconds,
            )
            return b""

    async def read(self) -> bytes:
        # The watchdog runs from about here: the failover budget does too.
        deadline = time.monotonic() + self._budget
        await self._failback()
        first, self._first = self._first, b""
        if first:
            return first
        while True:
            endpoint = self._endpoints.current
            if endpoint is None or self._session is None:
                raise SourceError("http source is not open")
            try:
                data = await self._request(endpoint, self._config.wait)
            except SourceError as exc:
                _, first = await fail_over(
                    self._endpoints,
                    endpoint,
                    exc,
                    self._probe,
                    self._config.connect_timeout,
                    deadline,
                    self._log,
                )
                if first:
                    return first
                continue  # the new endpoint answered with backpressure
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
                continue
            self._endpoints.delivered(time.monotonic())
            return data

    async def _failback(self) -> None:
        endpoints = self._endpoints
        preferred = endpoints.failback_due(time.monotonic())
        if preferred is None:
            return
        result = await try_connect(preferred, self._probe, self._config.connect_timeout)
        if isinstance(result, ConnectFailed):
            delay = endpoints.failed(
                preferred, time.monotonic(), result.reason, at_least=result.retry_after
            )
            self._log.info(
                "upstream_failback_failed",
                endpoint=preferred,
                reason=result.reason,
                retry_in=round(delay, 3),
            )
            return
        previous = endpoints.current
        endpoints.connected(preferred, time.monotonic())
        self._first = result
        self._log.warning(
            "upstream_failover",
            endpoint=preferred,
            previous=str(previous),
            reason="failback to a preferred endpoint",
            failovers=endpoints.failovers,
        )

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

    def details(self) -> dict[str, Any]:
        details = self._endpoints.details(time.monotonic())
        details["backpressure_waits"] = self._backpressure
        return details
