"""
Two real brokers behind the shipped haproxy, and the clients that measure what
a broker's death, drain or restart costs the clients on the other side.

`Fleet` starts two brokers, each with a proxy-facing EGD sink and a tenant
HTTP sink that trust 127.0.0.1 for PROXY v2 plus an operator HTTP sink, and
haproxy from ``config/haproxy.cfg`` with only its ports rewritten:
`haproxy_config` fails if a rewrite does not match, so a test always runs the
shipped options (retries, redispatch, checks, balance). `Fleet.take_over`
restarts a broker with ``ebroker serve --takeover``.

`QemuEgdClient` does what QEMU's ``rng-egd`` with ``reconnect=1`` does for a
Linux guest: one ``02 40`` outstanding at a time, a new connection a second
after the old one closed (``reconnect=0``: at once, as ekeyd-egd-linux does),
and no request sent again once its connection is gone. It records every
request sent, every answer, every request an EOF left unanswered and the
longest gap between two answers. `HttpLoop` draws
``GET /v1/entropy?bytes=32`` through haproxy and records errors and gaps.
"""

import asyncio
import contextlib
import csv
import io
import re
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp

from tests.helpers import DEADLINE, eventually, free_port
from tests.integration.clients import poll_until
from tests.integration.daemon import REPO, Daemon, start_daemon

SHIPPED_HAPROXY = REPO / "config" / "haproxy.cfg"
LOOPBACK = "127.0.0.1"
"""haproxy's address as the brokers see it, and where everything listens."""

EGD_REQUEST = b"\x02\x40"
EGD_SIZE = 64
"""A Linux guest keeps one 64-byte blocking read outstanding (``02 40``)."""


@dataclass(frozen=True)
class BrokerPorts:
    """
    The listeners of one broker that haproxy and the test reach.
    """

    egd_lb: int
    http_lb: int
    operator: int


@dataclass(frozen=True)
class FleetPorts:
    """
    haproxy's frontends and the brokers behind them, all on loopback.
    """

    egd: int
    http: int
    stats: int
    brokers: tuple[BrokerPorts, BrokerPorts]

    @classmethod
    def pick(cls) -> Self:
        """
        Nine distinct free loopback ports.
        """
        ports: list[int] = []
        while len(ports) < 9:
            port = free_port()
            if port not in ports:
                ports.append(port)
        egd, http, stats = ports[:3]
        broker1, broker2 = BrokerPorts(*ports[3:6]), BrokerPorts(*ports[6:9])
        return cls(egd, http, stats, (broker1, broker2))


SHIPPED_PORTS: dict[str, int] = {
    "egd": 7777,
    "http": 7778,
    "stats": 7779,
}
"""The frontend ports config/haproxy.cfg binds."""
SHIPPED_BROKERS: tuple[tuple[int, int], tuple[int, int]] = (
    (18888, 18889),
    (28888, 28889),
)
"""(EGD, HTTP) proxy-facing ports of broker1 and broker2 in config/haproxy.cfg."""


def haproxy_config(shipped: str, ports: FleetPorts) -> str:
    """
    The shipped haproxy config with its ports replaced by ``ports``; nothing
    else changes.

    Raises:
        AssertionError: a port did not appear where the shipped config is
            expected to name it, so the rewrite would test something else.
    """
    mapping: dict[int, int] = {
        SHIPPED_PORTS["egd"]: ports.egd,
        SHIPPED_PORTS["http"]: ports.http,
        SHIPPED_PORTS["stats"]: ports.stats,
    }
    # broker1/broker2: the EGD port once, the HTTP port twice (EGD check port
    # and HTTP server).
    expected: dict[int, int] = {ports.egd: 1, ports.http: 1, ports.stats: 1}
    for (egd, http), broker in zip(SHIPPED_BROKERS, ports.brokers, strict=True):
        mapping[egd] = broker.egd_lb
        mapping[http] = broker.http_lb
        expected[broker.egd_lb] = 1
        expected[broker.http_lb] = 2
    pattern = re.compile(r"(?<![0-9])(" + "|".join(map(str, mapping)) + r")(?![0-9])")
    counts: dict[int, int] = dict.fromkeys(expected, 0)
    lines = []
    for line in shipped.splitlines():
        code, hash_, comment = line.partition("#")

        def rewrite(match: re.Match[str]) -> str:
            new = mapping[int(match.group(1))]
            counts[new] += 1
            return str(new)

        lines.append(pattern.sub(rewrite, code) + hash_ + comment)
    assert expected == counts, (
        f"config/haproxy.cfg no longer names the ports this harness rewrites: "
        f"expected {expected}, replaced {counts}"
    )
    return "\n".join(lines) + "\n"


