"""
The new broker's side of a takeover (``ebroker serve --takeover``): ask the
running broker for its listeners and EGD connections, wait until it has let go
of the state directory, then serve them. `broker.handover` describes the whole
exchange and how to use it.
"""

import asyncio
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from broker.errors import BrokerError
from broker.handover import (
    RELEASE_MARGIN,
    SOCKET_NAME,
    STEP_TIMEOUT,
    VERSION,
    Channel,
    TakeoverRefused,
)
from broker.inherited import InheritedListeners
from broker.ownership import holder
from broker.sdnotify import Notifier
from broker.status import Sink
from sinks.egd.handoff import Carried
from sinks.egd.server import EgdSink

log = structlog.get_logger("ebroker.takeover")


@dataclass
class Takeover:
    """
    What the new broker received: listeners, connections, the old pid.
    """

    listeners: InheritedListeners
    connections: list[tuple[socket.socket, Carried]] = field(default_factory=list)
    old_pid: int | None = None

    def close(self) -> None:
        """
        Close whatever no sink took (a start-up that failed).
        """
        self.listeners.close_unclaimed()
        connections, self.connections = self.connections, []
        for sock, _ in connections:
            sock.close()


async def take_over(
    state_dir: Path, sinks: Iterable[tuple[str, str]], *, grace: float
) -> Takeover | None:
    """
    Ask the broker running on ``state_dir`` for its listeners and EGD
    connections, then wait until it has released the directory.

    Args:
        state_dir: the (absolute) state directory of both brokers.
        sinks: (name, kind) of every sink of the new config.
        grace: the old broker's ``shutdown_grace`` bound for its close.

    Returns:
        None when no broker runs there.

    Raises:
        TakeoverRefused: the running broker refused, or the hand-over broke
            before any listener arrived; it serves on.
        BrokerError: the running broker did not let go in time.
    """
    path = state_dir / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    try:
        # A Unix connect completes at once unless the backlog is full.
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        log.info("takeover_no_running_broker", state_dir=str(state_dir))
        return None
    except OSError as exc:
        sock.close()
        raise TakeoverRefused(
            f"takeover failed: cannot reach {path}: {exc.strerror or exc}"
        ) from exc
    channel = Channel(sock)
    takeover = Takeover(InheritedListeners())
    try:
        await _receive(channel, sinks, takeover, grace)
    except BaseException:
        takeover.close()
        raise
    finally:
        channel.close()
    # Under systemd (NotifyAccess=all) this process becomes the unit's main
    # process before the old one exits, so the unit lives on.
    Notifier().send(MAINPID=os.getpid(), STATUS="taking over")
    log.info(
        "takeover_received",
        old_pid=takeover.old_pid,
        listeners=len(takeover.listeners),
        connections=len(takeover.connections),
    )
    await wait_for_release(state_dir, grace + RELEASE_MARGIN)
    return takeover


async def _receive(
    channel: Channel,
    sinks: Iterable[tuple[str, str]],
    takeover: Takeover,
    grace: float,
) -> None:
    await channel.send(
        {
            "type": "hello",
            "version": VERSION,
            "pid": os.getpid(),
            "sinks": [{"name": name, "kind": kind} for name, kind in sinks],
        }
    )
    have_listeners = False
    while True:
        try:
            header, fds = await channel.receive(
                STEP_TIMEOUT if not have_listeners else grace + RELEASE_MARGIN
            )
        except (ConnectionError, TimeoutError, OSError) as exc:
            if not have_listeners:
                raise TakeoverRefused(
                    f"takeover failed: the running broker broke off: {exc}"
                ) from exc
            # The listeners are ours already: serve them, with what came.
            log.error("takeover_cut_short", error=str(exc))
            return
        kind = header.get("type")
        if kind == "refused":
            raise TakeoverRefused(f"takeover refused: {header.get('reason')}")
        items = header.get("items", [])
        if kind in ("listeners", "connections") and (
            not isinstance(items, list) or len(items) != len(fds)
        ):
            for sock in fds:
                sock.close()
            raise TakeoverRefused(f"takeover failed: malformed {kind} message")
        if kind == "listeners":
            for sock, item in zip(fds, items, strict=True):
                takeover.listeners.add(
                    sock,
                    tag=(str(item.get("sink")), str(item.get("address"))),
                    owned=bool(item.get("owned")),
                )
        elif kind == "listeners_end":
            await channel.send({"type": "have_listeners"})
            have_listeners = True
        elif kind == "connections":
            for sock, item in zip(fds, items, strict=True):
                try:
                    takeover.connections.append((sock, Carried.from_json(item)))
                except ValueError as exc:
                    log.error("takeover_connection_unusable", error=str(exc))
                    sock.close()
            await channel.send({"type": "have", "count": len(fds)})
        elif kind == "end":
            pid = header.get("pid")
            takeover.old_pid = pid if isinstance(pid, int) else None
            return
        else:
            for sock in fds:
                sock.close()


async def wait_for_release(state_dir: Path, timeout: float) -> None:
    """
    Wait until no broker holds ``state_dir`` (the old one saved its counters
    and let go).

    Raises:
        BrokerError: it still holds it after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while (owner := holder(state_dir)) is not None:
        if time.monotonic() > deadline:
            raise BrokerError(
                f"the running broker (pid {owner}) did not release {state_dir} "
                f"within {timeout:g} s of handing over; the listeners it handed "
                "over close with this process"
            )
        # The lock has no "released" event to await; this wait is bounded.
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def adopt(sinks: Sequence[Sink], takeover: Takeover) -> None:
    """
    Serve the handed-over connections on the started sinks, and close the
    inherited listeners no sink claimed.
    """
    takeover.listeners.close_unclaimed()
    by_name = {sink.name: sink for sink in sinks if isinstance(sink, EgdSink)}
    connections, takeover.connections = takeover.connections, []
    adopted = 0
    for sock, carried in connections:
        sink = by_name.get(carried.sink)
        if sink is None:
            log.warning("takeover_connection_orphaned", sink=carried.sink)
            sock.close()
            continue
        try:
            await sink.adopt(sock, carried)
        except OSError as exc:
            log.error("takeover_adopt_failed", sink=carried.sink, error=str(exc))
            sock.close()
            continue
        adopted += 1
    if connections:
        log.info("takeover_adopted", connections=adopted)
