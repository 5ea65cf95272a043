"""
Clients and feeders for integration tests that drive the real daemon: an HTTP
client for status, health and metrics, an EGD reader that draws continuously,
and a writer that feeds a FIFO source with chosen bytes.
"""

import asyncio
import contextlib
import fcntl
import os
import select
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import DEADLINE
from tests.integration.daemon import Daemon, start_daemon

T = TypeVar("T")

# The smallest pipe buffer Linux grants (one page): little stale data sits
# between a change of what the feeder writes and the broker seeing it.
_PIPE_SIZE = 4096
_CHUNK = 1024


@contextlib.contextmanager
def running_daemon(tmp_path: Path, config_text: str) -> Iterator[Daemon]:
    """
    Start the broker with ``config_text`` and make sure it is gone afterwards.
    """
    daemon = start_daemon(tmp_path, config_text)
    try:
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


def log_time(entry: dict[str, object]) -> float:
    """
    The wall-clock time of one JSON log entry (structlog's ISO timestamp).
    """
    return datetime.fromisoformat(str(entry["timestamp"])).timestamp()


async def poll_until(
    fetch: Callable[[], Awaitable[T]],
    predicate: Callable[[T], bool],
    timeout: float = DEADLINE,
    interval: float = 0.01,
) -> T:
    """
    Fetch until ``predicate`` holds for the result, and return that result.

    This waits on a condition in another process; it is not a sleep standing
    in for one.

    Raises:
        AssertionError: the condition did not hold within ``timeout``; the
            message shows the last value fetched.
    """
    last: T | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await fetch()
                if predicate(last):
                    return last
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(
            f"condition not met within {timeout} s; last: {last!r}"
        ) from None


