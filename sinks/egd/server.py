"""
The EGD sink's asyncio side: listeners and one protocol object per connection.

Theory of operation
-------------------
`EgdSink` binds every listen address and is the registry of its connections.
Each `EgdConnection` feeds received bytes to the sans-I/O parser
(`sinks.egd.wire`), queues the requests, and answers them strictly in order
from one worker task, because a 0x02 reply has no length prefix: bytes for a
later request must not start before an earlier blocking read is complete.

- A blocking read (0x02) streams bytes as the pool releases them and waits for
  as long as it takes: QEMU never re-sends a request lost with its connection,
  so an empty pool never closes a connection.
- Back-pressure, both ways. Requests are parsed out of the input only while the
  queued ones stand for less than ``max_pending_bytes`` (reply bytes owed, or
  data held for a 0x03); past that the transport stops reading and TCP pushes
  back on the client. While the client does not read its replies (the
  transport called ``pause_writing``), the worker writes nothing and so
  withdraws nothing from the pool for it; the transport buffer is bounded by
  ``max_buffered_output`` plus one reply.
- EOF from the client ends the connection: requests still queued are answered
  only as far as the pool and the socket allow without waiting, a pool wait in
  progress is cancelled (the pool takes back whatever it had set aside, so
  nothing is counted as served), and then the connection closes. EOF cannot tell
  a half-close from a client that went away, and a departed client must not go
  on taking output (protocol spec §3, "Closed peers").
- An unknown command byte cannot be skipped (no framing): the requests before it
  are answered, then that connection alone is closed.
"""

import asyncio
import contextlib
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final, cast

import structlog

from broker.configbase import ListenAddress
from broker.errors import BrokerError, PoolClosedError
from broker.pool import EntropyPool
from broker.status import SinkStatus
from sinks.egd.config import EgdSinkConfig
from sinks.egd.wire import (
    NEED_DATA,
    BlockingData,
    ConnectionClosed,
    EgdServerConnection,
    GetLevel,
    GetPid,
    LevelReply,
    NonBlockingReply,
    PidReply,
    ReadBlocking,
    ReadNonBlocking,
    RemoteProtocolError,
    Reply,
    Request,
    WriteEntropy,
)

log = structlog.get_logger()

CLOSE_TIMEOUT: Final = 1.0
"""Seconds a closing connection gets to flush its replies at shutdown before it
is aborted (a client that stopped reading would otherwise hold it open)."""
_PROBE_TIMEOUT: Final = 1.0
_PID_TEXT_MAX: Final = 8


class _Close:
    """
    Queued behind the requests that came before a protocol error.
    """


_CLOSE: Final = _Close()


def _cost(request: Request) -> int:
    """
    What a queued request stands for: reply bytes owed or data held, whichever
    is larger. Every request costs something, so a flood of 0x00 is bounded too.
    """
    if isinstance(request, ReadBlocking):
        return max(request.count, 2)
    if isinstance(request, ReadNonBlocking):
        return request.count + 1
    if isinstance(request, WriteEntropy):
        return 4 + len(request.data)
    if isinstance(request, GetLevel):
        return 4
    return 1 + _PID_TEXT_MAX


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(ListenAddress("tcp", host=str(peer[0]), port=int(peer[1])))
    # Unix clients rarely bind a name; their credentials say who they are.
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(socket, "SO_PEERCRED"):
        with contextlib.suppress(OSError):
            raw = sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            pid, uid, gid = struct.unpack("3i", raw)
            return f"unix:pid={pid},uid={uid},gid={gid}"
    return f"unix:{peer}" if peer else "unix"


