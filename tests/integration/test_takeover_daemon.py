"""
Restarts no client notices, against the real daemon: listening sockets from
systemd (``systemd-socket-activate``), and ``ebroker serve --takeover``
handing listeners and EGD connections from a running broker to its successor.
"""

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import DEADLINE, eventually, free_port, wait_until
from tests.integration.clients import BrokerHttp, FifoFeeder, empty_pool, poll_until
from tests.integration.daemon import REPO, Daemon, default_config, start_daemon
from tests.integration.test_drain_daemon import NotifySocket

FIFO_SOURCE = """
    [[sources]]
    name = "fifo"
    kind = "device"
    path = "{path}"
    credit = 8
    """
METERED = """
    [[customers]]
    id = "metered"
    networks = ["127.0.0.1/32"]
    quota = "1 GiB/day"
    """


def events(daemon: Daemon) -> list[object]:
    return [entry.get("event") for entry in daemon.logs()]


@contextlib.contextmanager
def killed_at_end(*daemons: Daemon) -> Iterator[None]:
    try:
        yield
    finally:
        for daemon in daemons:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()


def successor(
    tmp_path: Path, old: Daemon, config: str, env: dict[str, str] | None = None
) -> Daemon:
    """
    Start ``ebroker serve --takeover`` on ``old``'s state_dir, from its own
    directory (its own config file and log), and wait until it serves.
    """
    own = tmp_path / "successor"
    own.mkdir()
    (own / "state").symlink_to(old.state_dir)
    return start_daemon(own, config, args=["--takeover"], env=env)


# ---- socket activation --------------------------------------------------------------


