"""
The EGD sink's asyncio side: listeners, one protocol object per connection.

Each connection parses requests with `EgdServerConnection` and answers them
strictly in order from one worker task. A blocking read (0x02) streams bytes as
the pool releases them and never gives up on an empty pool, because QEMU cannot
recover a request lost with its connection. Back-pressure in both directions:
when a client has more than ``max_pending_bytes`` requested but unanswered, the
server stops reading from it (TCP pushes back; nothing is dropped), and while
the client does not read its replies (``pause_writing``), the worker withdraws
nothing from the pool for it.
"""

import asyncio
import contextlib
import os
import socket
import stat
import struct
from collections import deque
from pathlib import Path
from typing import cast

import structlog

from broker.accounts import AccessDenied, Accounts, Client, Denied, Peer
from broker.errors import BrokerError, PoolClosedError
from broker.pool import EntropyPool
from broker.status import SinkStatus
from sinks.egd.config import EgdSinkConfig
from sinks.egd.wire import (
    NEED_DATA,
    EgdServerConnection,
    Event,
    GetLevel,
    GetPid,
    LocalProtocolError,
    ReadBlocking,
    ReadNonBlocking,
    RemoteProtocolError,
    WriteEntropy,
    encode_level,
    encode_nonblocking,
    encode_pid,
)

log = structlog.get_logger("ebroker.egd")

EOF_GRACE = 1.0
CLOSE_GRACE = 5.0


class _Close:
    """
    Queued after the requests that preceded a protocol error.
    """


_CLOSE = _Close()


def _requested(event: Event) -> int:
    # What a queued request costs against max_pending_bytes: the reply it is
    # owed, or the data it carries, so a flood of any command is bounded.
    match event:
        case ReadBlocking(count=count) | ReadNonBlocking(count=count):
            return max(count, 1)
        case WriteEntropy(data=data):
            return 4 + len(data)
        case GetPid():
            return 12
        case _:
            return 4