def broker_config(state_dir: Path, ports: BrokerPorts, drain: str) -> str:
    """
    One broker of the fleet: getrandom, proxy-facing EGD and tenant HTTP
    sinks trusting haproxy (127.0.0.1), an operator HTTP sink.
    """
    return textwrap.dedent(
        f"""
        [broker]
        state_dir = "{state_dir}"
        pool_size = "256 KiB"
        low_watermark = "1 KiB"
        drain = "{drain}"
        shutdown_grace = "2 s"

        [logging]
        level = "info"
        format = "json"

        [[sources]]
        name = "getrandom"
        kind = "getrandom"

        [[sinks]]
        name = "egd-lb"
        kind = "egd"
        listen = ["tcp://{LOOPBACK}:{ports.egd_lb}"]
        trusted_proxies = ["{LOOPBACK}/32"]

        [[sinks]]
        name = "http-lb"
        kind = "http"
        plane = "tenant"
        listen = ["tcp://{LOOPBACK}:{ports.http_lb}"]
        trusted_proxies = ["{LOOPBACK}/32"]

        [[sinks]]
        name = "operator"
        kind = "http"
        plane = "operator"
        listen = ["tcp://{LOOPBACK}:{ports.operator}"]
        """
    )


class Haproxy:
    """
    haproxy in the foreground on a rewritten copy of the shipped config; its
    log (stdout and stderr) in ``haproxy.log``.
    """

    def __init__(self, directory: Path, ports: FleetPorts) -> None:
        self.ports = ports
        self.config = directory / "haproxy.cfg"
        self.config.write_text(haproxy_config(SHIPPED_HAPROXY.read_text(), ports))
        self.log_path = directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # A config haproxy rejects fails here with its reason, not as a timeout.
        checked = subprocess.run(
            ["haproxy", "-c", "-f", str(self.config)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert 0 == checked.returncode, checked.stdout + checked.stderr
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.config)], stdout=log, stderr=log
            )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stats(self, session: aiohttp.ClientSession) -> list[dict[str, str]]:
        """
        The stats page as CSV rows (``pxname``, ``svname``, ``status``, ...).
        """
        url = f"http://{LOOPBACK}:{self.ports.stats}/;csv"
        async with session.get(url) as response:
            response.raise_for_status()
            text = await response.text()
        return list(csv.DictReader(io.StringIO(text.removeprefix("# "))))


def server_states(rows: list[dict[str, str]]) -> dict[tuple[str, str], str]:
    """
    ``(backend, server) -> status`` ("UP", "DOWN", "UP 1/2", ...) for servers.
    """
    return {
        (row["pxname"], row["svname"]): row["status"]
        for row in rows
        if row["svname"] not in ("FRONTEND", "BACKEND")
    }


BACKENDS = ("brokers_egd", "brokers_http")


@dataclass
class StateWatch:
    """
    What the stats page said about each server, polled until stopped: the
    wall-clock time each (backend, server) was first seen in each status.
    """

    first_seen: dict[tuple[str, str, str], float] = field(default_factory=dict)
    polls: int = 0