@pytest.mark.needs_tool("systemd-socket-activate")
def test_socket_activation_serves_connections_made_before_the_broker_ran(
    tmp_path: Path,
) -> None:
    """
    Under systemd-socket-activate the broker serves on the sockets it was
    given (TCP and Unix), answers the EGD requests clients sent before it
    started, leaves the Unix socket file as systemd made it, and closes an
    inherited socket no sink claims with a warning naming it.
    """
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    port, stray = free_port(), free_port()
    unix_path = state_dir / "egd.sock"
    config = default_config(state_dir).replace(
        '"tcp://127.0.0.1:0", "unix:egd.sock"',
        f'"tcp://127.0.0.1:{port}", "unix:egd.sock"',
    )
    (tmp_path / "ebroker.toml").write_text(config)
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [
                "systemd-socket-activate",
                f"--listen=127.0.0.1:{port}",
                f"--listen={unix_path}",
                f"--listen=127.0.0.1:{stray}",
                "--fdname=egd-tcp:egd-unix:stray",
                "-E",
                "PYTHONUNBUFFERED=1",
                sys.executable,
                "-m",
                "broker.cli",
                "serve",
                "--config",
                str(tmp_path / "ebroker.toml"),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    daemon = Daemon(process, state_dir, stderr_path)
    with killed_at_end(daemon):
        wait_until(lambda: unix_path.exists() or process.poll() is not None)
        inode = os.stat(unix_path).st_ino
        # Nothing runs the broker yet: these wait in the sockets' backlogs,
        # and the first one makes systemd-socket-activate start it.
        tcp = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        tcp.sendall(b"\x02\x20")
        unix = socket.socket(socket.AF_UNIX)
        unix.settimeout(DEADLINE)
        unix.connect(str(unix_path))
        unix.sendall(b"\x02\x10")
        assert 32 == len(recv_exactly(tcp, 32))
        assert 16 == len(recv_exactly(unix, 16))
        tcp.close()
        unix.close()
        wait_until(lambda: (state_dir / "listeners.json").exists())
        logs = daemon.logs()
        listening = [e for e in logs if e.get("event") == "sink_listening"]
        assert [f"tcp://127.0.0.1:{port}", f"unix:{unix_path}"] == listening[0][
            "addresses"
        ]
        unclaimed = [e for e in logs if e.get("event") == "inherited_sockets_unclaimed"]
        assert [[f"tcp://127.0.0.1:{stray} (stray)"]] == [
            e["sockets"] for e in unclaimed
        ]
        assert inode == os.stat(unix_path).st_ino
        assert 0 == daemon.stop()
        # systemd owns the file: a broker that got it does not remove it.
        assert unix_path.exists()


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return data


# ---- takeover under load ------------------------------------------------------------


@dataclass
class EgdLoad:
    """
    One EGD client that keeps two blocking reads in flight (pipelined, as
    QEMU does) and records when each answer completes.
    """

    name: str
    address: tuple[str, int] | str
    answered: list[float] = field(default_factory=list)
    error: BaseException | None = None

    async def run(self, stop: asyncio.Event) -> None:
        if isinstance(self.address, str):
            reader, writer = await asyncio.open_unix_connection(self.address)
        else:
            reader, writer = await asyncio.open_connection(*self.address)
        try:
            writer.write(b"\x02\x20\x02\x20")
            while not stop.is_set():
                await reader.readexactly(32)
                self.answered.append(time.monotonic())
                writer.write(b"\x02\x20")
            for _ in range(2):
                await reader.readexactly(32)
                self.answered.append(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - kept for the test to report
            self.error = exc
        finally:
            writer.close()

    def gap(self, since: float) -> float:
        """
        The longest wait between two answers from ``since`` on.
        """
        times = [t for t in self.answered if t >= since]
        earlier = [t for t in self.answered if t < since]
        if earlier:
            times.insert(0, earlier[-1])
        return max((b - a for a, b in itertools.pairwise(times)), default=0)


@dataclass
class Arrivals:
    """
    Clients that connect, ask once and leave, back to back, so some are
    always connecting while the brokers change places.
    """

    served: int = 0
    errors: list[BaseException] = field(default_factory=list)

    async def run(self, address: tuple[str, int] | str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if isinstance(address, str):
                    reader, writer = await asyncio.open_unix_connection(address)
                else:
                    reader, writer = await asyncio.open_connection(*address)
                writer.write(b"\x02\x08")
                await reader.readexactly(8)
                writer.close()
                self.served += 1
            except Exception as exc:  # noqa: BLE001 - kept for the test to report
                self.errors.append(exc)
                return


@dataclass
class HttpLoad:
    """
    An HTTP client drawing entropy in a loop; any error or non-200 is kept.
    """

    ok: int = 0
    failures: list[str] = field(default_factory=list)

    async def run(self, url: str, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=DEADLINE)
        ) as session:
            while not stop.is_set():
                try:
                    async with session.get(url, params={"bytes": "16"}) as resp:
                        body = await resp.read()
                        if resp.status != 200 or len(body) != 16:
                            self.failures.append(f"{resp.status} {body[:80]!r}")
                        else:
                            self.ok += 1
                except aiohttp.ClientError as exc:
                    self.failures.append(repr(exc))


async def quota_used(daemon: Daemon) -> int:
    async with BrokerHttp(daemon) as http:
        status = await http.status()
    return int(status["accounts"]["customers"]["metered"]["quota"]["used"])


def test_takeover_under_load_loses_no_request_and_refuses_no_connection(
    tmp_path: Path,
) -> None:
    """
    EGD clients over TCP and the Unix socket with reads in flight, one with
    half a request sent, clients connecting all through, and HTTP clients:
    across ``--takeover`` every request is answered, nobody sees an end of
    file, a reset or a refused connection, the old broker exits 0 and the
    quota counted so far carries over.
    """
    config = default_config(tmp_path / "state", extra=METERED)
    old = start_daemon(tmp_path, config)
    new: Daemon | None = None

    async def run() -> None:
        nonlocal new
        stop = asyncio.Event()
        loads = [EgdLoad(f"tcp{i}", old.egd_tcp) for i in range(3)] + [
            EgdLoad(f"unix{i}", old.egd_unix) for i in range(2)
        ]
        arrivals = [Arrivals() for _ in range(4)]
        http = [HttpLoad() for _ in range(2)]
        tasks = [asyncio.create_task(load.run(stop)) for load in loads]
        tasks += [
            asyncio.create_task(a.run(old.egd_tcp if i % 2 else old.egd_unix, stop))
            for i, a in enumerate(arrivals)
        ]
        tasks += [
            asyncio.create_task(h.run(old.http_url + "/v1/entropy", stop)) for h in http
        ]
        half = socket.create_connection(old.egd_tcp)
        half.sendall(b"\x02")  # the count byte follows after the takeover
        await eventually(lambda: all(len(load.answered) >= 5 for load in loads))
        used_before = await quota_used(old)
        began = time.monotonic()
        new = await asyncio.to_thread(successor, tmp_path, old, config)
        assert 0 == await asyncio.to_thread(old.process.wait, DEADLINE)
        half.sendall(b"\x40")
        assert 64 == len(await asyncio.to_thread(recv_exactly, half, 64))
        served_then = [len(load.answered) for load in loads]
        arrived_then = sum(a.served for a in arrivals)
        await eventually(
            lambda: (
                all(
                    len(load.answered) >= then + 20
                    for load, then in zip(loads, served_then, strict=True)
                )
                and sum(a.served for a in arrivals) >= arrived_then + 20
            )
        )
        used_after = await quota_used(new)
        stop.set()
        await asyncio.gather(*tasks)
        half.close()
        assert [] == [(load.name, repr(load.error)) for load in loads if load.error]
        assert [] == [repr(e) for a in arrivals for e in a.errors]
        assert [] == [failure for h in http for failure in h.failures]
        assert all(h.ok for h in http)
        assert used_after >= used_before > 0
        gap = max(load.gap(began) for load in loads)
        print(
            f"TAKEOVER gap {gap * 1000:.1f} ms (longest wait of an EGD client "
            f"across the takeover); {sum(a.served for a in arrivals)} "
            "connections arrived and were served"
        )

    with killed_at_end(old):
        try:
            asyncio.run(run())
        finally:
            if new is not None:
                with killed_at_end(new):
                    assert 0 == new.stop()
    assert new is not None
    handed = [e for e in old.logs() if e.get("event") == "takeover_handed_over"]
    adopted = [e for e in new.logs() if e.get("event") == "takeover_adopted"]
    # Five loaded clients and the half-sent request at least, all adopted.
    count = int(str(handed[0]["connections"]))
    assert count >= 6
    assert [count] == [e["connections"] for e in adopted]


def test_takeover_carries_a_read_blocked_on_an_empty_pool(tmp_path: Path) -> None:
    """
    A blocking read the old broker cannot answer (its source stalled) goes
    over with its connection and is answered, in full and once, by the new
    broker when the source delivers again; the connection never closes.
    """
    feeder = FifoFeeder(tmp_path / "device")
    config = default_config(
        tmp_path / "state", FIFO_SOURCE.format(path=feeder.path), pool_size="4 KiB"
    )
    feeder.feed("random")
    old = start_daemon(tmp_path, config)
    new: Daemon | None = None

    async def run() -> None:
        nonlocal new
        async with BrokerHttp(old) as http:
            await poll_until(http.healthz, lambda got: got[0] == 200)
        feeder.pause()
        reader, writer = await asyncio.open_connection(*old.egd_tcp)
        await empty_pool(reader, writer)
        writer.write(b"\x02\x40\x00")
        await writer.drain()
        new = await asyncio.to_thread(successor, tmp_path, old, config)
        assert 0 == await asyncio.to_thread(old.process.wait, DEADLINE)
        feeder.feed("random")
        async with asyncio.timeout(DEADLINE):
            assert 64 == len(await reader.readexactly(64))
            assert 4 == len(await reader.readexactly(4))
        writer.write(b"\x02\x10")
        async with asyncio.timeout(DEADLINE):
            assert 16 == len(await reader.readexactly(16))
        writer.close()

    try:
        with killed_at_end(old):
            asyncio.run(run())
        assert new is not None
        with killed_at_end(new):
            assert 0 == new.stop()
    finally:
        feeder.close()
    handed = [e for e in old.logs() if e.get("event") == "takeover_handed_over"]
    assert [1] == [e["connections"] for e in handed]


LEGACY_SINK = """
    [[sinks]]
    name = "legacy"
    kind = "egd"
    listen = ["tcp://127.0.0.1:0"]
    """


def test_a_sink_the_new_config_drops_is_answered_then_closed(
    tmp_path: Path,
) -> None:
    """
    Connections to a sink the new config no longer has stay with the old
    broker, which answers what they asked and then closes them; the sinks
    both configs have move over as usual.
    """
    config = default_config(tmp_path / "state")
    old = start_daemon(tmp_path, config + LEGACY_SINK)
    new: Daemon | None = None
    with killed_at_end(old):
        host, port = old.address("legacy", "tcp://").removeprefix("tcp://").split(":")
        legacy = socket.create_connection((host, int(port)), timeout=DEADLINE)
        kept = socket.create_connection(old.egd_tcp, timeout=DEADLINE)
        for client in (legacy, kept):
            client.sendall(b"\x02\x08")
            assert 8 == len(recv_exactly(client, 8))
        legacy.sendall(b"\x02\x10")
        new = successor(tmp_path, old, config)
        assert 0 == old.process.wait(DEADLINE)
    assert new is not None
    with killed_at_end(new):
        assert "legacy" not in new.listeners
        assert 16 == len(recv_exactly(legacy, 16))
        assert b"" == legacy.recv(1)
        kept.sendall(b"\x02\x08")
        assert 8 == len(recv_exactly(kept, 8))
        legacy.close()
        kept.close()
        assert 0 == new.stop()


def test_systemd_follows_the_successor(tmp_path: Path) -> None:
    """
    Under ``Type=notify`` with ``NotifyAccess=all`` the successor names
    itself the unit's main process before the old one exits, then reports
    ready; the old broker, having handed over, never says it is stopping.
    """
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path)}
    config = default_config(tmp_path / "state")
    old = start_daemon(tmp_path, config, env=env)
    try:
        assert "1" == notify.next_with("READY")["READY"]
        new = successor(tmp_path, old, config, env)
        with killed_at_end(new):
            assert str(new.process.pid) == notify.next_with("MAINPID")["MAINPID"]
            assert "1" == notify.next_with("READY")["READY"]
            assert 0 == old.process.wait(DEADLINE)
            # Whatever the old broker sent before it exited is queued ahead
            # of this marker.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as marker:
                marker.sendto(b"MARKER=1", str(notify.path))
            notify.next_with("MARKER")
            assert [] == [m for m in notify.messages if "STOPPING" in m]
            assert 0 == new.stop()
    finally:
        with killed_at_end(old):
            notify.close()


