"""
The ``egd`` source: another EGD server (another ebroker, ekeyd, any EGD
server) read with blocking requests, over TCP or a Unix socket, failing over
between a list of endpoints (`sources.upstream`).

An open connects to the first endpoint that answers and asks it for its
entropy level (``00``): every EGD server answers that at once, so a port that
is not an EGD server (an HTTP port, a dead proxy) fails the open within
``connect_timeout`` instead of passing for a slow upstream. What the level
says is not used: the source credits what its own ``credit`` says.

Reads are blocking requests of 255 bytes (``02 FF``), ``pipeline`` of them
outstanding at once. A blocking reply has no length, so bytes are counted
against what was asked: more than was asked is a protocol error (the peer is
not an EGD server, or is broken), end of file with bytes owed is a failed
endpoint. Why pipelined: one request at a time costs a round trip per 255
bytes, which caps a 1 ms link at 255 KB/s and a 20 ms WAN link at 12 KB/s
whatever the upstream holds; a few outstanding requests keep the upstream
busy while replies travel. Why only a few: bytes an upstream has committed to
requests we abandon (failover, shutdown) are lost to everyone, and an upstream
ebroker bounds what one connection may have pending.

A read returns whatever has arrived (1 to 255 bytes times ``pipeline``) and
tops the requests up first; it has no time limit of its own (the supervisor's
watchdog cancels a read that delivers nothing, and the stall fails the
endpoint over at the next open).

When the endpoint in use fails during a read (end of file, a reset, more
bytes than asked), the read fails over (`sources.upstream.fail_over`): the
connection is dropped, the next endpoint is opened as an open would (the
entropy-level check, within ``connect_timeout``), and the read goes on there
with fresh requests. What the dead endpoint delivered was returned as it
arrived, and nothing of it is returned again; bytes a reset discarded before
they were read are lost, as on any reset.
"""

import asyncio
import os
import random
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Annotated, Any, Literal, Self

import structlog
from pydantic import BeforeValidator, Field, PlainSerializer

from broker.configtypes import MAX_UNIX_PATH
from broker.errors import SourceError
from sources.upstream import (
    ConnectFailed,
    Endpoints,
    UpstreamConfigBase,
    blame,
    closed,
    fail_over,
    failover_budget,
    open_first,
    os_reason,
    try_connect,
)

log = structlog.get_logger("ebroker.sources.egd")

REQUEST_MAX = 255
"""Most bytes one EGD read request may ask for."""


@dataclass(frozen=True, slots=True)
class EgdEndpoint:
    """
    One upstream EGD server: a TCP host and port, or a Unix socket path.
    """

    scheme: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


_TCP = re.compile(
    r"^(?:tcp://)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):"
    r"(?P<port>[0-9]{1,5})$"
)


def parse_egd_endpoint(value: object) -> EgdEndpoint:
    """
    Parse ``tcp://HOST:PORT`` (HOST a name, an IPv4 address or ``[IPv6]``),
    ``HOST:PORT``, or ``unix:/ABSOLUTE/PATH``.

    Raises:
        ValueError: the endpoint cannot be used; the message says why.
    """
    if isinstance(value, EgdEndpoint):
        return value
    if not isinstance(value, str):
        raise ValueError("an endpoint is a string like 'tcp://192.0.2.1:8888'")
    if value.startswith("unix:"):
        path = value.removeprefix("unix:").removeprefix("//")
        if not path.startswith("/"):
            raise ValueError(
                f"{value!r}: an upstream Unix socket needs an absolute path, "
                "e.g. 'unix:/run/ebroker/egd.sock'"
            )
        if "\0" in path:
            raise ValueError("a socket path cannot contain NUL")
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise ValueError(f"socket path longer than {MAX_UNIX_PATH} bytes")
        return EgdEndpoint("unix", path=path)
    match = _TCP.match(value)
    if match is None:
        raise ValueError(
            f"{value!r} is not an EGD endpoint (use 'tcp://HOST:PORT', "
            "'tcp://[::1]:8888' or 'unix:/PATH')"
        )
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: port {port} is out of range (1-65535)")
    return EgdEndpoint("tcp", host=match["v6"] or match["host"], port=port)


Endpoint = Annotated[
    EgdEndpoint, BeforeValidator(parse_egd_endpoint), PlainSerializer(str)
]


class EgdSourceConfig(UpstreamConfigBase):
    """
    ``kind = "egd"``: an upstream EGD server.
    """

    kind: Literal["egd"] = Field(description="source driver")
    endpoints: list[Endpoint] = Field(
        min_length=1,
        description="EGD servers in order of preference: 'tcp://HOST:PORT', "
        "'tcp://[V6]:PORT' or 'unix:/PATH'",
    )
    pipeline: int = Field(
        default=4,
        ge=1,
        le=16,
        description="blocking requests of 255 bytes kept outstanding, so that "
        "throughput is not one round trip per 255 bytes",
    )


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    owed: int = 0
    """Bytes asked for and not yet received."""

    def close(self) -> None:
        # abort, not close: requests still outstanding are abandoned anyway,
        # and a peer that stopped reading must not keep the socket lingering.
        self.writer.transport.abort()


