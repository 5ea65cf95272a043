"""
One EGD client connection: the asyncio protocol, and a worker task while a
request waits.

Each connection parses requests with `EgdServerConnection` and answers them
strictly in order. A request that can be answered at once (the pool holds the
bytes, the client's limits allow them, the client has room for the reply) is
answered inside the protocol callback, through the core's fast path
(`broker.withdrawal.Withdrawals.now`), and the replies of one callback go out
in one write. The first request that must wait starts a worker task, which
answers it and everything queued behind it and ends when the queue is empty.
A blocking read (0x02) streams bytes as the pool releases them and never gives
up on an empty pool, because QEMU cannot recover a request lost with its
connection.

Per connection, input is bounded by ``max_pending_bytes`` and
`MAX_QUEUED_REQUESTS` (reading pauses: TCP pushes back, nothing is dropped),
unread output by ``max_buffered_output``, and work per callback of the loop by
the turn budget; `sinks.egd.flow` has the arithmetic.

TCP connections pass their first bytes through a `ProxyGate`: only a trusted
proxy may send a PROXY header, and its connections are identified by the client
address in it. A trusted proxy's connection is identified only once the header
is complete, within `HEADER_TIMEOUT`; any other peer is identified at once by
its own address, so a client that stays silent for life (ekeyd-egd-linux on a
current kernel) is never timed out.

``max_connections_per_client`` counts the client's open connections to every
EGD sink of the broker (``Client.connections`` lives in the shared accounts),
so one host cannot multiply its share by connecting to each listener.

Counting: a connection turned away before it is served (sink full, shutting
down, client denied or over its cap, a bad or missing PROXY header from a
trusted proxy) is a refusal (``EgdSink.refused``); a connection that was
served and is then closed for what its peer sent (a malformed request, a PROXY
header from an untrusted peer) is counted in ``EgdSink.closed`` instead, so
the two never count the same connection.

Once a connection is closed (by its peer, a protocol error, or the sink's
shutdown) it is never served again: its worker stops, queued requests are
dropped, and nothing more is withdrawn for it. A read cut short by the close
gives its bytes back to the pool (a pending ``pool.read``) or at least its
quota back to the client's accounts (bytes already withdrawn but not
written); none of them counts in ``bytes_out``.

A takeover (`broker.handover`) moves a live connection to the next broker
without closing it: `hold` stops reading, the connection answers what it read,
and `copy_for_handover` gives a duplicate fd plus who the client is and its
unanswered request bytes (`sinks.egd.handoff.Carried`); `handed_over` then
drops this process's fd without a FIN. The successor constructs the
connection with ``adopted=`` that identity, which skips the PROXY gate.
"""

import asyncio
import contextlib
import functools
import os
import socket
import time
from typing import Any, Final, Protocol, cast

import structlog

from broker.accounts import AccessDenied, Accounts, Client, Denied, Peer
from broker.errors import PoolClosedError
from broker.pool import EntropyPool
from broker.withdrawal import Withdrawals
from sinks.egd.config import EgdSinkConfig
from sinks.egd.flow import OutputBound, TurnBudget, kernel_queued, kernel_unread
from sinks.egd.handoff import MAX_CARRIED, Carried, HandoverState, encode_request
from sinks.egd.peers import peer_text, unix_peer
from sinks.egd.requests import CLOSE, MAX_QUEUED_REQUESTS, Close, reply_size, requested
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
from sinks.proxy import GateOutcome, ProxyGate, ProxyRefused

log = structlog.get_logger("ebroker.egd")

EOF_GRACE: Final = 1.0
CLOSE_GRACE: Final = 5.0
HEADER_TIMEOUT: Final = 10.0
"""Seconds a trusted proxy has to send its PROXY header (haproxy sends it at once)."""


