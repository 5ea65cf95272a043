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

Restarts without a refused connection (`broker.inherited`, `broker.handover`):
a listen address that matches an inherited listening socket (systemd, or the
broker this one took over from) is served on that socket instead of bound; an
inherited Unix socket is neither unlinked nor re-created. `listening`,
`release_listeners` and `hand_over` give the listeners and the connections to
a successor; `adopt` serves a connection a predecessor handed over. A
connection closed because its client did not read its replies in time for a
hand-over counts in ``closed`` as ``handover_unflushed``.
"""

import asyncio
import contextlib
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

import structlog

from broker.configbase import ListenAddress
from broker.errors import BrokerError
from broker.inherited import Inherited, InheritedListeners, Listening
from broker.ratelog import CountedLog
from broker.status import BrokerView, SinkStatus
from broker.withdrawal import Withdrawals
from sinks.egd.config import EgdSinkConfig
from sinks.egd.connection import EgdConnection
from sinks.egd.handoff import Carried, HandoverState

HANDOVER_BATCH: Final = 250
"""Connections per hand-over message: SCM_RIGHTS takes at most 253 fds."""
HANDOVER_BATCH_BYTES: Final = 32 * 1024
"""Carried request bytes per hand-over message, so that one message stays
well within a Unix socket's send buffer."""
FLUSH_WAIT: Final = 5.0
"""Seconds a held client has to read its replies before it is closed."""
POLL: Final = 0.01

SendConnections = Callable[[list[tuple[int, Carried]]], Awaitable[bool]]
"""Sends fds with their state to the successor; True once it has them."""


class HandoverFailed(BrokerError):
    """
    The successor did not take the connections.
    """


log = structlog.get_logger("ebroker.egd")

CLOSE_QUIET = 0.05
"""Seconds a client must have sent nothing before a stopping broker closes
its connection. Far above a request's transit time through a local balancer,
far below the pause of a guest between two reads."""


