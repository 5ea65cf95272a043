"""
The takeover control socket, in one process: who may take over, what is
refused and why, and what goes over it.
"""

import asyncio
import json
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog

from broker.handover import (
    SOCKET_NAME,
    Channel,
    HandoverHooks,
    HandoverListener,
    TakeoverRefused,
)
from broker.pool import EntropyPool
from broker.takeover import take_over
from sinks.egd.config import EgdSinkConfig
from sinks.egd.server import EgdSink
from tests.helpers import DEADLINE
from tests.sinks.egd.doubles import View
from tests.sinks.egd.test_server import connect, fill


@dataclass
class Broker:
    """
    What the listener reports to the broker running it.
    """

    serving: bool = True
    calls: list[str] = field(default_factory=list)

    def hooks(self) -> HandoverHooks:
        return HandoverHooks(
            serving=lambda: self.serving,
            committed=lambda: self.calls.append("committed"),
            done=lambda: self.calls.append("done"),
            grace=1.0,
        )


@dataclass
class Running:
    sink: EgdSink
    pool: EntropyPool
    broker: Broker
    state_dir: Path


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    pool = EntropyPool(1 << 20)
    config = EgdSinkConfig(kind="egd", listen=["tcp://127.0.0.1:0", "unix:egd.sock"])
    sink = EgdSink(config, View(tmp_path, pool))
    await sink.start()
    broker = Broker()
    try:
        async with HandoverListener(tmp_path, [sink], broker.hooks()):
            yield Running(sink, pool, broker, tmp_path)
    finally:
        await sink.shutdown(0)


async def test_without_a_running_broker_there_is_nothing_to_take(
    tmp_path: Path,
) -> None:
    """
    No control socket: None, and a line saying so.
    """
    with structlog.testing.capture_logs() as logs:
        assert await take_over(tmp_path, [("egd", "egd")], grace=1.0) is None
    assert ["takeover_no_running_broker"] == [e["event"] for e in logs]


async def test_the_control_socket_is_the_owners_alone(running: Running) -> None:
    """
    Mode 0600: only the broker's own user (and root) can even connect.
    """
    mode = os.stat(running.state_dir / SOCKET_NAME).st_mode
    assert stat.S_ISSOCK(mode)
    assert 0o600 == stat.S_IMODE(mode)


async def test_a_sink_that_changed_kind_is_refused(running: Running) -> None:
    """
    A successor whose sink of the same name is of another kind is refused
    with the reason, and the running sink keeps accepting.
    """
    with pytest.raises(TakeoverRefused, match="'egd' is egd here but http"):
        await take_over(running.state_dir, [("egd", "http")], grace=1.0)
    assert [] == running.broker.calls
    assert running.sink.accepting
    fill(running.pool, 100)
    reader, writer = await connect(running.sink)
    writer.write(b"\x02\x08")
    async with asyncio.timeout(DEADLINE):
        assert 8 == len(await reader.readexactly(8))
    writer.close()


async def test_a_broker_not_serving_refuses(running: Running) -> None:
    """
    A broker still starting or already stopping does not hand over.
    """
    running.broker.serving = False
    with pytest.raises(TakeoverRefused, match="not serving"):
        await take_over(running.state_dir, [("egd", "egd")], grace=1.0)


async def test_another_protocol_version_is_refused(running: Running) -> None:
    """
    A successor speaking another version of the hand-over gets a refusal.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(running.state_dir / SOCKET_NAME))
    channel = Channel(sock)
    try:
        await channel.send({"type": "hello", "version": 99, "sinks": []})
        reply, fds = await channel.receive(DEADLINE)
    finally:
        channel.close()
    assert ("refused", []) == (reply["type"], fds)
    assert "protocol 99" in reply["reason"]


async def test_listeners_and_connections_go_over(running: Running) -> None:
    """
    A successor with the same sinks receives every listener, tagged with its
    sink and address, and every connection; the old broker is told to stop.
    """
    fill(running.pool, 100)
    reader, writer = await connect(running.sink, "unix")
    writer.write(b"\x02\x08\x02")
    async with asyncio.timeout(DEADLINE):
        assert 8 == len(await reader.readexactly(8))
    takeover = await take_over(running.state_dir, [("egd", "egd")], grace=1.0)
    assert takeover is not None
    try:
        assert ["committed", "done"] == running.broker.calls
        assert not running.sink.accepting
        tags = sorted(entry.tag or ("", "") for entry in takeover.listeners.unclaimed())
        assert [
            ("egd", "tcp://127.0.0.1:0"),
            ("egd", f"unix:{running.state_dir / 'egd.sock'}"),
        ] == tags
        [(sock, carried)] = takeover.connections
        assert ("egd", b"\x02") == (carried.sink, carried.pending)
        assert carried.peer is not None
        assert os.geteuid() == carried.peer.uid
        # The successor's copy is the same connection, open both ways.
        sock.settimeout(DEADLINE)
        writer.write(b"\x10")
        assert b"\x10" == await asyncio.to_thread(sock.recv, 16)
        sock.sendall(b"hi")
        async with asyncio.timeout(DEADLINE):
            assert b"hi" == await reader.readexactly(2)
        assert takeover.old_pid == os.getpid()
    finally:
        takeover.close()
        writer.close()


HELLO_AS_ANOTHER_USER = """
import json, os, socket, sys
# Reach the directory through an fd opened as root: its parents stay closed.
directory = os.open(sys.argv[1], os.O_PATH)
os.setgid(65534)
os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect(f"/proc/self/fd/{directory}/handover.sock")
sock.send(json.dumps({"type": "hello", "version": 1, "sinks": []}).encode())
print(sock.recv(65536).decode())
"""


async def test_another_user_is_refused(running: Running) -> None:
    """
    Even with the socket opened up, a process of another uid is refused
    (SO_PEERCRED), and nothing is handed over.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    # Opened up so that the uid check, not the file mode, is what refuses.
    os.chmod(running.state_dir / SOCKET_NAME, 0o666)  # noqa: S103
    os.chmod(running.state_dir, 0o711)  # noqa: S103
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-c",
        HELLO_AS_ANOTHER_USER,
        str(running.state_dir),
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        out, _ = await done.communicate()
    reply = json.loads(out)
    assert "refused" == reply["type"]
    assert "uid 65534 may not take over a broker running as uid 0" == reply["reason"]
    assert [] == running.broker.calls
    assert running.sink.accepting
