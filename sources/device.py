"""
The ``device`` source (and its alias ``hwrng``): any character device, FIFO or
file — /dev/hwrng, a serial TRNG's tty, a named pipe fed by another program.

Pollable files (FIFOs, ttys, most character devices) are read with non-blocking
I/O on the event loop. Files the kernel cannot poll (regular files, /dev/hwrng,
whose driver has no poll method) are read by a daemon thread, so a device that
hangs can neither block the loop nor keep the process from exiting.

A read has no time limit of its own: the supervisor's watchdog cancels a read
that delivers nothing for too long, then closes the source. A cancelled
pollable read leaves no reader registered. A thread's read cannot be
interrupted, so the thread keeps the descriptor and closes it itself when its
read returns; the source can be reopened meanwhile on a new descriptor.

``optional = true`` forgives absence only: a hardware RNG that this machine
does not have (a VM without /dev/hwrng) is skipped, but one that is there and
cannot be opened (permissions, a missing udev rule) is a misconfiguration. It is
reported failed with the reason, retried like any failed source (so fixing the
permissions brings it back), and `DeviceSource.unavailable` says why for the
broker's health.
"""

import asyncio
import contextlib
import errno
import os
import termios
import threading
import tty
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

from pydantic import Field

from broker.configbase import ByteRate, Size, SourceConfigBase
from broker.errors import SourceError
from sources.fdio import read_when_ready


class DeviceSourceConfig(SourceConfigBase):
    """
    ``kind = "device"`` (any path) or ``kind = "hwrng"`` (path defaults to /dev/hwrng).
    """

    replaced_keys: ClassVar[Mapping[str, str]] = {"stall_timeout": "watchdog"}

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
        "absent, instead of reporting it failed; a path that exists but cannot be "
        "opened is reported failed all the same",
    )
    nominal_rate: ByteRate | None = Field(
        default=None, description="bytes per second the device is expected to deliver"
    )


_DENIED = (errno.EACCES, errno.EPERM)


def is_absent(path: Path) -> bool:
    """
    Whether nothing is at ``path`` (the device this machine does not have).

    A path that cannot even be examined (a parent directory without search
    permission) is not absent: something is there that the broker may not use.
    """
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def may_skip(config: DeviceSourceConfig) -> bool:
    """
    Whether the supervisor may skip this source when its first open fails: only
    an optional device that is absent.
    """
    return config.optional and is_absent(config.path)


def access_problem(path: Path) -> str | None:
    """
    Why a device at ``path`` could not be opened for reading by this process,
    judged without opening it (opening some devices starts or resets them).

    Returns:
        None when it looks readable; else the reason, naming the path.
    """
    if is_absent(path):
        return f"no such device {path}"
    if os.path.isdir(path):
        return f"{path} is a directory, not a device"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by uid {os.geteuid()} (permission denied)"
    return None


class _ThreadRead:
    """
    One blocking read in a daemon thread; its result lands in an asyncio future.

    The descriptor is the thread's until its read returns, so closing it is
    handed over (`abandon`): closed at once if the read is over, else by the
    thread when it is. The lock makes that decision once, on one side only; it
    is never held across the read.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, size: int) -> None:
        self.future: asyncio.Future[bytes] = loop.create_future()
        self._loop = loop
        self._fd = fd
        self._size = size
        self._lock = threading.Lock()
        self._returned = False
        self._abandoned = False
        threading.Thread(
            target=self._run, name="ebroker-device-read", daemon=True
        ).start()

    def _run(self) -> None:
        result: bytes | BaseException
        try:
            result = os.read(self._fd, self._size)
        except OSError as exc:
            result = exc
        with self._lock:
            self._returned = True
            abandoned = self._abandoned
        if abandoned:
            os.close(self._fd)
            return
        with contextlib.suppress(RuntimeError):  # loop already closed at exit
            self._loop.call_soon_threadsafe(self._deliver, result)

    def _deliver(self, result: bytes | BaseException) -> None:
        if self._abandoned or self.future.done():
            return
        if isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)

    def abandon(self) -> None:
        """
        Drop the read and close the descriptor once the thread is done with it.
        """
        with self._lock:
            self._abandoned = True
            returned = self._returned
        if returned:
            os.close(self._fd)


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
        self._nominal_rate = (
            config.nominal_rate.per_second if config.nominal_rate else None
        )
        self._fd: int | None = None
        self._pollable = False
        self._pending: _ThreadRead | None = None
        self._denied: str | None = None

    @property
    def unavailable(self) -> str | None:
        """
        Why the last open was refused by permissions, until an open succeeds.
        """
        return self._denied

    @property
    def nominal_rate(self) -> float | None:
        return float(self._nominal_rate) if self._nominal_rate else None

    async def __aenter__(self) -> Self:
        # A FIFO is opened read-write so that it never reports EOF while no
        # program has it open for writing: a feeder that restarts is a stall
        # (caught by the supervisor's watchdog), not a stream of instant EOFs.
        mode = os.O_RDWR if self.path.is_fifo() else os.O_RDONLY
        try:
            fd = os.open(self.path, mode | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno in _DENIED:
                self._denied = f"cannot open {self.path}: permission denied"
                raise SourceError(
                    f"{self._denied} (check its owner and mode, or the udev rule)"
                ) from exc
            raise SourceError(f"cannot open {self.path}: {exc.strerror}") from exc
        self._denied = None
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
        pending, self._pending = self._pending, None
        if fd is None:
            return
        if pending is not None:
            # A cancelled thread read may still be using the fd.
            pending.abandon()
            return
        if self._pollable:
            asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)

    async def read(self) -> bytes:
        if self._fd is None:
            raise SourceError(f"{self.path} is not open")
        try:
            if self._pollable:
                data = await read_when_ready(self._fd, self._read_size)
            else:
                data = await self._read_in_thread(self._fd)
        except OSError as exc:
            raise SourceError(f"read from {self.path} failed: {exc.strerror}") from exc
        if not data:
            raise SourceError(f"{self.path} reached end of file")
        return data

    async def _read_in_thread(self, fd: int) -> bytes:
        if self._pending is None:
            self._pending = _ThreadRead(asyncio.get_running_loop(), fd, self._read_size)
        # shield: cancelling this wait cannot stop the thread, and must not lose
        # the bytes it returns if the source is read again; the next read, or
        # __aexit__, takes the pending read over.
        data = await asyncio.shield(self._pending.future)
        self._pending = None
        return data

    def details(self) -> dict[str, Any]:
        return {}
