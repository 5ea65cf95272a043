"""
Zero-downtime restart: a new broker takes the listeners and the EGD
connections over from the running one.

Usage
-----
Start the new broker (a new version, a changed config) on the same
``state_dir`` with ``--takeover``::

    ebroker serve --config /etc/ebroker.toml --takeover

It loads and validates its config first (a bad config exits non-zero and the
running broker never notices), then asks the broker holding the state
directory to hand over. Without a running broker it logs
``takeover_no_running_broker`` and starts normally, so ``--takeover`` can be
on every start. Start the new process next to the old one (a deploy script, a
second unit instance) and let the old one exit by itself: it exits 0 once it
has handed everything over and answered its HTTP requests in flight. A refused
or failed takeover exits non-zero with the reason on stderr
(``ebroker: takeover refused: ...``) and leaves the running broker serving.
The new broker's ``listeners.json`` appears in ``state_dir`` when it serves,
as on any start.

Under systemd, socket activation alone (`broker.inherited`) keeps the
listening sockets across ``systemctl restart``, but not the established EGD
connections; a takeover keeps both. The new process must run inside the
unit (e.g. started by ``ExecReload=``, detached, or by a helper the unit
runs) and the unit needs ``NotifyAccess=all``: the new broker sends
``MAINPID=`` with its pid as soon as it holds everything, so systemd follows
it when the old main process exits, and the old broker, once it has handed
over, sends no ``STOPPING=1``.

What a client sees
------------------
No connection attempt is refused: the listening sockets never close (they are
passed, not re-bound), and attempts made while neither broker accepts wait in
the kernel's backlog. An EGD client keeps its connection: what it sends during
the takeover waits in the kernel's receive queue and is answered by the new
broker, in order, with nothing lost or answered twice; it only waits longer
(the "gap": the old broker's close plus the new one's start, some tens of
milliseconds on loopback with the getrandom source; the new broker's pool
starts empty, so a slow source adds its start-up time). A read the old broker
cannot answer within `IDLE_WAIT` (empty pool, rate limit) goes over
unanswered, with what is left of it. An HTTP request in flight is answered by
the old broker, except one waiting in ``?wait=``, which gets 503 at once as
in any stop; an idle keep-alive connection is closed (HTTP clients reconnect,
to the new broker). Quota counters survive, as in any restart: the old broker
saves them before it releases the state directory, and the new one loads them
after. A broker that is starting, draining or closing refuses a takeover.

Log events: the old broker logs ``takeover_started``, then
``takeover_handed_over`` (``connections``) or ``takeover_refused`` /
``takeover_failed`` (``reason``/``error``); the new one logs
``takeover_received`` (listeners, connections, ``old_pid``) and
``takeover_adopted``, or ``takeover_no_running_broker``.

Protocol
--------
The running broker listens on ``state_dir/handover.sock`` (`SOCKET_NAME`), a
``SOCK_SEQPACKET`` Unix socket of mode 0600; it also checks the caller's uid
(``SO_PEERCRED``) and refuses any but its own. Every message is one datagram:
a JSON header (at most `MAX_HEADER` bytes) with fds attached (``SCM_RIGHTS``,
at most `MAX_FDS` per message).

1. new → old ``hello``: protocol version, pid, the new config's sinks (name
   and kind). The old broker refuses (``refused`` with a reason) a different
   uid, another takeover in progress, a broker not serving, a version it does
   not speak, or a sink whose kind changed under the same name.
2. old → new ``listeners`` (batches; each item: sink, configured address,
   whether the Unix socket file is the broker's to remove) and
   ``listeners_end``; new → old ``have_listeners``. Only sinks the new config
   still has are sent; the new broker matches them to its sinks by address
   (`broker.inherited`), and closes, with a warning, what none claims. Until
   ``have_listeners`` arrives nothing has changed in the old broker. Sinks
   are matched by name: a sink renamed in the new config is a new sink, whose
   address the new broker binds afresh once the old one has closed it (an
   attempt in between is refused), and whose clients the old broker answers
   and then disconnects.
3. The old broker closes its copies of the listeners (the sockets stay open in
   the new process) and hands each EGD connection over
   (`sinks.egd.server.EgdSink.hand_over`): ``connections`` batches (items:
   `sinks.egd.handoff.Carried`), each acknowledged by ``have`` before the old
   broker lets go of those fds. Connections to sinks the new config lacks are
   answered and closed by the old broker.
4. old → new ``end``; the old broker shuts down the rest (HTTP requests in
   flight are answered, sources stopped, counters saved) and releases the
   state directory's lock; the new broker waits for that (at most
   ``shutdown_grace`` + `RELEASE_MARGIN` s), starts on the inherited
   listeners and adopts the connections, feeding each one's carried bytes
   first.

This module is the running broker's side and the channel; `broker.takeover`
is the new broker's.
"""

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import structlog