# ---- refused takeovers --------------------------------------------------------------


def takeover_command(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "next.toml"
    path.write_text(config)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--config",
            str(path),
            "--takeover",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_takeover_with_a_bad_config_leaves_the_running_broker_serving(
    tmp_path: Path,
) -> None:
    """
    A new config that does not load, or one the running broker refuses (a
    sink changed kind under the same name), exits non-zero saying why, and
    the running broker goes on serving the connection it had.
    """
    config = default_config(tmp_path / "state")
    old = start_daemon(tmp_path, config)
    with killed_at_end(old):
        client = socket.create_connection(old.egd_tcp, timeout=DEADLINE)
        client.sendall(b"\x02\x10")
        assert 16 == len(recv_exactly(client, 16))

        broken = takeover_command(tmp_path, config + "\n[nonsense]\n")
        assert 0 != broken.returncode
        assert "invalid configuration" in broken.stderr

        renamed = config.replace(
            'kind = "egd"\nlisten = ["tcp://127.0.0.1:0", "unix:egd.sock"]',
            'kind = "http"\nlisten = ["tcp://127.0.0.1:0"]',
        )
        assert renamed != config
        refused = takeover_command(tmp_path, renamed)
        assert 0 != refused.returncode
        assert "takeover refused" in refused.stderr
        assert "'egd' is egd here but http" in refused.stderr

        client.sendall(b"\x02\x10")
        assert 16 == len(recv_exactly(client, 16))
        fresh = socket.create_connection(old.egd_tcp, timeout=DEADLINE)
        fresh.sendall(b"\x02\x08")
        assert 8 == len(recv_exactly(fresh, 8))
        client.close()
        fresh.close()
        assert "takeover_refused" in events(old)
        assert "takeover_started" not in events(old)
        assert 0 == old.stop()


def test_takeover_without_a_running_broker_starts_normally(tmp_path: Path) -> None:
    """
    ``--takeover`` with nobody to take over from logs that and serves.
    """
    daemon = start_daemon(
        tmp_path, default_config(tmp_path / "state"), args=["--takeover"]
    )
    with killed_at_end(daemon):
        client = socket.create_connection(daemon.egd_tcp, timeout=DEADLINE)
        client.sendall(b"\x02\x08")
        assert 8 == len(recv_exactly(client, 8))
        client.close()
        assert "takeover_no_running_broker" in events(daemon)
        assert 0 == daemon.stop(signal.SIGTERM)