class Fleet:
    """
    Two brokers behind haproxy, each draining for ``drain`` on SIGTERM.
    `brokers` holds the running daemons, in haproxy's order (broker1,
    broker2).
    """

    def __init__(self, tmp_path: Path, drain: str) -> None:
        self.drain = drain
        self.ports = FleetPorts.pick()
        self.dirs = (tmp_path / "broker1", tmp_path / "broker2")
        self.brokers: list[Daemon] = []
        self.retired: list[Daemon] = []
        """Brokers a successor took over from (`take_over`)."""
        self.haproxy = Haproxy(tmp_path, self.ports)
        self._session: aiohttp.ClientSession | None = None

    @property
    def names(self) -> tuple[str, str]:
        return ("broker1", "broker2")

    def config_text(self, index: int) -> str:
        return broker_config(
            self.dirs[index] / "state", self.ports.brokers[index], self.drain
        )

    def start(self) -> None:
        for index, directory in enumerate(self.dirs):
            directory.mkdir()
            self.brokers.append(start_daemon(directory, self.config_text(index)))
        self.haproxy.start()

    async def take_over(self, index: int) -> Daemon:
        """
        Start ``ebroker serve --takeover`` for broker ``index`` (same config
        and state_dir, its own directory for the config file and log) and
        wait, off the loop so clients keep running, until it serves. The old
        process moves to `retired`; it exits by itself.
        """
        own = self.dirs[index] / f"successor{len(self.retired) + 1}"
        own.mkdir()
        (own / "state").symlink_to(self.dirs[index] / "state")
        daemon = await asyncio.to_thread(
            start_daemon, own, self.config_text(index), args=["--takeover"]
        )
        self.retired.append(self.brokers[index])
        self.brokers[index] = daemon
        return daemon

    def close(self) -> None:
        self.haproxy.stop()
        for daemon in [*self.brokers, *self.retired]:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=DEADLINE)
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def egd_front(self) -> tuple[str, int]:
        return LOOPBACK, self.ports.egd

    @property
    def http_front(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.http}"

    async def status(self, index: int) -> dict[str, Any]:
        url = f"http://{LOOPBACK}:{self.ports.brokers[index].operator}/v1/status"
        async with self.session.get(url) as response:
            response.raise_for_status()
            document: dict[str, Any] = await response.json()
            return document

    async def egd_connections(self, index: int) -> int:
        """
        Client sessions haproxy holds to broker ``index``'s EGD sink (its
        health checks go to the HTTP sink, so these are all clients).
        """
        document = await self.status(index)
        (sink,) = (sink for sink in document["sinks"] if sink["name"] == "egd-lb")
        return int(sink["connections"])

    async def clients_on(self, index: int) -> set[str]:
        """
        The clients broker ``index`` has served (``ip:127.0.0.2``, ...), as
        its accounts name them from haproxy's PROXY headers.
        """
        document = await self.status(index)
        customers: dict[str, Any] = document["accounts"]["customers"]
        return {key for view in customers.values() for key in view["clients"]}

    async def states(self) -> dict[tuple[str, str], str]:
        return server_states(await self.haproxy.stats(self.session))

    async def _states_once_listening(self) -> dict[tuple[str, str], str]:
        try:
            return await self.states()
        except aiohttp.ClientConnectorError:
            # haproxy starting: its stats listener is not bound yet.
            return {}

    async def all_up(self) -> None:
        """
        Wait until haproxy (once it listens) sees both brokers UP in both
        backends.
        """
        await poll_until(
            self._states_once_listening,
            lambda states: all(
                states.get((backend, name)) == "UP"
                for backend in BACKENDS
                for name in self.names
            ),
        )

    async def all_down_but(self, survivor: int) -> None:
        """
        Wait until haproxy sees every broker but ``survivor`` DOWN in both
        backends.
        """
        down = [name for index, name in enumerate(self.names) if index != survivor]
        await poll_until(
            self.states,
            lambda states: all(
                states.get((backend, name), "").startswith("DOWN")
                for backend in BACKENDS
                for name in down
            ),
        )

    async def counters(self) -> dict[str, dict[str, str]]:
        """
        haproxy's per-server counters that tell what it hid from clients:
        retries (``wretr``), redispatches (``wredis``), connection and
        response errors (``econ``, ``eresp``), sessions (``stot``) and checks
        that failed (``chkfail``), by ``backend/server``.
        """
        rows = await self.haproxy.stats(self.session)
        keys = ("status", "stot", "wretr", "wredis", "econ", "eresp", "chkfail")
        return {
            f"{row['pxname']}/{row['svname']}": {key: row[key] for key in keys}
            for row in rows
            if row["pxname"] in BACKENDS
        }

    async def broker_of_egd_session(self) -> int:
        """
        Wait until exactly one broker holds an EGD client session; its index.
        """
        counts = await poll_until(
            lambda: asyncio.gather(self.egd_connections(0), self.egd_connections(1)),
            lambda counts: sorted(counts) == [0, 1],
        )
        return counts.index(1)

    @contextlib.asynccontextmanager
    async def watching_states(self) -> AsyncIterator[StateWatch]:
        """
        Poll the stats page in the background; yields the `StateWatch`.
        """
        watch = StateWatch()

        async def poll() -> None:
            while True:
                try:
                    states = await self.states()
                except aiohttp.ClientError:
                    # The page is haproxy's: it does not fail while haproxy
                    # runs; a failed poll just leaves a hole in the record.
                    states = {}
                # After the answer: a status is recorded no earlier than
                # haproxy reached it.
                now = time.time()
                watch.polls += 1
                for (backend, server), status in states.items():
                    watch.first_seen.setdefault((backend, server, status), now)
                # A poll every 10 ms resolves haproxy's 500 ms checks.
                await asyncio.sleep(0.01)

        task = asyncio.create_task(poll(), name="haproxy-states")
        try:
            yield watch
        finally:
            task.cancel(msg="watch finished")
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.contextmanager
def running_fleet(tmp_path: Path, drain: str = "0 s") -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, drain)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()