class ConnectionHost(Protocol):
    """
    What a connection needs from the sink that accepted it: the sink's
    settings, the pool and accounts it serves from, its registry and counters.
    """

    name: str
    config: EgdSinkConfig
    pool: EntropyPool
    accounts: Accounts
    withdrawals: Withdrawals
    idle_changed: asyncio.Event
    connections_total: int
    bytes_out: int
    requests: int

    def admit(self, connection: "EgdConnection") -> str | None: ...

    def refuse(self, reason: str, *, peer: str, detail: str) -> None: ...

    def count_closed(self, reason: str, *, peer: str, detail: str) -> None: ...

    def forget(self, connection: "EgdConnection") -> None: ...


class EgdConnection(asyncio.Protocol):
    """
    One client connection.
    """

    __slots__ = (
        "_answering",
        "_busy",
        "_client",
        "_closing",
        "_eof_deadline",
        "_gate",
        "_gate_saw_bytes",
        "_header_timer",
        "_heard_at",
        "_holding",
        "_left",
        "_output",
        "_peer",
        "_pending_bytes",
        "_queue",
        "_reading_paused",
        "_served",
        "_sink",
        "_stopped",
        "_transport",
        "_turn",
        "_who",
        "_wire",
        "_worker",
    )

    def __init__(
        self, sink: ConnectionHost, *, adopted: Peer | None = None, shown: str = ""
    ) -> None:
        """
        Args:
            sink: the sink that accepted (or adopted) the connection.
            adopted: for a connection a previous broker handed over, who the
                client is, as that broker established it (its PROXY header
                cannot be read twice); None for a freshly accepted one.
            shown: how logs show an adopted client.
        """
        self._sink = sink
        self._wire = EgdServerConnection()
        self._transport: asyncio.Transport | None = None
        # A list, not a deque: most connections never queue more than one
        # request, and an empty deque costs 600 bytes per connection.
        self._queue: list[Event | Close] = []
        self._output = OutputBound(sink.config.max_buffered_output)
        self._turn = TurnBudget()
        self._pending_bytes = 0
        self._reading_paused = False
        self._closing = False
        self._stopped = False
        self._busy = False
        self._eof_deadline: float | None = None
        self._answering: asyncio.Timeout | None = None
        self._client: Client | None = None
        self._worker: asyncio.Task[None] | None = None
        self._gate: ProxyGate | None = None
        self._gate_saw_bytes = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._peer = shown or "unix"
        self._who = adopted
        self._holding = False
        self._left = 0
        self._heard_at = 0.0
        """When the client last sent bytes (`time.monotonic`)."""
        self._served: list[tuple[int, float]] = []
        """Pool bytes withdrawn for replies not yet handed to the transport,
        with their grant times: refunded if the write cannot happen."""

    @property
    def _log(self) -> Any:
        # Bound on use: a logger per connection would cost every idle guest.
        bound = log.bind(sink=self._sink.name, peer=self._peer)
        if self._client is not None:
            bound = bound.bind(customer=self._client.customer_id)
        return bound

    # ---- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        peer = transport.get_extra_info("peername") or transport.get_extra_info(
            "sockname"
        )
        if self._who is None:
            self._peer = peer_text(peer)
        refusal = self._sink.admit(self)
        if refusal is not None:
            self._refuse(refusal, f"{refusal} (sink not admitting)")
            return
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        self._output.attach(
            transport.get_write_buffer_size,
            functools.partial(kernel_queued, fd) if fd >= 0 else _nothing_queued,
        )
        limit = self._sink.config.max_buffered_output
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        tcp = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        if tcp:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._who is not None:
            # Identified by the broker that accepted it: no second PROXY gate.
            self._start(self._who)
            return
        if not tcp:
            self._start(unix_peer(sock))
            return
        host, port = str(peer[0]), int(peer[1])
        self._gate = ProxyGate(host, port, self._sink.config.trusted_proxies)
        if self._gate.trusted:
            # Who the client is comes in the header; wait for it, not forever.
            self._header_timer = asyncio.get_running_loop().call_later(
                HEADER_TIMEOUT, self._header_timed_out
            )
        else:
            self._start(Peer("tcp", ip=host))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._stop("client went away")
        self._cancel_header_timer()
        if self._client is not None:
            self._client.connections -= 1
            self._client = None
        self._output.close()
        self._sink.forget(self)
        self._log.debug("client_disconnected", error=str(exc) if exc else None)

    def pause_writing(self) -> None:
        self._output.pause_writing()

    def resume_writing(self) -> None:
        self._output.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._heard_at = time.monotonic()
        if self._gate is not None:
            self._gate_saw_bytes = True
            outcome = self._through_gate(data)
            if outcome is None:
                return
            data = outcome.rest
        try:
            self._wire.receive_data(data)
        except (RemoteProtocolError, LocalProtocolError) as exc:
            self._protocol_error(exc)
        else:
            self._parse()
        self._answer_ready()

    def eof_received(self) -> bool | None:
        if self._gate is not None:
            if not self._gate_saw_bytes:
                # Connected and left without a word (a port probe): not a refusal.
                self._closing = True
                self._cancel_header_timer()
                return False
            outcome = self._through_gate(b"")
            if outcome is None or self._closing:
                return False
            self._wire.receive_data(outcome.rest)
            self._parse()
        # EOF cannot tell a half-close (`nc -q1` after its last request) from a
        # client that went away. Queued requests still get answered if the pool
        # can do so within EOF_GRACE seconds; then the connection closes, so a
        # departed client's blocked read does not hold output forever.
        self._eof_deadline = asyncio.get_running_loop().time() + EOF_GRACE
        if self._answering is not None:
            self._answering.reschedule(self._eof_deadline)
        self._queue.append(CLOSE)
        self._answer_ready()
        return True

    # ---- admission ----------------------------------------------------------------

    def _through_gate(self, data: bytes) -> GateOutcome | None:
        # The gate's outcome once it has seen enough; None while it needs more
        # or after it refused the connection.
        gate = self._gate
        if gate is None:
            raise AssertionError("no PROXY gate on this connection")
        try:
            outcome = gate.receive_data(data)
        except ProxyRefused as exc:
            self._gate = None
            self._refuse(exc.reason, str(exc))
            return None
        if outcome is None:
            return None
        self._gate = None
        self._cancel_header_timer()
        if outcome.proxied:
            # From here on the client is who the proxy says it is.
            self._peer = peer_text((outcome.host, outcome.port))
        if self._client is None and not self._start(Peer("tcp", ip=outcome.host)):
            return None
        return outcome

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._gate is not None and not self._closing:
            self._gate = None
            self._refuse("header_timeout", "no PROXY header in time")

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _start(self, peer: Peer) -> bool:
        # Identify the client and start serving it; False if it was refused.
        identity = self._sink.accounts.identify(peer)
        if isinstance(identity, Denied):
            self._refuse("denied", identity.reason)
            return False
        if identity.connections >= self._sink.config.max_connections_per_client:
            self._refuse("max_connections_per_client", "too many from this client")
            return False
        self._client = identity
        self._who = peer
        identity.connections += 1
        self._sink.connections_total += 1
        self._log.debug("client_connected")
        return True

    def _refuse(self, reason: str, detail: str) -> None:
        if self._client is None:
            self._sink.refuse(reason, peer=self._peer, detail=detail)
        else:
            # Already counted in connections_total (an untrusted peer is
            # served at once): closed, not refused.
            self._sink.count_closed(reason, peer=self._peer, detail=detail)
        self._closing = True
        self._stop("connection refused")
        self._cancel_header_timer()
        if self._transport is not None:
            # Nothing was read or promised: no reply to flush.
            self._transport.abort()

    # ---- requests -----------------------------------------------------------------
    #
    # Requests are answered in the order they arrived. While no worker runs,
    # `_answer_ready` answers them inside the protocol callback, for as long
    # as each can be answered at once (the pool holds the bytes, the limits
    # allow them, the client has room for them), and writes the replies of
    # one turn in one write. The first request that must wait starts the
    # worker task, which answers it and everything after it, and ends once
    # the queue is empty.

    def _parse(self) -> None:
        limit = self._sink.config.max_pending_bytes
        queue = self._queue
        wire = self._wire
        parsed = 0
        while (
            not self._closing
            and self._pending_bytes < limit
            and len(queue) < MAX_QUEUED_REQUESTS
        ):
            try:
                event = wire.next_event()
            except (RemoteProtocolError, LocalProtocolError) as exc:
                self._protocol_error(exc)
                break
            if event is NEED_DATA:
                break
            self._pending_bytes += requested(event)
            queue.append(event)
            parsed += 1
        self._sink.requests += parsed
        self._flow_input()

    def _flow_input(self) -> None:
        # Stop reading a client that has its fill queued; resume once answered.
        transport = self._transport
        if transport is None or self._holding:
            return
        full = (
            self._pending_bytes >= self._sink.config.max_pending_bytes
            or len(self._queue) >= MAX_QUEUED_REQUESTS
        )
        if full and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not full and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _protocol_error(self, exc: Exception) -> None:
        self._sink.count_closed("malformed_request", peer=self._peer, detail=str(exc))
        self._closing = True
        self._queue.append(CLOSE)

    def _answer_ready(self) -> None:
        # The synchronous fast path; see the section comment.
        if self._worker is not None or self._stopped or self._client is None:
            return
        self._turn.reset()  # a new callback of the loop: a new turn
        self._answer_batch()
        if self._queue and not self._stopped:
            self._worker = asyncio.create_task(self._serve(), name="egd-connection")
        elif not self._queue:
            self._sink.idle_changed.set()

    def _answer_batch(self) -> None:
        # Answer queued requests in order while each can be answered at once
        # and the turn lasts; their replies go out in one write.
        queue = self._queue
        turn = self._turn
        replies: list[bytes] = []
        written = 0
        while queue:
            item = queue[0]
            if isinstance(item, Close):
                self._send(replies)
                self._close_transport()
                return
            if not turn.room_for(reply_size(item)):
                turn.spend()  # the worker goes on after a yield
                break
            reply = self._answer_now(item, written)
            if reply is None:
                break
            del queue[0]
            self._pending_bytes -= requested(item)
            turn.answered()
            if reply:
                replies.append(reply)
                written += len(reply)
                turn.wrote(len(reply))
            if not queue and (self._reading_paused or self._wire.buffered):
                self._parse()
        self._send(replies, counted=True)

    def _answer_now(self, event: Event, pending: int = 0) -> bytes | None:
        # The reply to ``event`` if it can be given at once (b"" when it has
        # none), else None. ``pending`` reply bytes are not yet written.
        if isinstance(event, ReadBlocking):
            count = event.count
            if not count:
                return b""
            if not self._output.has_room(pending + count):
                return None
            taken = self._sink.withdrawals.now(
                self._require_client(), count, least=count
            )
            if taken is None or not taken.data:
                return None
            self._served.append((len(taken.data), taken.granted_at))
            return taken.data
        if isinstance(event, WriteEntropy):
            self._absorb(event.bits, event.data)
            return b""
        if not self._output.has_room(pending + reply_size(event)):
            return None
        if isinstance(event, ReadNonBlocking):
            taken = self._sink.withdrawals.now(
                self._require_client(), event.count, least=0
            )
            if taken is None:
                return None
            if taken.data:
                self._served.append((len(taken.data), taken.granted_at))
            return encode_nonblocking(taken.data)
        return self._reply_now(event)

    def _reply_now(self, event: Event) -> bytes:
        # The reply to a request that never waits for the pool.
        if isinstance(event, GetLevel):
            return encode_level(self._sink.pool.level * 8)
        if isinstance(event, GetPid):
            return encode_pid(os.getpid())
        if isinstance(event, WriteEntropy):
            self._absorb(event.bits, event.data)
        return b""

    async def _serve(self) -> None:
        # The worker: answers the queue, waiting where a request must, and
        # ends when the queue is empty.
        queue = self._queue
        try:
            while queue and not self._stopped:
                await self._turn.yield_if_spent()
                if self._gone():
                    return
                self._answer_batch()
                if not queue or self._gone() or self._turn.spent:
                    continue
                item = queue[0]
                if isinstance(item, Close):  # the batch closes on it first
                    self._close_transport()
                    return
                self._busy = True
                self._left = 0
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
                del queue[0]
                self._pending_bytes -= requested(item)
                self._turn.answered()
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
        finally:
            self._busy = False
            if self._worker is asyncio.current_task():
                self._worker = None
            self._sink.idle_changed.set()

    async def _answer(self, event: Event) -> None:
        await self._output.room()
        if self._stopped:
            return
        reply = self._answer_now(event)
        if reply is not None:
            self._send([reply])
            return
        withdrawals = self._sink.withdrawals
        client = self._require_client()
        if isinstance(event, ReadNonBlocking):
            # Limits shorten a non-blocking read; EGD has no way to say why.
            data, granted_at = await withdrawals.take_allowed(client, event.count)
            if data:
                self._served.append((len(data), granted_at))
            self._send([encode_nonblocking(data)])
            return
        if not isinstance(event, ReadBlocking):
            # Only reads wait for anything but room, and room was just made.
            self._send([self._reply_now(event)])
            return
        # Limits delay a blocking read: the client simply sees the allowed rate.
        # What is left is kept on the connection: a hand-over carries it on.
        self._left = event.count
        while self._left:
            await self._output.room()
            if self._gone():
                return
            # What is ready now first, as a new request would get it; only
            # then a place in the pool's queue, a chunk per turn.
            taken = withdrawals.now(client, self._left, least=1)
            if taken is not None and taken.data:
                data, granted_at = taken.data, taken.granted_at
            else:
                data, granted_at = await withdrawals.stream_piece(
                    client, min(self._left, self._sink.config.chunk_size)
                )
            self._served.append((len(data), granted_at))
            if not self._send([data]):
                return
            self._left -= len(data)
            if self._left:
                await self._turn.yield_if_spent()

    def _send(self, replies: list[bytes], *, counted: bool = False) -> bool:
        # Hand replies to the transport in one write; False (and the pool
        # bytes in them refunded to the client) if the connection is closing.
        # ``counted``: the turn budget already holds their size.
        served, self._served = self._served, []
        if not replies:
            return True
        data = replies[0] if len(replies) == 1 else b"".join(replies)
        transport = self._transport
        if self._stopped or transport is None or transport.is_closing():
            client = self._client
            if client is not None:
                for count, granted_at in served:
                    self._sink.withdrawals.unserved(client, count, granted_at)
            return False
        transport.write(data)
        self._output.wrote(len(data))
        if not counted:
            self._turn.wrote(len(data))
        self._sink.bytes_out += len(data)
        return True

    def _gone(self) -> bool:
        # Re-read after an await (the connection may have stopped meanwhile).
        return self._stopped

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

    def _stop(self, why: str) -> None:
        # Serve nothing more: drop queued requests and stop the worker. A
        # worker waiting on the pool gives its bytes back as it is cancelled.
        if self._stopped:
            return
        self._stopped = True
        self._queue.clear()
        self._pending_bytes = 0
        worker = self._worker
        if worker is not None and worker is not asyncio.current_task():
            worker.cancel(msg=why)

    def _close_transport(self) -> None:
        self._closing = True
        self._stop("connection closed")
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        # close() waits for the write buffer to drain; a client that stopped
        # reading would hold its connection slot forever.
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    # ---- hand-over to a successor broker (sinks.egd.handoff) -----------------------

    def hold(self) -> None:
        """
        Stop reading for good: what the client sends from now on waits in the
        kernel for the broker this connection is handed to. What was read is
        still answered.
        """
        self._holding = True
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def unhold(self) -> None:
        """
        Serve on after a hand-over that did not happen.
        """
        self._holding = False
        if self._stopped and not self._closing:
            self._stopped = False  # `stop_for_handover` kept the queue
        self._flow_input()
        self._answer_ready()

    def handover_state(self) -> HandoverState:
        """
        Whether the connection can be handed over now (see `HandoverState`).
        """
        if self._closing or self._transport is None:
            return HandoverState.CLOSING
        if self._client is None:
            # Still behind the PROXY gate: hand over only one that sent nothing.
            return HandoverState.BUSY if self._gate_saw_bytes else HandoverState.READY
        if not self._stopped and not self.idle:
            # (Stopped without closing: `stop_for_handover` kept the rest.)
            return HandoverState.BUSY
        if self._transport.get_write_buffer_size():
            return HandoverState.UNFLUSHED
        return HandoverState.READY

    async def stop_for_handover(self) -> None:
        """
        Stop answering (a read the pool cannot serve now, a delay the limits
        impose) and keep what is unanswered for the successor; bytes withdrawn
        and not yet written go back to the pool or the client's quota.
        """
        if self._client is None or self._closing:
            return
        queue = [item for item in self._queue if not isinstance(item, Close)]
        if self._busy and self._left and queue and isinstance(queue[0], ReadBlocking):
            queue[0] = ReadBlocking(self._left)
        self._stopped = True
        worker = self._worker
        if worker is not None:
            worker.cancel(msg="handed over")
            await asyncio.gather(worker, return_exceptions=True)
        self._queue[:] = queue
        self._pending_bytes = sum(map(requested, queue))

    def copy_for_handover(self) -> tuple[int, Carried]:
        """
        A duplicate of the connection's fd, and what the successor needs to
        serve this client as the same client: who it is, and the requests it
        sent that were not answered (re-encoded, then the unparsed bytes).

        Raises:
            OSError: the fd cannot be duplicated (out of fds), or the client
                has more than `MAX_CARRIED` unanswered bytes.
        """
        unanswered = b"".join(
            encode_request(item) for item in self._queue if not isinstance(item, Close)
        )
        pending = unanswered + self._wire.unparsed()
        if len(pending) > MAX_CARRIED:
            raise OSError(f"{len(pending)} unanswered request bytes: too many to carry")
        transport = self._transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            raise OSError("connection has no socket")
        fd = os.dup(sock.fileno())
        return fd, Carried(
            sink=self._sink.name,
            peer=self._who if self._client is not None else None,
            shown=self._peer,
            pending=pending,
        )

    def handed_over(self) -> None:
        """
        The successor has the connection: let go of it without a FIN or an
        RST (the kernel socket lives on in the successor's copy of the fd).
        """
        self._closing = True
        self._stop("handed over")
        self._cancel_header_timer()
        if self._transport is not None:
            self._transport.abort()

    # ---- shutdown and inspection --------------------------------------------------

    @property
    def idle(self) -> bool:
        """
        True when nothing is queued or being answered.
        """
        return not self._queue and not self._busy

    def close(self) -> None:
        self._close_transport()

    def quiet_since(self, moment: float) -> bool:
        """
        True when this connection may be closed without losing a request: it
        has answered everything it read, nothing waits unread in its socket,
        and the client sent nothing after ``moment`` (`time.monotonic`).

        EGD has no goodbye, so a close always races a client's next request;
        a client silent for a while is most likely between requests, where
        the close costs it nothing.
        """
        if self._closing or not self.idle or self._heard_at > moment:
            return False
        transport = self._transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        return sock is None or kernel_unread(sock.fileno()) == 0

    @property
    def peer(self) -> str:
        """
        The client as logs show it.
        """
        return self._peer

    @property
    def reading_paused(self) -> bool:
        """
        True while the client has ``max_pending_bytes`` requested and
        unanswered (or `MAX_QUEUED_REQUESTS` queued), so its further requests
        are left in the socket.
        """
        return self._reading_paused

    @property
    def writing_paused(self) -> bool:
        """
        True while the client holds ``max_buffered_output`` bytes unread:
        nothing is withdrawn from the pool for it until it reads.
        """
        return self._output.paused or self._output.unread() >= self._output.limit

    def unread_output(self) -> int:
        """
        Reply bytes handed to this client and not yet read (user space plus
        the kernel's send queue).
        """
        return self._output.unread()

    def write_buffer_size(self) -> int:
        """
        Reply bytes queued in user space for this client.
        """
        return self._transport.get_write_buffer_size() if self._transport else 0


def _nothing_queued() -> int:
    return 0
