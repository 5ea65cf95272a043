"""
The ``device`` source (and its alias ``hwrng``): any character device, FIFO or
file — /dev/hwrng, a serial TRNG's tty, a named pipe fed by another program.

Pollable files (FIFOs, ttys, most character devices) are read with non-blocking
I/O on the event loop. Files the kernel cannot poll (regular files, /dev/hwrng,
whose driver has no poll method) are read by a daemon thread, so a device that
hangs can neither block the loop nor keep the process from exiting.
"""

import asyncio
import contextlib
import os
import termios
import threading
import tty
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import Field

from broker.configbase import Duration, Size, SourceConfigBase
from broker.errors import SourceError
from sources.fdio import read_when_ready


class DeviceSourceConfig(SourceConfigBase):
    """
    ``kind = "device"`` (any path) or ``kind = "hwrng"`` (path defaults to /dev/hwrng).
    """

    kind: Literal["device", "hwrng"] = Field(description="source driver")
    path: Path = Field(
        default=Path("/dev/hwrng"), description="device, FIFO or file to read"
    )
    read_size: Size = Field(
        default=4096, ge=1, le=1 << 20, description="bytes per read"
    )
    optional: bool = Field(
        default=False,
        description="skip this source with a warning at start-up when the path is "
        "absent or unreadable, instead of reporting it failed",
    )
    stall_timeout: Duration = Field(
        default=30.0,
        gt=0,
        description="a read that delivers nothing for this long is reported as a stall",
    )
    nominal_rate: Size | None = Field(
        default=None, description="bytes per second the device is expected to deliver"
    )


class _ThreadRead:
    """
    One blocking read in a daemon thread; its result lands in an asyncio future.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, size: int) -> None:
        self.future: asyncio.Future[bytes] = loop.create_future()
        self.close_when_done = False
        self._loop = loop
        self._fd = fd
        self._size = size
        threading.Thread(
            target=self._run, name="ebroker-device-read", daemon=True
        ).start()

    def _run(self) -> None:
        result: bytes | BaseException
        try:
            result = os.read(self._fd, self._size)
        except OSError as exc:
            result = exc
        if self.close_when_done:
            os.close(self._fd)
        with contextlib.suppress(RuntimeError):  # loop already closed at exit
            self._loop.call_soon_threadsafe(self._deliver, result)

    def _deliver(self, result: bytes | BaseException) -> None:
        if self.future.done():
            return
        if isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


class DeviceSource:
    """
    Reads raw bytes from a device path.
    """

    def __init__(self, config: DeviceSourceConfig) -> None:
        self.name = config.name
        self.kind: str = config.kind
        self.priority = config.priority
        self.credit = config.credit
        self.path = config.path
        self._read_size = config.read_size
        self._stall_timeout = config.stall_timeout
        self._nominal_rate = config.nominal_rate
        self._fd: int | None = None
        self._pollable = False
        self._pending: _ThreadRead | None = None

    @property
    def nominal_rate(self) -> float | None:
        return float(self._nominal_rate) if self._nominal_rate else None

    async def __aenter__(self) -> Self:
        # A FIFO is opened read-write so that it never reports EOF while no
        # program has it open for writing: a feeder that restarts is a stall
        # (caught by stall_timeout), not a stream of instant EOFs.
        mode = os.O_RDWR if self.path.is_fifo() else os.O_RDONLY
        try:
            fd = os.open(self.path, mode | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise SourceError(f"cannot open {self.path}: {exc.strerror}") from exc
        if os.isatty(fd):
            # A serial TRNG must not have its bytes mangled by line discipline.
            with contextlib.suppress(termios.error):
                tty.setraw(fd)
        self._fd = fd
        self._pollable = self._probe_pollable(fd)
        if not self._pollable:
            os.set_blocking(fd, True)
        return self

    @staticmethod
    def _probe_pollable(fd: int) -> bool:
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(fd, lambda: None)
        except OSError:  # EPERM from epoll: regular file or a driver without poll
            return False
        loop.remove_reader(fd)
        return True

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._pending is not None and not self._pending.future.done():
            # The thread still uses the fd: it closes it when its read returns.
            self._pending.close_when_done = True
            return
        if self._pollable:
            asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)

    async def read(self) -> bytes:
        if self._fd is None:
            raise SourceError(f"{self.path} is not open")
        try:
            async with asyncio.timeout(self._stall_timeout):
                if self._pollable:
                    data = await read_when_ready(self._fd, self._read_size)
                else:
                    data = await self._read_in_thread(self._fd)
        except TimeoutError:
            raise SourceError(
                f"{self.path} delivered nothing for {self._stall_timeout:g} s"
            ) from None
        except OSError as exc:
            raise SourceError(f"read from {self.path} failed: {exc.strerror}") from exc
        if not data:
            raise SourceError(f"{self.path} reached end of file")
        return data

    async def _read_in_thread(self, fd: int) -> bytes:
        if self._pending is None or self._pending.future.done():
            self._pending = _ThreadRead(asyncio.get_running_loop(), fd, self._read_size)
        # shield: a timed-out wait must not lose the bytes the thread may still return
        data = await asyncio.shield(self._pending.future)
        self._pending = None
        return data

    def details(self) -> dict[str, Any]:
        return {}
