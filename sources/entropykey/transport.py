"""
Byte-stream transports between the driver and one Entropy Key.

Each transport only moves bytes; the protocol lives in `session`. Transports
raise `broker.errors.SourceError` when the key vanishes (unplug, EOF, USB error),
and never block the event loop: USB reads run in a one-thread executor of their
own, ttys and sockets use non-blocking I/O.
"""

import asyncio
import contextlib
import errno
import os
import termios
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from broker.errors import SourceError
from sources.fdio import read_when_ready

VENDOR_ID = 0x20DF
PRODUCT_ID = 0x0001
DATA_INTERFACE = 1
ENDPOINT_IN = 0x81
ENDPOINT_OUT = 0x03
_USB_READ_SIZE = 1024
# A USB read waits at most this long in its thread, so cancellation (shutdown,
# a source restart) never waits longer for the thread to notice.
_USB_READ_TIMEOUT_MS = 200
_STREAM_READ_SIZE = 4096


class KeyTransport(Protocol):
    """
    A bidirectional byte stream to one key.
    """

    description: str
    """Where the key is attached, for status and logs (bus path, device path)."""

    async def open(self) -> None: ...

    async def read(self) -> bytes:
        """
        Return the next bytes from the key (never empty).

        Raises:
            SourceError: the key is gone.
        """
        ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


# ---- tty ----


def set_raw_tty(fd: int) -> None:
    """
    Put a tty in the mode ekeyd uses: 8N1, no flow control, no line discipline.
    """
    attrs = termios.tcgetattr(fd)
    iflag, oflag, cflag, lflag = attrs[0], attrs[1], attrs[2], attrs[3]
    iflag &= ~(
        termios.BRKINT | termios.IGNPAR | termios.PARMRK | termios.INPCK
        | termios.ISTRIP | termios.INLCR | termios.IGNCR | termios.ICRNL
        | termios.IXON | termios.IXOFF | termios.IXANY | termios.IMAXBEL
        | getattr(termios, "IUTF8", 0) | termios.IUCLC
    )  # fmt: skip
    iflag |= termios.IGNBRK
    oflag &= ~(termios.OPOST | termios.OCRNL | termios.ONOCR | termios.ONLRET)
    cflag &= ~(termios.CSIZE | termios.CSTOPB | termios.PARENB | termios.PARODD)
    cflag &= ~termios.CRTSCTS
    cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL | termios.HUPCL
    lflag &= ~(
        termios.ISIG | termios.ICANON | termios.IEXTEN | termios.ECHO | termios.ECHOE
        | termios.ECHOK | termios.ECHONL | termios.NOFLSH | termios.TOSTOP
        | termios.ECHOPRT | termios.ECHOCTL | termios.ECHOKE
    )  # fmt: skip
    attrs[0], attrs[1], attrs[2], attrs[3] = iflag, oflag, cflag, lflag
    attrs[4] = attrs[5] = termios.B115200
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    termios.tcflush(fd, termios.TCIOFLUSH)


class TtyTransport:
    """
    A key behind the kernel's cdc_acm driver: /dev/ttyACM* or /dev/entropykey/SERIAL.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        self._fd: int | None = None

    async def open(self) -> None:
        try:
            fd = os.open(
                self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError as exc:
            raise SourceError(f"cannot open {self.path}: {exc.strerror}") from exc
        if os.isatty(fd):
            try:
                set_raw_tty(fd)
            except termios.error as exc:
                os.close(fd)
                raise SourceError(f"cannot set raw mode on {self.path}: {exc}") from exc
        self._fd = fd

    async def read(self) -> bytes:
        fd = self._require_fd()
        try:
            data = await read_when_ready(fd, _STREAM_READ_SIZE)
        except OSError as exc:
            raise SourceError(f"read from {self.path} failed: {exc.strerror}") from exc
        if not data:
            raise SourceError(f"{self.path} was closed (key unplugged?)")
        return data

    async def write(self, data: bytes) -> None:
        fd = self._require_fd()
        view = memoryview(data)
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                await asyncio.sleep(
                    0.01
                )  # a tty's output buffer drains in microseconds
                continue
            except OSError as exc:
                raise SourceError(
                    f"write to {self.path} failed: {exc.strerror}"
                ) from exc
            view = view[written:]

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise SourceError(f"{self.path} is not open")
        return self._fd


# ---- unix socket ----


class UnixTransport:
    """
    A key behind a Unix stream socket, as ekey-ulusbd or `ebroker simulate-key`
    provide.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"unix:{path}"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        except OSError as exc:
            raise SourceError(f"cannot connect to {self.path}: {exc.strerror}") from exc

    async def read(self) -> bytes:
        if self._reader is None:
            raise SourceError(f"{self.path} is not connected")
        try:
            data = await self._reader.read(_STREAM_READ_SIZE)
        except OSError as exc:
            raise SourceError(f"read from {self.path} failed: {exc.strerror}") from exc
        if not data:
            raise SourceError(f"{self.path} closed the connection (key unplugged?)")
        return data

    async def write(self, data: bytes) -> None:
        if self._writer is None:
            raise SourceError(f"{self.path} is not connected")
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise SourceError(f"write to {self.path} failed: {exc}") from exc

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# ---- USB (pyusb) ----