async def _connect(endpoint: EgdEndpoint) -> _Connection:
    """
    Connect and check that an EGD server answers (the entropy level).
    """
    if endpoint.scheme == "unix":
        reader, writer = await asyncio.open_unix_connection(endpoint.path)
    else:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # A healthy upstream may be idle for long while our pool is full.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    connection = _Connection(reader, writer)
    try:
        writer.write(b"\x00")
        await reader.readexactly(4)
    except asyncio.IncompleteReadError:
        connection.close()
        raise SourceError(
            f"{endpoint} closed the connection before answering the entropy-level "
            "request (not an EGD server?)"
        ) from None
    except BaseException:
        connection.close()
        raise
    return connection


class EgdSource:
    """
    Reads blocks from the first reachable endpoint.

    Args:
        config: the source's settings.
        rng: jitter for endpoint backoff, a float in [0, 1).
    """

    kind = "egd"

    def __init__(
        self,
        config: EgdSourceConfig,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = config.name
        self.priority = config.priority
        self.credit = config.credit
        self._timeout = config.connect_timeout
        self._budget = failover_budget(config.watchdog)
        self._window = config.pipeline * REQUEST_MAX
        self._endpoints: Endpoints[EgdEndpoint] = Endpoints(
            config.endpoints,
            backoff_max=config.endpoint_backoff,
            failback=config.failback,
            rng=rng,
        )
        self._connection: _Connection | None = None
        self._log = log.bind(source=config.name, kind=self.kind)

    @property
    def nominal_rate(self) -> float | None:
        return None

    @property
    def endpoints(self) -> Endpoints[EgdEndpoint]:
        return self._endpoints

    async def __aenter__(self) -> Self:
        _, self._connection = await open_first(
            self._endpoints, _connect, self._timeout, self._log
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        closed(self._endpoints, exc, self._log)

    async def read(self) -> bytes:
        # The watchdog runs from about here: the failover budget does too.
        deadline = time.monotonic() + self._budget
        await self._failback()
        while True:
            connection = self._connection
            endpoint = self._endpoints.current
            if connection is None or endpoint is None:
                raise SourceError("egd source is not open")
            try:
                data = await self._receive(endpoint, connection)
            except SourceError as exc:
                # Closed before the failover awaits anything: a read
                # cancelled meanwhile leaves nothing open behind it.
                self._connection = None
                connection.close()
                _, self._connection = await fail_over(
                    self._endpoints,
                    endpoint,
                    exc,
                    _connect,
                    self._timeout,
                    deadline,
                    self._log,
                )
                continue
            self._endpoints.delivered(time.monotonic())
            return data

    async def _receive(self, endpoint: EgdEndpoint, connection: _Connection) -> bytes:
        """
        What has arrived from ``endpoint``, after topping the requests up.

        Raises:
            SourceError: the endpoint failed (end of file with bytes owed, a
                reset, more bytes than asked).
        """
        try:
            self._top_up(connection)
            # One byte more than owed: more than owed is a protocol error.
            data = await connection.reader.read(connection.owed + 1)
        except OSError as exc:
            raise SourceError(
                blame(endpoint, f"read failed: {os_reason(exc)}")
            ) from exc
        if not data:
            raise SourceError(
                f"{endpoint} closed the connection with {connection.owed} "
                "requested bytes unanswered"
            )
        if len(data) > connection.owed:
            raise SourceError(
                f"{endpoint} sent more bytes than were requested "
                "(not an EGD server, or a broken one)"
            )
        connection.owed -= len(data)
        return data

    def _top_up(self, connection: _Connection) -> None:
        requests = bytearray()
        while connection.owed + REQUEST_MAX <= self._window:
            requests += bytes((0x02, REQUEST_MAX))
            connection.owed += REQUEST_MAX
        if requests:
            connection.writer.write(bytes(requests))

    async def _failback(self) -> None:
        """
        Between two reads, move to a more preferred endpoint once
        ``failback`` is due and it answers; stay put if it does not.
        """
        endpoints = self._endpoints
        preferred = endpoints.failback_due(time.monotonic())
        if preferred is None:
            return
        result = await try_connect(preferred, _connect, self._timeout)
        if isinstance(result, ConnectFailed):
            delay = endpoints.failed(
                preferred, time.monotonic(), result.reason, at_least=result.retry_after
            )
            self._log.info(
                "upstream_failback_failed",
                endpoint=str(preferred),
                reason=result.reason,
                retry_in=round(delay, 3),
            )
            return
        previous = endpoints.current
        old, self._connection = self._connection, result
        if old is not None:
            old.close()
        endpoints.connected(preferred, time.monotonic())
        self._log.warning(
            "upstream_failover",
            endpoint=str(preferred),
            previous=str(previous),
            reason="failback to a preferred endpoint",
            failovers=endpoints.failovers,
        )

    def details(self) -> dict[str, Any]:
        details = self._endpoints.details(time.monotonic())
        details["pipeline"] = self._window // REQUEST_MAX
        return details