class EgdConnection(asyncio.Protocol):
    """
    One client connection: parses, queues and answers its requests in order.
    """

    def __init__(self, sink: "EgdSink") -> None:
        self._sink = sink
        self._pool = sink.pool
        self._config = sink.config
        self._wire = EgdServerConnection()
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | _Close] = deque()
        self._queued_cost = 0
        self._parsing = True
        self._reading_paused = False
        self._eof = False
        self._busy = False
        self._wakeup = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        # Waits for the request being answered end at this loop time (None:
        # never). EOF sets it to "now", so only what needs no waiting is done.
        self._deadline: float | None = None
        self._scope: asyncio.Timeout | None = None
        self._task: asyncio.Task[None] | None = None
        self._admitted = False
        self._lost = asyncio.Event()
        self.peer = "unknown"
        self.requests = 0
        self.bytes_served = 0
        self._log: Any = log

    # ---- asyncio.Protocol: shuttle bytes, nothing else -------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are one.
        self._transport = cast(asyncio.Transport, transport)
        self.peer = _describe_peer(transport)
        self._log = log.bind(sink=self._sink.name, peer=self.peer)
        if not self._sink.admit(self):
            self._log.warning(
                "client_refused",
                reason="max_connections reached",
                max_connections=self._config.max_connections,
            )
            transport.abort()
            return
        self._admitted = True
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # The peer may already be gone; the first write will tell.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._transport.set_write_buffer_limits(high=self._config.max_buffered_output)
        self._task = self._sink.spawn(self._serve(), name=f"egd {self.peer}")
        self._log.info("client_connected")

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        self._lost.set()
        if not self._admitted:
            return
        if self._task is not None and not self._task.done():
            # Cancelling a pool wait hands its bytes back: never counted as served.
            self._task.cancel(msg="client connection lost")
        dropped = len([item for item in self._queue if not isinstance(item, _Close)])
        self._log.info(
            "client_disconnected",
            requests=self.requests,
            bytes_served=self.bytes_served,
            dropped_requests=dropped + int(self._busy),
            error=repr(exc) if exc else None,
        )
        self._sink.forget(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if not self._parsing:
            return
        try:
            self._wire.receive_data(data)
        except RemoteProtocolError as exc:
            self._protocol_error(exc)
            return
        self._parse()

    def eof_received(self) -> bool:
        if self._parsing:
            self._wire.receive_data(b"")
            self._parse()
        # Keep the transport: queued replies may still go out; we close it.
        return True

    # ---- requests ------------------------------------------------------------------

    def _parse(self) -> None:
        """
        Move requests from the parser to the queue while the queue is below its
        bound, then pause or resume reading to match.
        """
        limit = self._config.max_pending_bytes
        while self._parsing and self._queued_cost < limit:
            try:
                event = self._wire.next_event()
            except RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is NEED_DATA:
                break
            if isinstance(event, ConnectionClosed):
                self._on_eof()
                break
            self._queue.append(event)
            self._queued_cost += _cost(event)
            self.requests += 1
            self._sink.requests += 1
            self._wakeup.set()
        # After EOF or an error there is nothing more to read.
        self._set_reading(paused=self._queued_cost >= limit or not self._parsing)

    def _set_reading(self, *, paused: bool) -> None:
        transport = self._transport
        if paused == self._reading_paused or transport is None:
            return
        if transport.is_closing():
            return
        self._reading_paused = paused
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        self._log.warning("protocol_error", error=str(exc), queued=len(self._queue))
        self._parsing = False
        # Whatever follows the bad byte is noise; stop taking it in.
        self._set_reading(paused=True)
        self._queue.append(_CLOSE)
        self._wakeup.set()

    def _on_eof(self) -> None:
        self._parsing = False
        self._eof = True
        self._deadline = asyncio.get_running_loop().time()
        if self._scope is not None:
            self._scope.reschedule(self._deadline)
        self._wakeup.set()

    async def _next_request(self) -> Request | None:
        while not self._queue:
            if self._eof:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self._queue.popleft()
        return None if isinstance(item, _Close) else item

    async def _serve(self) -> None:
        try:
            while (request := await self._next_request()) is not None:
                self._busy = True
                try:
                    async with asyncio.timeout_at(self._deadline) as scope:
                        self._scope = scope
                        await self._answer(request)
                finally:
                    self._scope = None
                    self._busy = False
                self._queued_cost -= _cost(request)
                if not self._queue:
                    self._sink.idle_changed()
                self._parse()
        except TimeoutError:
            # The client sent EOF while a reply had to wait: drop the rest.
            pass
        except PoolClosedError:
            # The broker is stopping; the connection closes below.
            pass
        except Exception:
            # One connection's failure must never reach the server or the others.
            self._log.exception("connection_failed")
        finally:
            self._busy = False
            self.close()
            self._sink.idle_changed()

    async def _answer(self, request: Request) -> None:
        match request:
            case GetLevel():
                await self._writable.wait()
                self._write(LevelReply(self._pool.level * 8))
            case ReadNonBlocking(count=count):
                await self._writable.wait()
                data = self._pool.read_nowait(count)
                self._write(NonBlockingReply(data), served=len(data))
            case ReadBlocking(count=count):
                await self._stream(count)
            case WriteEntropy(bits_claimed=bits, data=data):
                self._absorb(bits, data)
            case GetPid():
                await self._writable.wait()
                self._write(PidReply(os.getpid()))

    async def _stream(self, count: int) -> None:
        remaining = count
        while remaining:
            # Withdraw only what can be written now: a client that stopped
            # reading must not make us take output from the pool for it.
            await self._writable.wait()
            # All at once when the pool has it; otherwise chunk-sized turns, so
            # blocked connections share scarce output round-robin.
            if self._pool.level >= remaining:
                wanted = remaining
            else:
                wanted = min(remaining, self._config.chunk_size)
            data = await self._pool.read(wanted, partial=True, key=self)
            self._write(BlockingData(data), served=len(data))
            remaining -= len(data)

    def _absorb(self, bits_claimed: int, data: bytes) -> None:
        if not data:
            return
        if self._config.trust_writes:
            self._pool.add(data, min(bits_claimed / len(data), 8.0))
        else:
            self._pool.mix(data)

    def _write(self, reply: Reply, served: int = 0) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            # connection_lost is on its way and cancels this worker.
            return
        transport.write(self._wire.send(reply))
        self.bytes_served += served
        self._sink.bytes_out += served

    # ---- for the sink ------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """
        True when no request is queued or being answered.
        """
        return not self._busy and not self._queue

    @property
    def write_buffer_size(self) -> int:
        """
        Reply bytes waiting in the transport's user-space buffer.
        """
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def close(self) -> None:
        """
        Close after flushing replies already written.
        """
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        """
        Close now, dropping unsent replies.
        """
        if self._transport is not None:
            self._transport.abort()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def wait_lost(self) -> None:
        """
        Return once the transport reported the connection gone.
        """
        await self._lost.wait()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task


class EgdSink:
    """
    EGD over TCP and Unix sockets; implements `broker.status.Sink`.
    """

    kind = "egd"

    def __init__(
        self, config: EgdSinkConfig, pool: EntropyPool, state_dir: Path
    ) -> None:
        self.config = config
        self.pool = pool
        self.name = config.name or "egd"
        self._state_dir = state_dir
        self._servers: list[asyncio.AbstractServer] = []
        self._addresses: list[str] = []
        self._unix_sockets: list[tuple[Path, int]] = []
        self._connections: set[EgdConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = True
        self._idle = asyncio.Event()
        self._log = log.bind(sink=self.name)
        self.connections_total = 0
        self.bytes_out = 0
        self.requests = 0

    # ---- connection registry ----------------------------------------------------------

    def admit(self, connection: EgdConnection) -> bool:
        """
        Register a new connection, unless shutting down or at max_connections.
        """
        if not self._accepting:
            return False
        if len(self._connections) >= self.config.max_connections:
            return False
        self._connections.add(connection)
        self.connections_total += 1
        return True

    def forget(self, connection: EgdConnection) -> None:
        self._connections.discard(connection)
        self.idle_changed()

    def idle_changed(self) -> None:
        """
        A connection finished its queued requests or went away.
        """
        self._idle.set()

    def spawn(
        self, coroutine: Coroutine[Any, Any, None], name: str
    ) -> asyncio.Task[None]:
        """
        Start a task and keep a strong reference to it until it is done.
        """
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def connections(self) -> tuple[EgdConnection, ...]:
        return tuple(self._connections)

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """
        Bind every listen address and start accepting.

        Raises:
            BrokerError: an address cannot be bound; nothing stays bound.
        """
        try:
            for address in self.config.listen:
                await self._listen(address.resolved(self._state_dir))
        except BaseException:
            await self._close_listeners()
            raise
        self._log.info("sink_started", addresses=self._addresses)

    async def _listen(self, where: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        try:
            if where.scheme == "tcp":
                server = await loop.create_server(
                    self._new_connection, where.host, where.port
                )
                self._servers.append(server)
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    self._addresses.append(str(ListenAddress("tcp", host, port)))
                return
            path = Path(where.path)
            await self._clear_stale_socket(path)
            server = await loop.create_unix_server(self._new_connection, str(path))
            self._servers.append(server)
            self._unix_sockets.append((path, os.lstat(path).st_ino))
            os.chmod(path, int(self.config.socket_mode, 8))
            self._addresses.append(str(ListenAddress("unix", path=str(path))))
        except OSError as exc:
            raise BrokerError(
                f"sink {self.name!r}: cannot listen on {where}: {exc.strerror or exc}"
            ) from exc

    def _new_connection(self) -> EgdConnection:
        return EgdConnection(self)

    async def _clear_stale_socket(self, path: Path) -> None:
        """
        Remove a socket left by a broker that did not shut down cleanly; refuse
        to touch anything else, or a socket someone is still listening on.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise BrokerError(
                f"sink {self.name!r}: {path} exists and is not a socket; "
                "not removing it"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT):
                await asyncio.get_running_loop().sock_connect(probe, str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens: stale. (Gone meanwhile: nothing to remove.)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        except TimeoutError:
            # A listener that does not accept is still a listener.
            pass
        finally:
            probe.close()
        raise BrokerError(f"sink {self.name!r}: {path} is in use by a running process")

    def bound_addresses(self) -> list[str]:
        """
        Addresses actually bound, with real ports, e.g. ``tcp://127.0.0.1:43211``
        and ``unix:/var/lib/ebroker/egd.sock``; empty before `start`.
        """
        return list(self._addresses)

    def pre_shutdown(self) -> None:
        """
        Stop accepting; connections in flight keep being served.
        """
        self._accepting = False
        for server in self._servers:
            server.close()

    async def shutdown(self, timeout: float) -> None:
        """
        Stop accepting, let queued requests (blocking reads above all) finish for
        up to ``timeout`` s, then close every connection and remove the Unix
        socket files this sink created.
        """
        self.pre_shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not all(connection.idle for connection in self._connections):
                    self._idle.clear()
                    await self._idle.wait()
        connections = list(self._connections)
        for connection in connections:
            task = connection.task
            if task is not None:
                task.cancel(msg="sink shutting down")
            connection.close()
        if connections:
            waits = [connection.wait_lost() for connection in connections]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await asyncio.gather(*waits)
            for connection in connections:
                if not connection.lost:
                    connection.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_listeners()
        self._log.info("sink_stopped")

    async def _close_listeners(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await server.wait_closed()
        self._servers.clear()
        for path, inode in self._unix_sockets:
            # Only the socket we created: another broker may have taken the path.
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_ino == inode:
                    path.unlink()
        self._unix_sockets.clear()

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