class EgdSink:
    """
    EGD over TCP and Unix sockets.
    """

    kind = "egd"

    def __init__(
        self,
        config: EgdSinkConfig,
        broker: BrokerView,
        *,
        inherited: InheritedListeners | None = None,
    ) -> None:
        self.config = config
        self.pool = broker.pool
        self.accounts = broker.accounts
        self.withdrawals = Withdrawals(broker.pool, broker.accounts)
        self.name = config.name or "egd"
        self._state_dir = broker.state_dir
        self._inherited = inherited
        self._servers: list[asyncio.Server] = []
        self._listening: list[tuple[str, bool]] = []
        """Per server: the configured address it serves, and whether its Unix
        socket file is ours to remove."""
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
        for address in self.config.listen:
            where = address.resolved(self._state_dir)
            taken = self._inherited.take(self.name, where) if self._inherited else None
            try:
                server, owned = await self._listen(where, taken)
            except OSError as exc:
                await self.shutdown(0)
                raise BrokerError(
                    f"sink {self.name!r}: cannot listen on {where}: "
                    f"{exc.strerror or exc}"
                ) from exc
            self._servers.append(server)
            self._listening.append((str(where), owned))
        log.info("sink_listening", sink=self.name, addresses=self._addresses)

    async def _listen(
        self, where: ListenAddress, taken: Inherited | None
    ) -> tuple[asyncio.Server, bool]:
        # An inherited socket is served as it is: already bound, already
        # listening (connections may be waiting in its backlog), and a Unix
        # one keeps its file, mode and owner.
        loop = asyncio.get_running_loop()
        backlog = self.config.backlog
        if where.scheme == "tcp":
            if taken is not None:
                server = await loop.create_server(
                    lambda: EgdConnection(self), sock=taken.sock, backlog=backlog
                )
            else:
                server = await loop.create_server(
                    lambda: EgdConnection(self),
                    where.host,
                    where.port,
                    reuse_address=True,
                    backlog=backlog,
                )
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                self._addresses.append(f"tcp://{shown}:{port}")
            return server, False
        path = Path(where.path)
        if taken is not None:
            server = await loop.create_unix_server(
                lambda: EgdConnection(self), sock=taken.sock, backlog=backlog
            )
            owned = taken.owned
        else:
            self._prepare_unix_path(path)
            server = await loop.create_unix_server(
                lambda: EgdConnection(self), str(path), backlog=backlog
            )
            os.chmod(path, int(self.config.socket_mode, 8))
            owned = True
        if owned:
            self._unix_paths.append((path, os.stat(path).st_ino))
        self._addresses.append(f"unix:{path}")
        return server, owned

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

    # ---- takeover (broker.handover) ----

    def listening(self) -> list[Listening]:
        """
        Every listener this sink serves on, for a successor to take over.
        """
        return [
            Listening(self.name, address, server.sockets[0], owned)
            for server, (address, owned) in zip(
                self._servers, self._listening, strict=True
            )
            if server.sockets
        ]

    def release_listeners(self) -> None:
        """
        Close this process's copies of the listeners (and leave their Unix
        socket files) to the successor that holds copies of them: the
        sockets stay open there, with connection attempts queueing in their
        backlog until it accepts them. A connection accepted just before is
        still admitted, and `hand_over` takes it along.
        """
        self._unix_paths.clear()
        for server in self._servers:
            server.close()

    async def hand_over(self, send: SendConnections, *, wait: float) -> int:
        """
        Hand every connection over to a successor through ``send``.

        Each connection stops reading (what its client sends waits in the
        kernel), answers what it has read and flushes its replies; then a
        duplicate of its fd and its `Carried` state go to ``send`` in batches
        of at most `HANDOVER_BATCH` connections and `HANDOVER_BATCH_BYTES`
        carried bytes, and once ``send`` returns True the connection lets go
        of its fd without a FIN or an RST. Connections still waiting after
        ``wait`` seconds (a blocking read on an empty pool) stop answering and
        carry their unanswered requests; a client that has not read its
        replies `FLUSH_WAIT` seconds later is closed. Call it after
        `release_listeners`.

        Returns:
            How many connections were handed over.

        Raises:
            HandoverFailed: ``send`` failed; the connections not yet handed
                over are served here again.
        """
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + wait
        give_up_at = stop_at + FLUSH_WAIT
        seen: set[EgdConnection] = set()
        held: set[EgdConnection] = set()
        stopped: set[EgdConnection] = set()
        handed = 0
        try:
            while True:
                # Connections accepted before the listeners closed may still
                # be arriving in the first turns.
                for connection in self._connections - seen:
                    seen.add(connection)
                    held.add(connection)
                    connection.hold()
                if not held:
                    await asyncio.sleep(0)
                    if self._connections <= seen:
                        break
                    continue
                ready = []
                for connection in list(held):
                    state = connection.handover_state()
                    if state is HandoverState.CLOSING:
                        held.discard(connection)
                    elif state is HandoverState.READY:
                        ready.append(connection)
                handed += await self._send_ready(ready, send, held)
                if ready:
                    continue
                now = loop.time()
                if now >= give_up_at:
                    for connection in held:
                        self.count_closed(
                            "handover_unflushed",
                            peer=connection.peer,
                            detail="replies still unread at hand-over",
                        )
                        connection.close()
                    held.clear()
                    continue
                if now >= stop_at and not held <= stopped:
                    late = held - stopped
                    stopped |= late
                    await asyncio.gather(
                        *(connection.stop_for_handover() for connection in late)
                    )
                    continue
                await self._wait_for_change(
                    min(give_up_at if now >= stop_at else stop_at, now + POLL)
                )
        except BaseException:
            for connection in held:
                connection.unhold()
            raise
        self._accepting = False
        return handed

    async def _wait_for_change(self, until: float) -> None:
        # Idle connections announce it; a flushed write buffer does not, so
        # the wait also ends at `POLL` intervals.
        self.idle_changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                await self.idle_changed.wait()

    async def _send_ready(
        self,
        ready: list[EgdConnection],
        send: SendConnections,
        held: set[EgdConnection],
    ) -> int:
        # Copies are made a batch at a time: 10,000 connections must not
        # need 10,000 more fds at once.
        handed = 0
        batch: list[tuple[EgdConnection, int, Carried]] = []
        size = 0
        try:
            for connection in ready:
                try:
                    fd, carried = connection.copy_for_handover()
                except OSError as exc:
                    log.error(
                        "handover_copy_failed",
                        sink=self.name,
                        peer=connection.peer,
                        error=str(exc),
                    )
                    held.discard(connection)
                    connection.close()
                    continue
                if batch and (
                    len(batch) == HANDOVER_BATCH
                    or size + len(carried.pending) > HANDOVER_BATCH_BYTES
                ):
                    full, batch, size = batch, [], 0
                    handed += await self._send_batch(full, send, held)
                batch.append((connection, fd, carried))
                size += len(carried.pending)
            if batch:
                full, batch = batch, []
                handed += await self._send_batch(full, send, held)
        finally:
            for _, fd, _ in batch:
                os.close(fd)
        return handed

    async def _send_batch(
        self,
        batch: list[tuple[EgdConnection, int, Carried]],
        send: SendConnections,
        held: set[EgdConnection],
    ) -> int:
        try:
            taken = await send([(fd, carried) for _, fd, carried in batch])
        finally:
            for _, fd, _ in batch:
                os.close(fd)
        if not taken:
            raise HandoverFailed("the successor did not take the connections")
        for connection, _, _ in batch:
            held.discard(connection)
            connection.handed_over()
        return len(batch)

    async def adopt(self, sock: socket.socket, carried: Carried) -> None:
        """
        Serve a connection a previous broker handed over, as the same client,
        with the requests it carried first.
        """
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: _Adopted(self, carried), sock)

    def pre_shutdown(self) -> None:
        self._accepting = False
        for server in self._servers:
            server.close()

    async def shutdown(self, timeout: float) -> None:
        self.pre_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Each connection closes on its own, in a pause of its client: a
        # guest between two requests loses nothing. One that never pauses
        # keeps being served until the grace runs out.
        while self._connections and (left := deadline - loop.time()) > 0:
            silent_since = time.monotonic() - CLOSE_QUIET
            for connection in list(self._connections):
                if connection.quiet_since(silent_since):
                    connection.close()
            await asyncio.sleep(min(CLOSE_QUIET / 2, left))
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


class _Adopted(EgdConnection):
    """
    A connection from a previous broker: its carried bytes are parsed before
    anything read from the socket.
    """

    __slots__ = ("_carried_input",)

    def __init__(self, sink: EgdSink, carried: Carried) -> None:
        super().__init__(sink, adopted=carried.peer, shown=carried.shown)
        self._carried_input = carried.pending

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        pending, self._carried_input = self._carried_input, b""
        if pending:
            self.data_received(pending)


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
