"""
Customers through the real daemon: rate accuracy, quotas, denial, weighted
fairness under scarcity, live reload, quota persistence across a restart.
Several 127.0.0.x addresses stand for different client hosts.
"""

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import wait_until
from tests.integration.clients import BrokerHttp, poll_until
from tests.integration.daemon import Daemon, default_config, start_daemon

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

POOL_READY = 16384
"""Pool level a non-blocking draw waits for: more than any quota drawn here."""

FAST_SOURCE = """
    [[sources]]
    name = "getrandom"
    kind = "getrandom"
    """


async def egd_from(daemon: Daemon, source_ip: str) -> Streams:
    """
    An EGD connection whose source address is ``source_ip``.
    """
    sock = socket.socket()
    sock.bind((source_ip, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, daemon.egd_tcp)
    return await asyncio.open_connection(sock=sock)


@contextlib.asynccontextmanager
async def connected(daemon: Daemon, source_ip: str) -> AsyncIterator[Streams]:
    """
    `egd_from`, closed on the way out.
    """
    streams = await egd_from(daemon, source_ip)
    try:
        yield streams
    finally:
        streams[1].close()
        with contextlib.suppress(ConnectionError):
            await streams[1].wait_closed()


async def nonblocking_total(
    daemon: Daemon, source_ip: str, limit: int = 1 << 20
) -> int:
    """
    Draw with 0x01 FF until the broker answers 0; return the bytes received.

    A 0 must mean "your limits say no", not "nothing is ready yet": right
    after start-up (and for longer on a loaded machine) the pool may still be
    filling, so the draw starts once the pool holds what it is meant to reach.
    """
    async with BrokerHttp(daemon) as broker:
        await poll_until(
            broker.status,
            lambda status: status["pool"]["level"] >= min(limit, POOL_READY),
        )
    reader, writer = await egd_from(daemon, source_ip)
    total = 0
    try:
        async with asyncio.timeout(30):
            while total < limit:
                writer.write(b"\x01\xff")
                count = (await reader.readexactly(1))[0]
                if count == 0:
                    return total
                total += len(await reader.readexactly(count))
    finally:
        writer.close()
    return total


async def measure_rate(streams: Streams, warmup: float, seconds: float) -> float:
    """
    Read with pipelined blocking requests; bytes per second after ``warmup``.
    """
    reader, writer = streams
    loop = asyncio.get_running_loop()
    start = loop.time()
    counted = 0
    measuring_since: float | None = None
    async with asyncio.timeout(warmup + seconds + 30):
        # Enough requests in flight that the broker always has one to serve,
        # even when this process is slow to answer: the limit sets the pace.
        writer.write(b"\x02\x40" * 64)
        while True:
            data = await reader.read(4096)
            assert data, "connection closed"
            now = loop.time()
            if measuring_since is None and now - start >= warmup:
                measuring_since = now
            elif measuring_since is not None:
                counted += len(data)
                if now - measuring_since >= seconds:
                    return counted / (now - measuring_since)
            writer.write(b"\x02\x40" * (len(data) // 64 + (1 if len(data) % 64 else 0)))


def customers_config(tmp_path: Path, customers: str, sources: str = FAST_SOURCE) -> str:
    return default_config(tmp_path / "state", sources, customers)


def test_throttled_client_gets_the_configured_rate(tmp_path: Path) -> None:
    """
    A client limited to 2 KiB/s receives 2 KiB/s within 10% over a few seconds,
    while another customer's client is not held back.
    """
    customers = """
        [[customers]]
        id = "slow"
        networks = ["127.0.0.2/32"]
        client_rate = "2 KiB/s"
        # A second of the rate: a broker held up by a busy machine catches up
        # afterwards, as it would in production, instead of losing the time.
        client_burst = "2 KiB"
        """
    daemon = start_daemon(tmp_path, customers_config(tmp_path, customers))

    async def run() -> tuple[float, float]:
        async with connected(daemon, "127.0.0.2") as streams:
            slow = await measure_rate(streams, 1.0, 3.0)
        async with connected(daemon, "127.0.0.3") as streams:
            free = await measure_rate(streams, 0.2, 1.0)
        return slow, free

    try:
        slow, free = asyncio.run(run())
    finally:
        daemon.stop()
    print(f"throttled client: {slow:.0f} B/s for 2048 B/s configured")
    assert 2048 * 0.9 <= slow <= 2048 * 1.1
    assert free > 10 * 2048


def test_quota_spent_gives_zero_and_403(tmp_path: Path) -> None:
    """
    Past its quota a customer's non-blocking reads return 0 bytes and HTTP
    answers 403 saying which limit and until when.
    """
    customers = """
        [[customers]]
        id = "metered"
        networks = ["127.0.0.4/32"]
        quota = "4 KiB/day"
        """
    daemon = start_daemon(tmp_path, customers_config(tmp_path, customers))

    async def run() -> tuple[int, int, int, dict[str, object]]:
        first = await nonblocking_total(daemon, "127.0.0.4")
        again = await nonblocking_total(daemon, "127.0.0.4")
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.4", 0))
        async with (
            aiohttp.ClientSession(daemon.http_url, connector=connector) as session,
            session.get("/v1/entropy", params={"bytes": "16"}) as response,
        ):
            return first, again, response.status, await response.json()

    try:
        first, again, status, body = asyncio.run(run())
    finally:
        daemon.stop()
    assert 4096 == first
    assert 0 == again
    assert 403 == status
    assert "quota" == body["limit"]
    assert str(body["until"]).endswith("T00:00:00Z")


def test_denied_default_customer_is_refused(tmp_path: Path) -> None:
    """
    With a denying default, unknown hosts are closed at accept over EGD and
    get 403 over HTTP; a known customer is served.
    """
    customers = """
        [[customers]]
        id = "known"
        networks = ["127.0.0.5/32"]

        [[customers]]
        id = "default"
        deny = true
        """
    daemon = start_daemon(tmp_path, customers_config(tmp_path, customers))

    async def run() -> tuple[bytes, bytes, int]:
        reader, writer = await egd_from(daemon, "127.0.0.9")
        # Closed at accept: EOF before the client says anything.
        async with asyncio.timeout(30):
            refused = await reader.read(16)
        writer.close()
        reader, writer = await egd_from(daemon, "127.0.0.5")
        writer.write(b"\x02\x10")
        async with asyncio.timeout(30):
            served = await reader.readexactly(16)
        writer.close()
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.9", 0))
        async with (
            aiohttp.ClientSession(daemon.http_url, connector=connector) as session,
            session.get("/v1/entropy", params={"bytes": "16"}) as response,
        ):
            return refused, served, response.status

    try:
        refused, served, status = asyncio.run(run())
    finally:
        daemon.stop()
    assert b"" == refused
    assert 16 == len(served)
    assert 403 == status


class FifoFeeder:
    """
    Feeds a FIFO source at a fixed pace from a thread: a slow hardware RNG.

    Like real hardware it banks nothing: the pipe holds one page, and time the
    broker spent not reading (starting up, say) is not made up later, so
    output is scarce from the moment that page is drained.
    """

    def __init__(self, path: Path, bytes_per_second: int) -> None:
        self.path = path
        self.rate = bytes_per_second
        self.capacity = 0
        """Bytes the pipe can hold: output readers may get beyond the rate."""
        self._fd = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        # O_RDWR: opening a FIFO this way never waits for the reader.
        # O_NONBLOCK: a full pipe (broker paused or gone) must not hold the
        # thread in write() where stop() cannot reach it.
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, 4096)
        self.capacity = fcntl.fcntl(self._fd, fcntl.F_GETPIPE_SZ)
        self._thread.start()

    def _run(self) -> None:
        tick = 1 / 16
        chunk = os.urandom(self.rate // 16)
        next_write = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    os.write(self._fd, chunk)  # under PIPE_BUF: all or nothing
                except BlockingIOError:
                    pass  # pipe full: the broker is not reading; try next tick
                else:
                    chunk = os.urandom(len(chunk))
                next_write = max(next_write + tick, time.monotonic())
                # Pacing the feed, not synchronising with anything.
                self._stop.wait(max(0.0, next_write - time.monotonic()))
        finally:
            os.close(self._fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "slow-rng"
    os.mkfifo(path)
    return path


# Warm-up beyond what the pool (4 KiB here) and the FIFO held, so every reader
# is backlogged on the slow source before shares are counted.
WARMUP_MARGIN = 8 * 1024
# Several seconds of the slow source's output: enough turns for shares within 10 %.
MEASURED_BYTES = 60_000


def test_weights_share_scarce_output(tmp_path: Path, fifo: Path) -> None:
    """
    Two customers weighted 1:3, each with two clients reading as fast as they
    can from a slow source, get output shares within 10% of 1:3.
    """
    sources = f"""
        [[sources]]
        name = "slow"
        kind = "device"
        path = "{fifo}"
        read_size = 512
        """
    customers = """
        [[customers]]
        id = "light"
        networks = ["127.0.0.6/32"]
        weight = 1

        [[customers]]
        id = "heavy"
        networks = ["127.0.0.7/32"]
        weight = 3
        """
    config = customers_config(tmp_path, customers, sources).replace(
        'pool_size = "64 KiB"', 'pool_size = "4 KiB"'
    )
    feeder = FifoFeeder(fifo, 10_000)
    feeder.start()
    daemon = start_daemon(tmp_path, config)

    async def run() -> dict[str, int]:
        streams = {
            name: [await egd_from(daemon, ip) for _ in range(2)]
            for name, ip in (("light", "127.0.0.6"), ("heavy", "127.0.0.7"))
        }
        counts = {"light": 0, "heavy": 0}
        warmup = 4096 + feeder.capacity + WARMUP_MARGIN
        received = 0
        measuring = asyncio.Event()
        warmed = asyncio.Event()
        measured = asyncio.Event()

        async def drain(
            name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            nonlocal received
            writer.write(b"\x02\xff" * 2)
            while True:
                data = await reader.read(4096)
                assert data, "connection closed"
                received += len(data)
                if received >= warmup:
                    warmed.set()
                if measuring.is_set():
                    counts[name] += len(data)
                    if sum(counts.values()) >= MEASURED_BYTES:
                        measured.set()
                writer.write(b"\x02\xff" * (len(data) // 255 + 1))

        tasks = [
            asyncio.create_task(drain(name, reader, writer))
            for name, pairs in streams.items()
            for reader, writer in pairs
        ]
        # Shares are counted over a fixed amount of output, however long the
        # slow source takes to make it; the deadline only catches a hang.
        async with asyncio.timeout(120):
            await warmed.wait()
            measuring.set()
            await measured.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pairs in streams.values():
            for _, writer in pairs:
                writer.close()
        return counts

    try:
        counts = asyncio.run(run())
    finally:
        daemon.stop()
        feeder.stop()
    ratio = counts["heavy"] / counts["light"]
    print(f"weighted shares: heavy/light = {ratio:.2f} (target 3.00); {counts}")
    assert 2.7 <= ratio <= 3.3


def test_sighup_changes_the_rate_of_a_live_connection(tmp_path: Path) -> None:
    """
    Editing a customer's rate and sending SIGHUP applies it to a connection
    that stays open; a broken file sent later is refused and changes nothing.
    """
    customers = """
        [[customers]]
        id = "tenant"
        networks = ["127.0.0.8/32"]
        client_rate = "1 KiB/s"
        # At least a second of either rate, so a broker held up by a busy
        # machine catches up afterwards instead of losing the time.
        client_burst = "4 KiB"
        """
    config_text = customers_config(tmp_path, customers)
    daemon = start_daemon(tmp_path, config_text)
    config_path = tmp_path / "ebroker.toml"

    def logged(event: str) -> int:
        return sum(1 for entry in daemon.logs() if entry.get("event") == event)

    async def run() -> tuple[float, float, float]:
        async with connected(daemon, "127.0.0.8") as streams:
            return await rates(streams)

    async def rates(streams: Streams) -> tuple[float, float, float]:
        before = await measure_rate(streams, 0.5, 2.0)
        config_path.write_text(config_text.replace('"1 KiB/s"', '"4 KiB/s"'))
        daemon.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_until, lambda: logged("reloaded") == 1, 60)
        after = await measure_rate(streams, 0.5, 2.0)
        config_path.write_text(config_text.replace('"1 KiB/s"', '"fast"'))
        daemon.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_until, lambda: logged("reload_refused") == 1, 60)
        still = await measure_rate(streams, 0.2, 1.5)
        return before, after, still

    try:
        before, after, still = asyncio.run(run())
    finally:
        daemon.stop()
    print(f"live reload: {before:.0f} B/s before, {after:.0f} B/s after")
    assert 1024 * 0.85 <= before <= 1024 * 1.15
    assert 4096 * 0.85 <= after <= 4096 * 1.15
    assert 4096 * 0.85 <= still <= 4096 * 1.15
    refused = [e for e in daemon.logs() if e.get("event") == "reload_refused"]
    assert "client_rate" in str(refused[0]["reason"])


def test_restart_keeps_the_days_quota(tmp_path: Path) -> None:
    """
    Quota used before a restart still counts after it: no fresh daily quota.
    """
    customers = """
        [[customers]]
        id = "metered"
        networks = ["127.0.0.10/32"]
        quota = "8 KiB/day"
        """
    config = customers_config(tmp_path, customers)
    daemon = start_daemon(tmp_path, config)
    try:
        first = asyncio.run(nonblocking_total(daemon, "127.0.0.10", limit=6000))
    finally:
        assert 0 == daemon.stop()
    saved = json.loads((tmp_path / "state" / "accounts.json").read_text())
    assert saved
    daemon = start_daemon(tmp_path, config)
    try:
        second = asyncio.run(nonblocking_total(daemon, "127.0.0.10"))
    finally:
        daemon.stop()
    assert 6000 <= first < 6300
    assert 8192 == first + second


def test_http_rate_limit_answers(tmp_path: Path) -> None:
    """
    Over HTTP a token-authenticated client gets RateLimit headers, 429 with
    Retry-After once its burst is spent, is paced through with wait=, and an
    unknown token gets 401.
    """
    customers = """
        [[customers]]
        id = "webshop"
        tokens = [
            "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
        ]
        client_rate = "1 KiB/s"
        """
    daemon = start_daemon(tmp_path, customers_config(tmp_path, customers))
    auth = {"Authorization": "Bearer password"}

    async def run() -> list[tuple[int, dict[str, str], int]]:
        answers = []
        async with aiohttp.ClientSession(daemon.http_url) as session:
            for params, headers in (
                ({"bytes": "1024", "wait": "5"}, auth),
                ({"bytes": "1024"}, auth),
                ({"bytes": "2048", "wait": "10"}, auth),
                ({"bytes": "16"}, {"Authorization": "Bearer nope"}),
            ):
                async with session.get(
                    "/v1/entropy", params=params, headers=headers
                ) as response:
                    body = await response.read()
                    answers.append((response.status, dict(response.headers), len(body)))
        return answers

    try:
        first, limited, paced, unknown = asyncio.run(run())
    finally:
        daemon.stop()
    assert (200, 1024) == (first[0], first[2])
    assert "1024" == first[1]["RateLimit-Limit"]
    assert 429 == limited[0]
    assert int(limited[1]["Retry-After"]) >= 1
    assert "0" == limited[1]["RateLimit-Remaining"]
    assert (200, 2048) == (paced[0], paced[2])
    assert 401 == unknown[0]