class EgdConnection(asyncio.Protocol):
    """
    One client connection.
    """

    def __init__(self, sink: "EgdSink") -> None:
        self._sink = sink
        self._wire = EgdServerConnection()
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Event | _Close] = deque()
        self._wakeup = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._pending_bytes = 0
        self._reading_paused = False
        self._closing = False
        self._busy = False
        self._eof_deadline: float | None = None
        self._answering: asyncio.Timeout | None = None
        self._client: Client | None = None
        self._worker: asyncio.Task[None] | None = None
        self._log = log

    # ---- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        peer = transport.get_extra_info("peername") or transport.get_extra_info(
            "sockname"
        )
        self._log = log.bind(sink=self._sink.name, peer=_peer_text(peer))
        if not self._sink.admit(self):
            self._log.warning("connection_refused", reason="max_connections reached")
            transport.abort()
            return
        identity = self._sink.accounts.identify(_peer_of(transport))
        if isinstance(identity, Denied):
            self._log.warning("connection_refused", reason=identity.reason)
            self._closing = True
            transport.close()
            return
        if identity.connections >= self._sink.config.max_connections_per_client:
            self._log.warning("connection_refused", reason="too many from this client")
            self._closing = True
            transport.close()
            return
        self._client = identity
        identity.connections += 1
        self._log = self._log.bind(customer=identity.customer_id)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        limit = self._sink.config.max_buffered_output
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self._worker = asyncio.create_task(self._serve(), name="egd-connection")
        self._log.debug("client_connected")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._client is not None:
            self._client.connections -= 1
            self._client = None
        if self._worker is not None:
            self._worker.cancel(msg="client went away")
        self._writable.set()
        self._sink.forget(self)
        self._log.debug("client_disconnected", error=str(exc) if exc else None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._wire.receive_data(data)
        except (RemoteProtocolError, LocalProtocolError) as exc:
            self._protocol_error(exc)
            return
        self._parse()

    def eof_received(self) -> bool | None:
        # EOF cannot tell a half-close (`nc -q1` after its last request) from a
        # client that went away. Queued requests still get answered if the pool
        # can do so within EOF_GRACE seconds; then the connection closes, so a
        # departed client's blocked read does not hold output forever.
        self._eof_deadline = asyncio.get_running_loop().time() + EOF_GRACE
        if self._answering is not None:
            self._answering.reschedule(self._eof_deadline)
        self._queue.append(_CLOSE)
        self._wakeup.set()
        return True

    # ---- requests ----

    def _parse(self) -> None:
        limit = self._sink.config.max_pending_bytes
        while not self._closing and self._pending_bytes < limit:
            try:
                event = self._wire.next_event()
            except (RemoteProtocolError, LocalProtocolError) as exc:
                self._protocol_error(exc)
                return
            if event is NEED_DATA:
                break
            self._pending_bytes += _requested(event)
            self._queue.append(event)
            self._sink.requests += 1
        self._wakeup.set()
        transport = self._transport
        if transport is None:
            return
        if self._pending_bytes >= limit and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif self._pending_bytes < limit and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _protocol_error(self, exc: Exception) -> None:
        self._log.warning("protocol_error", error=str(exc))
        self._closing = True
        self._queue.append(_CLOSE)
        self._wakeup.set()

    async def _serve(self) -> None:
        try:
            while True:
                while not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                item = self._queue.popleft()
                if isinstance(item, _Close):
                    self._close_transport()
                    return
                self._busy = True
                try:
                    async with asyncio.timeout_at(self._eof_deadline) as answering:
                        self._answering = answering
                        await self._answer(item)
                except TimeoutError:
                    self._close_transport()
                    return
                finally:
                    self._answering = None
                self._busy = False
                self._pending_bytes -= _requested(item)
                if not self._queue:
                    self._sink.idle_changed.set()
                if self._reading_paused or self._wire.buffered:
                    self._parse()
        except (PoolClosedError, AccessDenied) as exc:
            self._log.info("connection_closed", reason=str(exc))
            self._close_transport()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one connection's failure never reaches the server
            self._log.error("connection_failed", exc_info=True)
            self._close_transport()

    async def _answer(self, event: Event) -> None:
        pool = self._sink.pool
        match event:
            case GetLevel():
                await self._writable.wait()
                self._write(encode_level(pool.level * 8))
            case ReadNonBlocking(count=count):
                await self._writable.wait()
                self._write(encode_nonblocking(await self._read_now(count)))
            case ReadBlocking(count=count):
                remaining = count
                while remaining:
                    await self._writable.wait()
                    data = await self._read_blocking(
                        min(remaining, self._sink.config.chunk_size)
                    )
                    self._write(data)
                    remaining -= len(data)
            case WriteEntropy(bits=bits, data=data):
                self._absorb(bits, data)
            case GetPid():
                await self._writable.wait()
                self._write(encode_pid(os.getpid()))

    async def _read_now(self, count: int) -> bytes:
        # Limits shorten a non-blocking read; EGD has no way to say why.
        accounts, client = self._sink.accounts, self._require_client()
        now = accounts.clock.time()
        grant = await accounts.grant(client, count, now)
        data = self._sink.pool.read_nowait(grant.granted)
        accounts.refund(client, grant.granted - len(data), now)
        return data

    async def _read_blocking(self, count: int) -> bytes:
        # Limits delay a blocking read: the client simply sees the allowed rate.
        accounts, client = self._sink.accounts, self._require_client()
        allowed = await accounts.wait_grant(client, count)
        # The grant's own time: a refund after midnight belongs to yesterday's quota.
        granted_at = client.last_seen
        data = b""
        try:
            data = await self._sink.pool.read(allowed, partial=True, key=client)
        finally:
            accounts.refund(client, allowed - len(data), granted_at)
        return data

    def _require_client(self) -> Client:
        if self._client is None:
            raise AccessDenied("connection was not identified")
        return self._client

    def _absorb(self, bits: int, data: bytes) -> None:
        if not data:
            return
        pool = self._sink.pool
        if self._sink.config.trust_writes:
            pool.add(data, min(bits / len(data), 8.0))
        else:
            pool.mix(data)

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(data)
        self._sink.bytes_out += len(data) if len(data) else 0

    def _close_transport(self) -> None:
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        # close() waits for the write buffer to drain; a client that stopped
        # reading would hold its connection slot forever.
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    # ---- shutdown ----

    @property
    def idle(self) -> bool:
        """
        True when nothing is queued or being answered.
        """
        return not self._queue and not self._busy

    def close(self) -> None:
        self._close_transport()

    @property
    def reading_paused(self) -> bool:
        """
        True while the client has ``max_pending_bytes`` requested and
        unanswered, so its further requests are left in the socket.
        """
        return self._reading_paused

    @property
    def writing_paused(self) -> bool:
        """
        True while the client does not read its replies: nothing is withdrawn
        from the pool for it until the transport resumes writing.
        """
        return not self._writable.is_set()

    def write_buffer_size(self) -> int:
        """
        Reply bytes queued in user space for this client.
        """
        return self._transport.get_write_buffer_size() if self._transport else 0


def _peer_of(transport: asyncio.Transport) -> Peer:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
        except OSError:
            return Peer("unix")
        _pid, uid, _gid = struct.unpack("3i", creds)
        return Peer("unix", uid=uid)
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) and peer else None
    return Peer("tcp", ip=host)


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "unix"


class EgdSink:
    """
    EGD over TCP and Unix sockets.
    """

    kind = "egd"

    def __init__(
        self,
        config: EgdSinkConfig,
        pool: EntropyPool,
        state_dir: Path,
        accounts: Accounts | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        # Without accounts every client is served without limits.
        self.accounts = accounts if accounts is not None else Accounts.unlimited()
        self.name = config.name or "egd"
        self._state_dir = state_dir
        self._servers: list[asyncio.Server] = []
        self._addresses: list[str] = []
        self._unix_paths: list[Path] = []
        self._connections: set[EgdConnection] = set()
        self._accepting = True
        self.idle_changed = asyncio.Event()
        """Set when a connection finished its queued requests (or went away)."""
        self.connections_total = 0
        self.bytes_out = 0
        self.requests = 0

    # ---- connection registry ----

    def admit(self, connection: EgdConnection) -> bool:
        if not self._accepting or len(self._connections) >= self.config.max_connections:
            return False
        self._connections.add(connection)
        self.connections_total += 1
        return True

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
                    )
                    for sock in server.sockets:
                        host, port = sock.getsockname()[:2]
                        shown = f"[{host}]" if ":" in host else host
                        self._addresses.append(f"tcp://{shown}:{port}")
                else:
                    path = Path(where.path)
                    self._prepare_unix_path(path)
                    server = await loop.create_unix_server(
                        lambda: EgdConnection(self), str(path)
                    )
                    os.chmod(path, int(self.config.socket_mode, 8))
                    self._unix_paths.append(path)
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
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
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
        )