class BrokerHttp:
    """
    The daemon's HTTP API: status, metrics and simulator control from the
    operator-plane sink; health and entropy from the tenant-plane sink, as a
    guest would ask.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._operator = daemon.operator_url
        self._tenant = daemon.http_url
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=DEADLINE)
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("BrokerHttp is not open")
        return self._session

    async def status(self) -> dict[str, Any]:
        async with self.session.get(self._operator + "/v1/status") as resp:
            resp.raise_for_status()
            document: dict[str, Any] = await resp.json()
            return document

    async def source(self, name: str) -> dict[str, Any]:
        """
        One source's entry in /v1/status, with the document's ``tiers`` and
        ``health`` added under ``_tiers`` and ``_health``.
        """
        document = await self.status()
        for entry in document["sources"]:
            if entry["name"] == name:
                return {
                    **entry,
                    "_tiers": document["tiers"],
                    "_health": document["health"],
                }
        raise KeyError(f"no source {name!r} in {document['sources']}")

    async def healthz(self) -> tuple[int, str]:
        async with self.session.get(self._tenant + "/healthz") as resp:
            return resp.status, await resp.text()

    async def metrics(self) -> str:
        async with self.session.get(self._operator + "/metrics") as resp:
            resp.raise_for_status()
            return await resp.text()

    async def entropy(self, count: int) -> tuple[int, bytes]:
        """
        A non-blocking ``GET /v1/entropy``: the status and the body.
        """
        async with self.session.get(
            self._tenant + "/v1/entropy", params={"bytes": str(count)}
        ) as resp:
            return resp.status, await resp.read()

    async def simulator(self, serial: str, action: str) -> None:
        url = f"{self._operator}/v1/simulator/{serial}/{action}"
        async with self.session.post(url) as resp:
            assert 200 == resp.status, await resp.text()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """
    The value of the sample ``name`` whose labels include ``labels``, if any.
    """
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(key) == value for key, value in labels.items()
            ):
                return float(sample.value)
    return None


async def empty_pool(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """
    Draw with non-blocking EGD reads (``01 FF``) until the broker answers
    that it has nothing ready; the number of bytes drawn.
    """
    drawn = 0
    while True:
        writer.write(b"\x01\xff")
        size = (await reader.readexactly(1))[0]
        if size == 0:
            return drawn
        drawn += len(await reader.readexactly(size))


class EgdReader:
    """
    One EGD/TCP client doing blocking reads of ``size`` bytes back to back, as
    a VM's rng-egd backend does, counting every byte that comes back.

    Any error (a closed connection, a short reply) ends the task and is kept in
    `error`; `check` raises it.
    """

    def __init__(self, daemon: Daemon, size: int = 64) -> None:
        if not 0 < size < 256:
            raise ValueError("an EGD read asks for 1..255 bytes")
        self._address = daemon.egd_tcp
        self._size = size
        self.requests = 0
        self.received = 0
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()

    async def __aenter__(self) -> Self:
        reader, writer = await asyncio.open_connection(*self._address)
        self._task = asyncio.create_task(self._run(reader, writer), name="egd-reader")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel(msg="test finished")
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = bytes([0x02, self._size])
        try:
            while True:
                writer.write(request)
                await writer.drain()
                data = await reader.readexactly(self._size)
                self.requests += 1
                self.received += len(data)
                self._progress.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - kept for the test to report
            self.error = exc
        finally:
            writer.close()

    def check(self) -> None:
        """
        Raise if the reader stopped on an error.
        """
        if self.error is not None:
            raise AssertionError(f"EGD reader failed: {self.error!r}")
        if self._task is not None and self._task.done() and not self._task.cancelled():
            raise AssertionError("EGD reader stopped")

    async def answered(self, more: int, timeout: float = DEADLINE) -> None:
        """
        Wait until ``more`` further requests have been answered in full.
        """
        target = self.requests + more
        async with asyncio.timeout(timeout):
            while self.requests < target:
                self.check()
                self._progress.clear()
                await self._progress.wait()
        self.check()


def _random(size: int) -> bytes:
    return os.urandom(size)


def _zeros(size: int) -> bytes:
    return bytes(size)


def _low_nibbles(size: int) -> bytes:
    # 16 values instead of 256: each window's first value is seen ~32 times
    # in 512, well past the APT cut-off of 19.
    return bytes(b & 0x0F for b in os.urandom(size))


PATTERNS: dict[str, Callable[[int], bytes]] = {
    "random": _random,
    "zeros": _zeros,
    "biased": _low_nibbles,
}


class FifoFeeder:
    """
    A thread writing a chosen pattern into a FIFO as fast as it is read.

    The FIFO is held open read-write, so the broker never sees end of file;
    `pause` stops writing altogether (a stalled device). `switched_at` is the
    wall-clock time at which the first byte of the current pattern entered
    the pipe, for measuring detection times.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._closing = False
        self._pattern: str | None = None
        self._generation = 0
        self.switched_at: float | None = None
        self.written: dict[str, int] = dict.fromkeys(PATTERNS, 0)
        self._thread = threading.Thread(
            target=self._run, name="fifo-feeder", daemon=True
        )
        self._thread.start()

    def feed(self, pattern: str) -> None:
        """
        Write ``pattern`` from now on (``random``, ``zeros`` or ``biased``).
        """
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}")
        self._switch(pattern)

    def pause(self) -> None:
        """
        Stop writing; the pipe drains and the reader sees nothing more.
        """
        self._switch(None)

    def _switch(self, pattern: str | None) -> None:
        with self._lock:
            self._pattern = pattern
            self._generation += 1
            self.switched_at = None
        self._changed.set()

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._changed.set()
        self._thread.join(10)
        os.close(self._fd)

    def _run(self) -> None:
        pending = b""
        generation = -1
        while True:
            with self._lock:
                if self._closing:
                    return
                pattern, current = self._pattern, self._generation
                self._changed.clear()
            if current != generation:
                # Bytes of the previous pattern not yet in the pipe are dropped.
                pending, generation = b"", current
            if pattern is None:
                self._changed.wait()
                continue
            if not pending:
                pending = PATTERNS[pattern](_CHUNK)
            # Wake at least every 50 ms to notice a new pattern or close.
            _, writable, _ = select.select([], [self._fd], [], 0.05)
            if not writable:
                continue
            try:
                count = os.write(self._fd, pending)
            except BlockingIOError:
                continue
            with self._lock:
                if self._generation == generation and self.switched_at is None:
                    self.switched_at = time.time()
            self.written[pattern] += count
            pending = pending[count:]
