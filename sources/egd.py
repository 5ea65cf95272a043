"""
The ``egd`` source: another EGD server (another ebroker, ekeyd, any EGD
server) read with blocking requests, over TCP or a Unix socket, failing over
between a list of endpoints (`sources.upstream.driver`).

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
bytes than asked), the read fails over (`sources.upstream.failover`): the
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import structlog
from pydantic import BeforeValidator, Field, PlainSerializer

from broker.configtypes import MAX_UNIX_PATH
from broker.errors import SourceError
from sources.upstream.config import UpstreamConfigBase
from sources.upstream.driver import UpstreamSource
from sources.upstream.endpoints import blame
from sources.upstream.failover import os_reason

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


class EgdSource(UpstreamSource[EgdEndpoint, _Connection]):
    """
    Blocking reads of 255 bytes from an upstream EGD server, ``pipeline`` of
    them outstanding, on the first endpoint that answers.

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
        super().__init__(config, config.endpoints, log=log, rng=rng)
        self._window = config.pipeline * REQUEST_MAX

    async def _connect(self, endpoint: EgdEndpoint) -> _Connection:
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

    def _drop(self, connection: _Connection) -> None:
        connection.close()

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

    def _details(self) -> dict[str, Any]:
        return {"pipeline": self._window // REQUEST_MAX}
