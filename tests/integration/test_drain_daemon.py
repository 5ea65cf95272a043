"""
Stopping a broker that a load balancer polls: drain, close, and the systemd
notifications around both, against the real daemon.
"""

import asyncio
import signal
import socket
import time
from pathlib import Path

import aiohttp

from tests.helpers import DEADLINE, wait_until
from tests.integration.clients import BrokerHttp, FifoFeeder, empty_pool, poll_until
from tests.integration.daemon import Daemon, default_config, start_daemon

FIFO_SOURCE = """
    [[sources]]
    name = "fifo"
    kind = "device"
    path = "{path}"
    credit = 8
    """


def events(daemon: Daemon) -> list[object]:
    return [entry.get("event") for entry in daemon.logs()]


def wait_for_event(daemon: Daemon, event: str) -> None:
    wait_until(lambda: event in events(daemon))


async def egd_read(daemon: Daemon, count: int) -> bytes:
    reader, writer = await asyncio.open_connection(*daemon.egd_tcp)
    try:
        writer.write(bytes([0x02, count]))
        return await reader.readexactly(count)
    finally:
        writer.close()


def test_sigterm_drains_with_healthz_503_while_serving(tmp_path: Path) -> None:
    """
    On SIGTERM the broker first reports 503 on /healthz and "draining" in its
    status, yet keeps accepting and answering EGD and HTTP clients for
    ``drain`` seconds; only then does it close and exit 0.
    """
    daemon = start_daemon(tmp_path, default_config(tmp_path / "state", drain="1.5 s"))

    async def run() -> float:
        async with BrokerHttp(daemon) as http:
            assert (await http.healthz())[0] == 200
            signalled = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            _, text = await poll_until(http.healthz, lambda got: got[0] == 503)
            assert "draining" in text
            assert (await http.status())["phase"] == "draining"
            # A client arriving during the drain is still served, on both sinks.
            assert len(await egd_read(daemon, 64)) == 64
            code, body = await http.entropy(32)
            assert (code, len(body)) == (200, 32)
        await asyncio.to_thread(daemon.process.wait, DEADLINE)
        return time.monotonic() - signalled

    took = asyncio.run(run())
    assert daemon.process.returncode == 0
    # The drain is a promise to the balancer: never shorter than configured.
    assert took >= 1.5
    print(f"DRAIN sigterm-to-exit {took:.3f} s with drain = 1.5 s")
    order = [
        event
        for event in events(daemon)
        if event in ("broker_draining", "broker_closing", "broker_stopped")
    ]
    assert order == ["broker_draining", "broker_closing", "broker_stopped"]


def test_second_sigterm_cuts_the_drain_short(tmp_path: Path) -> None:
    """
    An operator who will not wait sends SIGTERM again: the broker stops at
    once instead of draining for the configured minute.
    """
    daemon = start_daemon(tmp_path, default_config(tmp_path / "state", drain="60 s"))
    daemon.process.send_signal(signal.SIGTERM)
    wait_for_event(daemon, "broker_draining")
    daemon.process.send_signal(signal.SIGTERM)
    assert 0 == daemon.process.wait(DEADLINE)
    assert "broker_drain_cut_short" in events(daemon)


def test_request_accepted_before_close_is_answered(tmp_path: Path) -> None:
    """
    A blocking EGD read waiting on an empty pool when the broker stops is
    answered once the source delivers, before the connection closes: QEMU
    never re-sends a request lost with its connection.
    """
    feeder = FifoFeeder(tmp_path / "device")
    sources = FIFO_SOURCE.format(path=feeder.path)
    config = default_config(tmp_path / "state", sources, pool_size="4 KiB")
    config = config.replace('shutdown_grace = "2 s"', 'shutdown_grace = "30 s"')
    feeder.feed("random")
    daemon = start_daemon(tmp_path, config)
    try:

        async def run() -> bytes:
            async with BrokerHttp(daemon) as http:
                await poll_until(http.healthz, lambda got: got[0] == 200)
            feeder.pause()
            reader, writer = await asyncio.open_connection(*daemon.egd_tcp)
            # Empty the pool, then ask for more than is left.
            await empty_pool(reader, writer)
            writer.write(b"\x02\x40")
            await writer.drain()
            daemon.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for_event, daemon, "broker_closing")
            feeder.feed("random")
            answer = await reader.readexactly(64)
            # Answered, then closed: end of file, not a reset.
            assert await reader.read() == b""
            writer.close()
            return answer

        assert len(asyncio.run(run())) == 64
        assert 0 == daemon.process.wait(DEADLINE)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        feeder.close()