@dataclass
class Gaps:
    """
    The longest pause between two successes, and when it ended.
    """

    last: float | None = None
    longest: float = 0.0
    longest_ended_at: float | None = None
    """Wall-clock time of the success that ended the longest gap."""

    def success(self) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last > self.longest:
            self.longest = now - self.last
            self.longest_ended_at = time.time()
        self.last = now


@dataclass(frozen=True)
class Lost:
    """
    A request left unanswered when its connection closed.
    """

    at: float
    """When the EOF (or error) came."""
    connection: int
    partial: int
    """Bytes of its answer that had arrived (0: none)."""
    cause: str
    sent_at: float
    """When the request was written."""
    answer_before: float | None
    """When the answer before it, on the same connection, was complete."""


class BackgroundClient:
    """
    A client that runs as one task from ``async with`` to `stop` (or the
    end of the block); `_check_running` raises what ended it early.
    """

    TASK_PREFIX = "client"

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(
            self._run(), name=f"{self.TASK_PREFIX}-{self.name}"
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel(msg="client finished")
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _check_running(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()
            raise AssertionError(f"{self.name} stopped")


class QemuEgdClient(BackgroundClient):
    """
    QEMU's ``rng-egd`` backend for a Linux guest, with ``reconnect=1``.

    One ``02 40`` is outstanding at a time; the next is sent as soon as the
    answer is complete, or ``think`` seconds later (a guest reseeding now and
    then). On EOF QEMU forgets whatever was outstanding and connects again
    ``reconnect`` seconds later; so does this client. An EOF seen before the
    next request is written (the peer closed an idle connection) loses
    nothing.

    Invariant once `stop` returned: ``sent == answered + len(lost)``.
    """

    TASK_PREFIX = "egd"

    def __init__(
        self,
        address: tuple[str, int],
        *,
        source_ip: str = LOOPBACK,
        think: float = 0.0,
        reconnect: float = 1.0,
        name: str = "qemu",
    ) -> None:
        self.address = address
        self.source_ip = source_ip
        self.think = think
        self.reconnect = reconnect
        super().__init__(name)
        self.sent = 0
        self.answered = 0
        self.lost: list[Lost] = []
        self.eofs: list[float] = []
        """Wall-clock times of every end of a connection."""
        self.errors: list[str] = []
        """Connection errors and protocol violations, with their time."""
        self.connections = 0
        self.connected_at: list[float] = []
        """Wall-clock time each connection (to haproxy) was made."""
        self.gaps = Gaps()
        self._progress = asyncio.Event()
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        """Clear while a request is outstanding."""
        self._idle.set()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket()
        try:
            sock.bind((self.source_ip, 0))
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().sock_connect(sock, self.address)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                reader, writer = await self._connect()
            except OSError as exc:
                self.errors.append(f"{time.time():.3f} connect: {exc!r}")
                # QEMU's reconnect timer, not a synchronisation.
                await asyncio.sleep(self.reconnect)
                continue
            self.connections += 1
            self.connected_at.append(time.time())
            self._progress.set()
            try:
                await self._serve(reader, writer)
            finally:
                writer.close()
            self.eofs.append(time.time())
            self._progress.set()
            if not self._stopping.is_set() and self.reconnect > 0:
                await asyncio.sleep(self.reconnect)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connection = self.connections
        answered: float | None = None
        while True:
            if self._stopping.is_set() or reader.at_eof():
                return
            try:
                writer.write(EGD_REQUEST)
            except (ConnectionError, RuntimeError) as exc:
                # Not sent: the transport was already gone.
                self.errors.append(f"{time.time():.3f} write: {exc!r}")
                return
            self.sent += 1
            sent_at = time.time()
            self._idle.clear()
            try:
                await reader.readexactly(EGD_SIZE)
            except asyncio.IncompleteReadError as short:
                self._lose(connection, len(short.partial), "eof", sent_at, answered)
                return
            except ConnectionError as exc:
                self._lose(connection, 0, repr(exc), sent_at, answered)
                return
            finally:
                self._idle.set()
            answered = time.time()
            self.answered += 1
            self.gaps.success()
            self._progress.set()
            if self.think > 0 and await self._closed_while_thinking(reader):
                return
            # A guest posts its next buffer from another thread: let the loop
            # see an EOF that came with the answer first, as QEMU's would.
            await asyncio.sleep(0)

    async def _closed_while_thinking(self, reader: asyncio.StreamReader) -> bool:
        # QEMU watches the socket while the guest thinks: an EOF now is seen
        # at once and costs no request. Bytes now were never asked for.
        try:
            async with asyncio.timeout(self.think):
                extra = await reader.read(1)
        except TimeoutError:
            return False
        except ConnectionError as exc:
            self.errors.append(f"{time.time():.3f} idle: {exc!r}")
            return True
        if extra:
            self.errors.append(f"{time.time():.3f} unsolicited byte {extra!r}")
        return True

    def _lose(
        self,
        connection: int,
        partial: int,
        cause: str,
        sent_at: float,
        answer_before: float | None,
    ) -> None:
        self.lost.append(
            Lost(time.time(), connection, partial, cause, sent_at, answer_before)
        )
        if partial:
            self.errors.append(f"{time.time():.3f} short answer: {partial} bytes")

    async def answered_more(self, count: int, timeout: float = DEADLINE) -> None:
        """
        Wait until ``count`` more answers have come.
        """
        target = self.answered + count
        async with asyncio.timeout(timeout):
            while self.answered < target:
                self._check_running()
                self._progress.clear()
                await self._progress.wait()

    async def connected(self, target: int, timeout: float = DEADLINE) -> None:
        """
        Wait until the client has opened ``target`` connections in all.
        """
        async with asyncio.timeout(timeout):
            while self.connections < target:
                self._check_running()
                self._progress.clear()
                await self._progress.wait()

    async def stop(self, timeout: float = DEADLINE) -> None:
        """
        Send no more requests; wait for the outstanding one to be answered
        (or lost) and close.
        """
        self._stopping.set()
        if self._task is None:
            return
        async with asyncio.timeout(timeout):
            await self._idle.wait()
        self._task.cancel(msg="client stopped")
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def measurements(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "lost": len(self.lost),
            "lost_detail": [vars(lost) for lost in self.lost],
            "connections": self.connections,
            "eofs": self.eofs,
            "errors": self.errors,
            "longest_gap_s": round(self.gaps.longest, 4),
            "longest_gap_ended_at": self.gaps.longest_ended_at,
            "think_s": self.think,
            "reconnect_s": self.reconnect,
        }


class HttpLoop(BackgroundClient):
    """
    ``GET /v1/entropy?bytes=32`` through haproxy, one after another, with
    ``pause`` seconds between requests; every failure is kept.
    """

    TASK_PREFIX = "http"

    def __init__(
        self, base_url: str, *, pause: float = 0.005, name: str = "http"
    ) -> None:
        self.url = base_url + "/v1/entropy?bytes=32"
        self.pause = pause
        super().__init__(name)
        self.requests = 0
        self.ok = 0
        self.errors: list[str] = []
        self.gaps = Gaps()
        self._progress = asyncio.Event()
        self._stopping = False

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=DEADLINE)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stopping:
                self.requests += 1
                try:
                    async with session.get(self.url) as response:
                        body = await response.read()
                        if response.status == 200 and len(body) == 32:
                            self.ok += 1
                            self.gaps.success()
                            self._progress.set()
                        else:
                            self.errors.append(
                                f"{time.time():.3f} {response.status} "
                                f"{len(body)} bytes {body[:80]!r}"
                            )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.errors.append(f"{time.time():.3f} {exc!r}")
                # A steady trickle, not a flood the two cores must also carry.
                await asyncio.sleep(self.pause)

    async def succeeded_more(self, count: int, timeout: float = DEADLINE) -> None:
        target = self.ok + count
        async with asyncio.timeout(timeout):
            while self.ok < target:
                self._check_running()
                self._progress.clear()
                await self._progress.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            async with asyncio.timeout(DEADLINE):
                await self._task

    def measurements(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "longest_gap_s": round(self.gaps.longest, 4),
            "longest_gap_ended_at": self.gaps.longest_ended_at,
        }


async def wait_exit(daemon: Daemon, timeout: float = DEADLINE) -> int:
    """
    Wait for the broker process to exit; its exit status.
    """
    await eventually(lambda: daemon.process.poll() is not None, timeout=timeout)
    returncode = daemon.process.returncode
    assert returncode is not None
    return returncode


def send_signal(daemon: Daemon, sig: signal.Signals) -> float:
    """
    Signal the broker; the wall-clock time it was sent.
    """
    sent = time.time()
    daemon.process.send_signal(sig)
    return sent