from broker.errors import BrokerError
from broker.inherited import Listening
from broker.status import Sink
from sinks.egd.handoff import Carried
from sinks.egd.peers import peer_uid
from sinks.egd.server import EgdSink
from sinks.http.server import HttpSink

log = structlog.get_logger("ebroker.handover")

SOCKET_NAME: Final = "handover.sock"
VERSION: Final = 1
MAX_FDS: Final = 250
MAX_HEADER: Final = 256 * 1024
STEP_TIMEOUT: Final = 10.0
"""Seconds either side waits for the other's next message in the quick steps."""
RELEASE_MARGIN: Final = 15.0
"""Seconds beyond ``shutdown_grace`` the new broker waits for the old to exit."""
IDLE_WAIT: Final = 1.0
"""Seconds (at most ``shutdown_grace``) an EGD connection may take to answer
what it read before it stops and carries its unanswered requests over."""


class TakeoverRefused(BrokerError):
    """
    The running broker refused, or the takeover failed before the new broker
    held anything; the running broker serves on.
    """


class Channel:
    """
    One end of the control connection: JSON headers with fds attached.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        self._sock.close()

    def peer_uid(self) -> int:
        return peer_uid(self._sock)

    async def send(self, header: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """
        Raises:
            OSError: the other end is gone.
        """
        data = json.dumps(header).encode()
        if len(data) > MAX_HEADER or len(fds) > MAX_FDS:
            raise ValueError("hand-over message too large")
        while True:
            try:
                socket.send_fds(self._sock, [data], list(fds))
                return
            except BlockingIOError:
                await self._ready(self._loop.add_writer, self._loop.remove_writer)

    async def receive(
        self, timeout: float = STEP_TIMEOUT
    ) -> tuple[dict[str, Any], list[socket.socket]]:
        """
        The next header and the sockets attached to it.

        Raises:
            ConnectionError: the other end closed or sent garbage.
            TimeoutError: nothing within ``timeout`` s.
        """
        async with asyncio.timeout(timeout):
            data, fds, flags = await self._recv()
        sockets = [socket.socket(fileno=fd) for fd in fds]
        if not data:
            for sock in sockets:
                sock.close()
            raise ConnectionError("the other broker closed the hand-over")
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("truncated")
            header = json.loads(data)
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            for sock in sockets:
                sock.close()
            raise ConnectionError(f"bad hand-over message: {exc}") from None
        return header, sockets

    async def _recv(self) -> tuple[bytes, list[int], int]:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self._sock, MAX_HEADER, MAX_FDS, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
                continue
            return data, fds, flags

    async def _ready(
        self,
        add: Callable[..., None],
        remove: Callable[[int], object],
    ) -> None:
        ready = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = self._sock.fileno()
        add(fd, wake)
        try:
            await ready
        finally:
            remove(fd)


# ---- the running broker's side ------------------------------------------------------


@dataclass
class HandoverHooks:
    """
    What the listener asks of the broker that runs it.
    """

    serving: Callable[[], bool]
    """Whether a takeover may start now."""
    committed: Callable[[], None]
    """The successor holds the listeners: no way back."""
    done: Callable[[], None]
    """Everything that could go went to the successor: stop now (no drain)."""
    grace: float


class HandoverListener:
    """
    The control socket a successor connects to; serves one takeover at a time.
    """

    def __init__(
        self, state_dir: Path, sinks: Sequence[Sink], hooks: HandoverHooks
    ) -> None:
        self.path = state_dir / SOCKET_NAME
        self._sinks = sinks
        self._hooks = hooks
        self._sock: socket.socket | None = None
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        # The state directory's lock is ours: a socket file here is stale.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old_umask = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            sock.listen(4)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for task in list(self._tasks):
            if not task.done():
                task.cancel(msg="broker stopping")
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self) -> None:
        if self._sock is None:
            return
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("handover_accept_failed", error=str(exc))
            return
        task = asyncio.create_task(self._serve(Channel(conn)), name="handover")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, channel: Channel) -> None:
        try:
            await self._take_over(channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed takeover leaves this broker serving
            log.error("takeover_failed", error=str(exc), exc_info=True)
        finally:
            channel.close()

    async def _take_over(self, channel: Channel) -> None:
        hello, stray = await channel.receive()
        for sock in stray:
            sock.close()
        refusal = self._refusal(channel, hello)
        if refusal is not None:
            log.warning("takeover_refused", reason=refusal, pid=hello.get("pid"))
            await channel.send({"type": "refused", "reason": refusal})
            return
        self._busy = True
        try:
            await self._hand_over(channel, hello)
        finally:
            self._busy = False

    def _refusal(self, channel: Channel, hello: dict[str, Any]) -> str | None:
        uid = channel.peer_uid()
        if uid != os.geteuid():
            return f"uid {uid} may not take over a broker running as uid {os.geteuid()}"
        if hello.get("type") != "hello" or hello.get("version") != VERSION:
            return f"hand-over protocol {hello.get('version')!r} is not {VERSION}"
        if self._busy:
            return "another takeover is in progress"
        if not self._hooks.serving():
            return "the running broker is not serving (starting or stopping)"
        wanted = _wanted(hello)
        if wanted is None:
            return "malformed sink list"
        for sink in self._sinks:
            kind = wanted.get(sink.name)
            if kind is not None and kind != sink.kind:
                return (
                    f"sink {sink.name!r} is {sink.kind} here but {kind} in the new "
                    "config; give the new sink another name"
                )
        return None

    async def _hand_over(self, channel: Channel, hello: dict[str, Any]) -> None:
        wanted = _wanted(hello) or {}
        kept = [sink for sink in self._sinks if sink.name in wanted]
        listening = [entry for sink in kept for entry in _listening(sink)]
        log.info(
            "takeover_started",
            pid=hello.get("pid"),
            listeners=[f"{entry.sink} {entry.address}" for entry in listening],
        )
        for start in range(0, len(listening), MAX_FDS):
            batch = listening[start : start + MAX_FDS]
            await channel.send(
                {
                    "type": "listeners",
                    "items": [
                        {"sink": e.sink, "address": e.address, "owned": e.owned}
                        for e in batch
                    ],
                },
                [entry.sock.fileno() for entry in batch],
            )
        await channel.send({"type": "listeners_end"})
        reply, stray = await channel.receive()
        for sock in stray:
            sock.close()
        if reply.get("type") != "have_listeners":
            raise ConnectionError(f"successor answered {reply.get('type')!r}")
        # From here on the successor holds every listener: no way back, and
        # whatever happens next this broker stops.
        self._hooks.committed()
        try:
            await self._hand_over_connections(channel, wanted)
        finally:
            self._hooks.done()

    async def _hand_over_connections(
        self, channel: Channel, wanted: dict[str, str]
    ) -> None:
        for sink in self._sinks:
            if isinstance(sink, EgdSink | HttpSink) and sink.name in wanted:
                sink.release_listeners()
            else:
                # Not in the new config: its clients stay here until answered.
                sink.pre_shutdown()
        sending = asyncio.Lock()

        async def send(items: list[tuple[int, Carried]]) -> bool:
            async with sending:
                try:
                    await channel.send(
                        {
                            "type": "connections",
                            "items": [carried.to_json() for _, carried in items],
                        },
                        [fd for fd, _ in items],
                    )
                    reply, stray = await channel.receive()
                except (OSError, TimeoutError) as exc:
                    log.error("takeover_send_failed", error=str(exc))
                    return False
                for sock in stray:
                    sock.close()
                return reply.get("type") == "have"

        wait = min(self._hooks.grace, IDLE_WAIT)
        egd = [
            sink
            for sink in self._sinks
            if isinstance(sink, EgdSink) and sink.name in wanted
        ]
        results = await asyncio.gather(
            *(sink.hand_over(send, wait=wait) for sink in egd), return_exceptions=True
        )
        handed = 0
        for sink, result in zip(egd, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "takeover_connections_kept", sink=sink.name, error=str(result)
                )
            else:
                handed += result
        await channel.send({"type": "end", "pid": os.getpid()})
        log.info("takeover_handed_over", connections=handed)


def _wanted(hello: dict[str, Any]) -> dict[str, str] | None:
    sinks = hello.get("sinks")
    if not isinstance(sinks, list):
        return None
    wanted: dict[str, str] = {}
    for entry in sinks:
        if not isinstance(entry, dict):
            return None
        name, kind = entry.get("name"), entry.get("kind")
        if not isinstance(name, str) or not isinstance(kind, str):
            return None
        wanted[name] = kind
    return wanted


def _listening(sink: Sink) -> list[Listening]:
    if isinstance(sink, EgdSink | HttpSink):
        return sink.listening()
    return []