def test_second_sigterm_cuts_the_grace_short(tmp_path: Path) -> None:
    """
    A request that cannot be answered (a stalled source) holds the close for
    at most ``shutdown_grace``; a second SIGTERM ends it at once.
    """
    feeder = FifoFeeder(tmp_path / "device")
    sources = FIFO_SOURCE.format(path=feeder.path)
    config = default_config(tmp_path / "state", sources, pool_size="4 KiB")
    config = config.replace('shutdown_grace = "2 s"', 'shutdown_grace = "600 s"')
    daemon = start_daemon(tmp_path, config)
    try:

        async def run() -> None:
            _, writer = await asyncio.open_connection(*daemon.egd_tcp)
            writer.write(b"\x02\x40")
            await writer.drain()
            daemon.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for_event, daemon, "broker_closing")
            daemon.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(daemon.process.wait, DEADLINE)
            writer.close()

        asyncio.run(run())
        assert daemon.process.returncode == 0
        assert "broker_grace_cut_short" in events(daemon)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        feeder.close()


class NotifySocket:
    """
    What systemd listens on for a ``Type=notify`` service: one datagram per
    notification.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def next_with(self, key: str, timeout: float = DEADLINE) -> dict[str, str]:
        """
        The next notification that sets ``key``, skipping others.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} notification; got {self.messages}")
            self._sock.settimeout(left)
            data = self._sock.recv(4096).decode()
            message = dict(line.split("=", 1) for line in data.splitlines())
            self.messages.append(message)
            if key in message:
                return message

    def close(self) -> None:
        self._sock.close()


def test_systemd_hears_ready_reloading_and_stopping(tmp_path: Path) -> None:
    """
    Under ``Type=notify`` systemd learns that the broker is ready only once
    its listeners accept, that a reload is running and when it ended, and
    that the broker is stopping; the watchdog is fed while it runs.
    """
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = start_daemon(
        tmp_path,
        default_config(tmp_path / "state"),
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"},
    )
    try:
        ready = notify.next_with("READY")
        assert ready["READY"] == "1"
        assert "serving on" in ready["STATUS"]
        # READY came after the listeners: a client may connect at once.
        with socket.create_connection(daemon.egd_tcp, timeout=DEADLINE):
            pass
        assert notify.next_with("WATCHDOG")["WATCHDOG"] == "1"
        daemon.process.send_signal(signal.SIGHUP)
        reloading = notify.next_with("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert notify.next_with("READY")["READY"] == "1"
        daemon.process.send_signal(signal.SIGTERM)
        stopping = notify.next_with("STOPPING")
        assert "draining" in stopping["STATUS"]
        assert 0 == daemon.process.wait(DEADLINE)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        notify.close()


def waiting_http_config(tmp_path: Path, feeder: FifoFeeder, drain: str) -> str:
    sources = FIFO_SOURCE.format(path=feeder.path)
    config = default_config(tmp_path / "state", sources, drain=drain)
    config = config.replace('pool_size = "64 KiB"', 'pool_size = "4 KiB"')
    return config.replace('shutdown_grace = "2 s"', 'shutdown_grace = "60 s"')


async def waiting_request(
    session: aiohttp.ClientSession, daemon: Daemon
) -> "asyncio.Task[aiohttp.ClientResponse]":
    """
    A ``GET /v1/entropy?wait=`` that the empty pool holds.
    """
    url = f"{daemon.http_url}/v1/entropy?bytes=64&wait=20"
    request = asyncio.create_task(session.get(url))
    async with BrokerHttp(daemon) as http:
        await poll_until(http.status, lambda body: body["pool"]["waiters"] > 0)
    return request


def test_waiting_http_request_is_served_while_draining(tmp_path: Path) -> None:
    """
    An HTTP request waiting for entropy (``wait=``) when SIGTERM arrives is
    served in full when the bytes come during the drain.
    """
    feeder = FifoFeeder(tmp_path / "device")
    daemon = start_daemon(tmp_path, waiting_http_config(tmp_path, feeder, "60 s"))

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            request = await waiting_request(session, daemon)
            daemon.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for_event, daemon, "broker_draining")
            feeder.feed("random")
            response = await request
            assert (response.status, len(await response.read())) == (200, 64)

    try:
        asyncio.run(run())
        daemon.process.send_signal(signal.SIGTERM)
        assert 0 == daemon.process.wait(DEADLINE)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        feeder.close()


def test_waiting_http_request_is_told_to_retry_when_the_broker_closes(
    tmp_path: Path,
) -> None:
    """
    A request still waiting when the broker closes gets a prompt ``503
    shutting down`` with ``Retry-After: 1``: it retries elsewhere at once
    instead of hanging until the grace runs out.
    """
    feeder = FifoFeeder(tmp_path / "device")
    daemon = start_daemon(tmp_path, waiting_http_config(tmp_path, feeder, "0 s"))

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            request = await waiting_request(session, daemon)
            daemon.process.send_signal(signal.SIGTERM)
            response = await request
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert "shutting down" in await response.text()

    try:
        asyncio.run(run())
        assert 0 == daemon.process.wait(DEADLINE)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        feeder.close()