def _usb_error_text(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if code == errno.ENODEV:
        return "key vanished from the USB bus (unplugged?)"
    return str(exc) or exc.__class__.__name__


def find_usb_keys(backend: Any = None) -> list[Any]:
    """
    Return every Entropy Key pyusb can see (``backend`` None = libusb).

    Raises:
        SourceError: no USB backend is available.
    """
    import usb.core

    try:
        found = usb.core.find(
            find_all=True, idVendor=VENDOR_ID, idProduct=PRODUCT_ID, backend=backend
        )
        return list(found) if found is not None else []
    except usb.core.NoBackendError as exc:
        raise SourceError("no USB backend: install libusb-1.0-0") from exc
    except usb.core.USBError as exc:
        raise SourceError(f"USB enumeration failed: {_usb_error_text(exc)}") from exc


def usb_serial(device: Any) -> str | None:
    """
    Read a device's serial string, or None when the device refuses.
    """
    import usb.core

    try:
        serial = device.serial_number
    except (usb.core.USBError, ValueError, NotImplementedError):
        return None
    return str(serial) if serial is not None else None


def usb_bus_path(device: Any) -> str:
    """
    Where a device sits, as Linux names it: ``BUS-PORT.PORT``.
    """
    ports = getattr(device, "port_numbers", None) or ()
    suffix = ".".join(str(port) for port in ports) or str(device.address)
    return f"{device.bus}-{suffix}"


class _OwnThread:
    """
    One worker thread per key for its blocking calls: sharing the loop's
    default executor with other sources could starve it.
    """

    def __init__(self, name: str) -> None:
        self._thread_name = name
        self._executor: ThreadPoolExecutor | None = None

    def _start_thread(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._thread_name)

    def _stop_thread(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    async def _call(self, function: Any, *args: Any) -> Any:
        if self._executor is None:
            raise SourceError(f"{self._thread_name} is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, function, *args
        )


class UsbTransport(_OwnThread):
    """
    A key driven directly over USB with pyusb: finds it by serial, detaches
    cdc_acm, claims the data interface and uses its bulk endpoints.
    """

    def __init__(self, serial: str, backend: Any = None) -> None:
        super().__init__(f"ekey-{serial}")
        self.serial = serial
        self.description = f"usb serial {serial}"
        self._backend = backend
        self._device: Any = None

    async def open(self) -> None:
        import usb.core
        import usb.util

        self._start_thread()
        device = None
        for candidate in await self._call(find_usb_keys, self._backend):
            if await self._call(usb_serial, candidate) == self.serial:
                device = candidate
                break
        if device is None:
            await self.close()
            raise SourceError(
                f"no Entropy Key with serial {self.serial} on the USB bus"
            )
        self.description = f"usb {usb_bus_path(device)}"

        def claim() -> None:
            for interface in (0, DATA_INTERFACE):
                # cdc_acm owns the key when the kernel sees it; take it back.
                if device.is_kernel_driver_active(interface):
                    device.detach_kernel_driver(interface)
            with contextlib.suppress(usb.core.USBError):
                device.set_configuration()
            usb.util.claim_interface(device, DATA_INTERFACE)

        try:
            await self._call(claim)
        except (usb.core.USBError, NotImplementedError) as exc:
            await self.close()
            raise SourceError(
                f"cannot claim Entropy Key {self.serial}: {_usb_error_text(exc)}"
            ) from exc
        self._device = device

    async def read(self) -> bytes:
        import usb.core

        device = self._device
        if device is None:
            raise SourceError(f"Entropy Key {self.serial} is not open")
        while True:
            try:
                data = await self._call(
                    device.read, ENDPOINT_IN, _USB_READ_SIZE, _USB_READ_TIMEOUT_MS
                )
            except usb.core.USBTimeoutError:
                continue
            except usb.core.USBError as exc:
                raise SourceError(_usb_error_text(exc)) from exc
            if len(data):
                return bytes(data)

    async def write(self, data: bytes) -> None:
        import usb.core

        device = self._device
        if device is None:
            raise SourceError(f"Entropy Key {self.serial} is not open")
        try:
            await self._call(device.write, ENDPOINT_OUT, data, 1000)
        except usb.core.USBError as exc:
            raise SourceError(_usb_error_text(exc)) from exc

    async def close(self) -> None:
        import usb.core
        import usb.util

        device, self._device = self._device, None
        if device is not None and self._executor is not None:

            def release() -> None:
                with contextlib.suppress(usb.core.USBError):
                    usb.util.release_interface(device, DATA_INTERFACE)
                with contextlib.suppress(usb.core.USBError):
                    usb.util.dispose_resources(device)

            await self._call(release)
        self._stop_thread()


# ---- in-process simulator -----------------------------------------------------


class SimulatedDevice(Protocol):
    """
    What the transport needs of a simulated key (`simulator.SimulatedKey`).
    """

    def read(self, max_bytes: int, timeout: float) -> bytes: ...

    def write(self, data: bytes) -> int: ...

    def discard_pending(self) -> int: ...


class SimulatedTransport(_OwnThread):
    """
    A key simulated in this process, reached through the same blocking calls a
    USB device takes, in a thread of its own.
    """

    def __init__(self, serial: str, device: SimulatedDevice) -> None:
        super().__init__(f"sim-{serial}")
        self.serial = serial
        self.description = f"simulated {serial}"
        self._device = device

    async def open(self) -> None:
        self._start_thread()
        # What the key queued while nobody read it (key requests, replies to
        # an earlier driver) would cross this session's commands; a tty's open
        # flushes it the same way, and ekey-ulusbd drops it on connect.
        await self._call(self._device.discard_pending)

    async def read(self) -> bytes:
        while True:
            try:
                data = await self._call(
                    self._device.read, _USB_READ_SIZE, _USB_READ_TIMEOUT_MS / 1000
                )
            except OSError as exc:
                raise SourceError(_usb_error_text(exc)) from exc
            if data:
                return bytes(data)

    async def write(self, data: bytes) -> None:
        try:
            await self._call(self._device.write, data)
        except OSError as exc:
            raise SourceError(_usb_error_text(exc)) from exc

    async def close(self) -> None:
        self._stop_thread()
