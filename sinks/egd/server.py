"""
The EGD sink's listeners and connection registry.

`EgdSink` binds every listen address (TCP and Unix, with the configured
``backlog``), admits connections up to ``max_connections`` and counts what it
turns away. Each connection is an `EgdConnection`.

Every accepted connection is counted exactly once, either in
``connections_total`` (identified and served) or in ``refused`` (closed before
it was served), so ``connections_total + sum(refused.values())`` is the number
of connections accepted. Refusal reasons:

==============================  ===============================================
``max_connections``             the sink holds ``max_connections`` already
``shutting_down``               the sink stopped admitting (`pre_shutdown`)
``denied``                      the accounts refused the client
``max_connections_per_client``  the client holds its cap of connections to
                                the broker's EGD sinks
``header_timeout``              a trusted proxy sent no PROXY header in time
``proxy_*``                     a trusted proxy's header was bad
                                (`sinks.proxy.gate` lists them)
==============================  ===============================================

A served connection closed for what its peer sent is counted in ``closed`` by
reason (``malformed_request``; ``proxy_untrusted`` when a peer that may not
send a PROXY header sends one), never in ``refused``. Refusals and closes are
logged through `RateLimitedLog`, so a flood of them makes a handful of lines;
the refusal counts are in `SinkStatus.refused`
(``ebroker_sink_refused_total{reason}``).
"""

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

import structlog

from broker.errors import BrokerError
from broker.ratelog import CountedLog
from broker.status import BrokerView, SinkStatus
from broker.withdrawal import Withdrawals
from sinks.egd.config import EgdSinkConfig
from sinks.egd.connection import EgdConnection

log = structlog.get_logger("ebroker.egd")


class EgdSink:
    """
    EGD over TCP and Unix sockets.
    """

    kind = "egd"

    def __init__(self, config: EgdSinkConfig, broker: BrokerView) -> None:
        self.config = config
        self.pool = broker.pool
        self.accounts = broker.accounts
        self.withdrawals = Withdrawals(broker.pool, broker.accounts)
        self.name = config.name or "egd"
        self._state_dir = broker.state_dir
        self._servers: list[asyncio.Server] = []
        self._addresses: list[str] = []
        self._unix_paths: list[tuple[Path, int]] = []
        """Unix sockets this sink bound, with their inodes."""
        self._connections: set[EgdConnection] = set()
        self._accepting = True
        self.idle_changed = asyncio.Event()
        """Set when a connection finished its queued requests (or went away)."""
        self.connections_total = 0
        """Connections identified and served; disjoint from `refused`."""
        self.bytes_out = 0
        self.requests = 0
        self._refused = CountedLog(log.bind(sink=self.name), "connection_refused")
        self._closed = CountedLog(log.bind(sink=self.name), "connection_dropped")

    # ---- connection registry ----

    def admit(self, connection: EgdConnection) -> str | None:
        """
        Take ``connection`` into the registry unless the sink is full or closing.

        Returns:
            None when admitted, else the refusal reason (``shutting_down`` or
            ``max_connections``).
        """
        if not self._accepting:
            return "shutting_down"
        if len(self._connections) >= self.config.max_connections:
            return "max_connections"
        self._connections.add(connection)
        return None

    def refuse(self, reason: str, *, peer: str, detail: str) -> None:
        """
        Count one connection closed before it was served, and log it
        (rate-limited).
        """
        self._refused(reason, peer=peer, detail=detail)

    def count_closed(self, reason: str, *, peer: str, detail: str) -> None:
        """
        Count one served connection closed for what its peer sent, and log
        it (rate-limited).
        """
        self._closed(reason, peer=peer, detail=detail)

    @property
    def refused(self) -> Mapping[str, int]:
        """
        Connections closed before they were served, by reason.
        """
        return self._refused.counts()

    @property
    def closed(self) -> Mapping[str, int]:
        """
        Served connections closed for what the peer sent, by reason.
        """
        return self._closed.counts()

    @property
    def accepting(self) -> bool:
        """
        False from `pre_shutdown` on: listeners are closed, new connections
        refused.
        """
        return self._accepting

    def connections(self) -> list[EgdConnection]:
        return list(self._connections)

    def forget(self, connection: EgdConnection) -> None:
        self._connections.discard(connection)
        self.idle_changed.set()

    # ---- lifecycle ----

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for address in self.config.listen:
            where = address.resolved(self._state_dir)
            try:
                if where.scheme == "tcp":
                    server = await loop.create_server(
                        lambda: EgdConnection(self),
                        where.host,
                        where.port,
                        reuse_address=True,
                        backlog=self.config.backlog,
                    )
                    for sock in server.sockets:
                        host, port = sock.getsockname()[:2]
                        shown = f"[{host}]" if ":" in host else host
                        self._addresses.append(f"tcp://{shown}:{port}")
                else:
                    path = Path(where.path)
                    self._prepare_unix_path(path)
                    server = await loop.create_unix_server(
                        lambda: EgdConnection(self),
                        str(path),
                        backlog=self.config.backlog,
                    )
                    os.chmod(path, int(self.config.socket_mode, 8))
                    self._unix_paths.append((path, os.stat(path).st_ino))
                    self._addresses.append(f"unix:{path}")
            except OSError as exc:
                await self.shutdown(0)
                raise BrokerError(
                    f"sink {self.name!r}: cannot listen on {where}: "
                    f"{exc.strerror or exc}"
                ) from exc
            self._servers.append(server)
        log.info("sink_listening", sink=self.name, addresses=self._addresses)

    @staticmethod
    def _prepare_unix_path(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(17, "exists and is not a socket", str(path))
        if _accepting(path):
            raise FileExistsError(
                17, "is the live socket of a running broker (stop it first)", str(path)
            )
        # A socket left behind by a broker that did not shut down cleanly.
        path.unlink()

    def bound_addresses(self) -> list[str]:
        return list(self._addresses)

    def pre_shutdown(self) -> None:
        self._accepting = False
        for server in self._servers:
            server.close()

    async def shutdown(self, timeout: float) -> None:
        self.pre_shutdown()
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while any(not conn.idle for conn in self._connections):
                        self.idle_changed.clear()
                        await self.idle_changed.wait()
        for connection in list(self._connections):
            connection.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        for path, inode in self._unix_paths:
            # Only our own socket: another broker may have bound the path since.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:
                    path.unlink()
        self._unix_paths.clear()

    def status(self) -> SinkStatus:
        return SinkStatus(
            name=self.name,
            kind=self.kind,
            addresses=tuple(self._addresses),
            connections=len(self._connections),
            connections_total=self.connections_total,
            bytes_out=self.bytes_out,
            requests=self.requests,
            refused=self.refused,
            closed=self.closed,
        )


def _accepting(path: Path) -> bool:
    # A socket file someone still listens on, as opposed to one left behind.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
