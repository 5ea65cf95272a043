"""
A simulated Entropy Key running in real time, and its ekey-ulusbd-style socket.

`SimulatedKey` wraps one sans-I/O `DeviceModel` with a lock and a clock so that
threads (a pyusb backend, see `sim_usb`) and asyncio (`aread` / `awrite`,
`UnixKeyServer`) can talk to it as if it were the hardware. Output accumulates
as FIPS blocks fall due; a reader takes it. Like a real key whose host stops
reading, it buffers only about two blocks and drops the rest, so a reader that
comes back after an hour gets fresh frames, not an hour's backlog.

Controls mimic what can happen to a key: `unplug` / `replug` (power cycle:
clears a latched failure, keeps the serial and the possibly re-keyed LTK),
`fail` (latched generator failure), `set_fault` (hardware defects that survive
a replug) and `heal` (no faults, power cycle).
"""

import asyncio
import contextlib
import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypedDict, Unpack

import structlog

from .device_model import BLOCKS_PER_FIPS, DeviceModel, PlaintextFault
from .encoding import pem_decode_exact, pem_encode
from .keyring import KeyringError, format_keyring, load_keyring
from .wire import FailureMode

log = structlog.get_logger("ebroker.simulator")

FRAME_SIZE: Final = 64
BLOCK_BYTES: Final = BLOCKS_PER_FIPS * 32
"""Entropy bytes per FIPS block (78 ``E!`` frames of 32 bytes)."""
MAX_BACKLOG: Final = 2 * BLOCKS_PER_FIPS * FRAME_SIZE
"""Unread device output above which further blocks and status are dropped."""
_RELAY_CHUNK: Final = 4096


class SimulatedUnplugged(OSError):
    """
    The simulated key is not plugged in (errno ENODEV, like a vanished tty).
    """

    def __init__(self, serial_text: str) -> None:
        super().__init__(errno.ENODEV, f"simulated key {serial_text} is unplugged")


class KeyOptions(TypedDict, total=False):
    """
    Keyword arguments of `SimulatedKey` after the serial and the LTK.
    """

    master_key: bytes | None
    rate: float
    info_interval: float
    clock: Callable[[], float]
    random_bytes: Callable[[int], bytes]


class SimulatedKey:
    """
    One Entropy Key driven by real (or injected) time; every method is thread-safe.

    Args:
        serial: the 12-byte binary serial number.
        long_term_key: the 32-byte LTK in the key's flash.
        master_key: the 32-byte master key, for long-term re-keying.
        rate: entropy bytes per second; sets the FIPS block interval.
        info_interval: seconds between ``I>`` status bursts.
        clock: monotonic seconds; inject a fake one for deterministic tests.
            Waits still pass in real time, so with a fake clock poll with
            ``read(n, 0.0)`` and move the clock yourself.
        random_bytes: the key's noise source.
    """

    def __init__(
        self,
        serial: bytes,
        long_term_key: bytes,
        *,
        master_key: bytes | None = None,
        rate: float = 4000.0,
        info_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if rate <= 0 or info_interval <= 0:
            raise ValueError("rate and info_interval must be positive")
        self.clock = clock
        self._block_interval = BLOCK_BYTES / rate
        self._info_interval = info_interval
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wakers: set[Callable[[], None]] = set()
        self._out = bytearray()
        self._plugged = True
        self._generation = 0
        now = clock()
        self._model = DeviceModel(
            serial,
            long_term_key,
            master_key=master_key,
            random_bytes=random_bytes,
            now=now,
            block_interval=self._block_interval,
            info_interval=info_interval,
        )
        self._serial_text = pem_encode(serial).decode()
        self._schedule(now)
        self._collect()

    @classmethod
    def from_keyring(
        cls, keyring_path: str | Path, serial_text: str, **kwargs: Unpack[KeyOptions]
    ) -> Self:
        """
        Build a key whose LTK comes from an ekeyd keyring file.

        Raises:
            KeyringError: the serial is malformed or not in the keyring.
            KeyringPermissionError: the keyring is group- or world-accessible.
            OSError: the keyring cannot be read.
        """
        try:
            serial = pem_decode_exact(serial_text.encode("ascii", "replace"), 12)
        except ValueError:
            raise KeyringError(
                f"serial {serial_text!r} is not 16 PEM characters"
            ) from None
        keys = load_keyring(Path(keyring_path))
        if serial not in keys:
            raise KeyringError(f"no long-term key for serial {serial_text}")
        return cls(serial, keys[serial], **kwargs)

    # -- identity and state -------------------------------------------------

    @property
    def serial(self) -> bytes:
        """
        The 12-byte binary serial number.
        """
        return self._model.serial

    @property
    def serial_text(self) -> str:
        """
        The 16-character PEM serial (USB iSerialNumber, keyring, ``S!`` payload).
        """
        return self._serial_text

    @property
    def plugged(self) -> bool:
        """
        Whether the key is plugged in.
        """
        with self._lock:
            return self._plugged

    @property
    def generation(self) -> int:
        """
        How many times the key has been replugged; a USB handle is per generation.
        """
        with self._lock:
            return self._generation

    @property
    def long_term_key(self) -> bytes:
        """
        The LTK in flash; a long-term re-key replaces it.
        """
        with self._lock:
            return self._model.long_term_key

    @property
    def failure_mode(self) -> FailureMode:
        """
        The latched generator failure (`FailureMode.OK` when healthy).
        """
        with self._lock:
            return self._model.failure_mode

    @property
    def block_interval(self) -> float:
        """
        Seconds per FIPS block.
        """
        return self._block_interval

    # -- byte stream --------------------------------------------------------

    def read(self, max_bytes: int, timeout: float) -> bytes:
        """
        Return up to ``max_bytes`` of device output, waiting up to ``timeout`` s.

        Returns:
            The bytes, or ``b""`` if none arrived in time (``timeout`` 0 polls;
            ``math.inf`` waits for ever).

        Raises:
            SimulatedUnplugged: the key is (or becomes) unplugged.
            ValueError: ``max_bytes`` is not positive.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        with self._cond:
            deadline = self.clock() + timeout
            while True:
                self._check_plugged()
                now = self.clock()
                self._advance(now)
                if self._out:
                    data = bytes(self._out[:max_bytes])
                    del self._out[:max_bytes]
                    return data
                if now >= deadline:
                    return b""
                # Woken early by write() or a control; otherwise at the next
                # block, when there may be output.
                self._cond.wait(min(deadline, self._next_due()) - now)

    def write(self, data: bytes) -> int:
        """
        Feed host command bytes to the key (one USB packet's worth at most, for
        the "rest of packet is discarded" rule to be faithful).

        Raises:
            SimulatedUnplugged: the key is unplugged.
        """
        with self._cond:
            self._check_plugged()
            self._advance(self.clock())
            self._model.receive_data(data)
            self._collect()
            self._wake()
        return len(data)

    def next_due(self) -> float:
        """
        The clock time at which new output is next expected without host input.
        """
        with self._lock:
            return self._next_due()

    def pending(self) -> bool:
        """
        Whether output is waiting to be read right now.
        """
        with self._lock:
            if self._plugged:
                self._advance(self.clock())
            return bool(self._out)

    def discard_pending(self) -> int:
        """
        Drop unread output, as ekey-ulusbd does before relaying; return its length.
        """
        with self._lock:
            if self._plugged:
                self._advance(self.clock())
            count = len(self._out)
            self._out.clear()
            return count

    def usb_reset(self) -> None:
        """
        A USB port reset: unread output is lost and the protocol resets (^C).
        """
        with self._cond:
            self._check_plugged()
            self._out.clear()
            self._model.receive_data(b"\x03")
            self._collect()
            self._wake()

    def wait_unplugged(self, timeout: float) -> bool:
        """
        Block until the key is unplugged or ``timeout`` s pass; True if unplugged.
        """
        with self._cond:
            return self._cond.wait_for(lambda: not self._plugged, timeout)

    def add_waker(self, waker: Callable[[], None]) -> None:
        """
        Call ``waker()`` (from any thread) whenever output or state may change.
        """
        with self._lock:
            self._wakers.add(waker)

    def remove_waker(self, waker: Callable[[], None]) -> None:
        """
        Stop calling ``waker``.
        """
        with self._lock:
            self._wakers.discard(waker)

    # -- controls -----------------------------------------------------------

    def unplug(self) -> None:
        """
        Pull the key out: readers and writers get `SimulatedUnplugged`.
        """
        with self._cond:
            self._plugged = False
            self._out.clear()
            self._wake()

    def replug(self) -> None:
        """
        Plug the key back in (or power-cycle it): fresh state, same serial and
        LTK, latched failure cleared, injected faults kept.
        """
        with self._cond:
            self._plugged = True
            self._generation += 1
            self._out.clear()
            self._power_on(self.clock())
            self._wake()

    def fail(self, mode: FailureMode) -> None:
        """
        Latch a generator failure: no more entropy until a replug or `heal`.
        """
        with self._cond:
            self._model.fail_generator(mode)
            self._wake()

    def set_fault(
        self,
        *,
        stuck: bool | None = None,
        biased: bool | None = None,
        corrupt_macs: bool | None = None,
        garbage: bytes | None = None,
        mute: bool | None = None,
    ) -> None:
        """
        Inject or clear hardware faults; None leaves a fault as it is.

        ``stuck``: every ``E!`` carries the same plaintext; ``biased``: plaintext
        bits are 1 with probability 1/4; ``corrupt_macs``: every MAC is wrong;
        ``garbage``: bytes written after every frame; ``mute``: never answers.

        Raises:
            ValueError: ``stuck`` and ``biased`` both requested.
        """
        if stuck and biased:
            raise ValueError("plaintext cannot be both stuck and biased")
        with self._cond:
            model = self._model
            if stuck:
                model.plaintext_fault = PlaintextFault.STUCK
            elif biased:
                model.plaintext_fault = PlaintextFault.BIASED
            elif (stuck is False and model.plaintext_fault is PlaintextFault.STUCK) or (
                biased is False and model.plaintext_fault is PlaintextFault.BIASED
            ):
                model.plaintext_fault = PlaintextFault.NONE
            if corrupt_macs is not None:
                model.corrupt_macs = corrupt_macs
            if garbage is not None:
                model.garbage = garbage
            if mute is not None:
                model.mute = mute
            self._wake()

    def heal(self) -> None:
        """
        Clear every fault and power-cycle the key (it must be plugged in).
        """
        with self._cond:
            model = self._model
            model.plaintext_fault = PlaintextFault.NONE
            model.corrupt_macs = False
            model.garbage = b""
            model.mute = False
            self._out.clear()
            self._power_on(self.clock())
            self._wake()

    # -- internals (lock held) ----------------------------------------------

    def _check_plugged(self) -> None:
        if not self._plugged:
            raise SimulatedUnplugged(self._serial_text)

    def _power_on(self, now: float) -> None:
        self._model.power_cycle(now)
        self._schedule(now)
        self._collect()

    def _schedule(self, now: float) -> None:
        # Mirrors DeviceModel's schedule with the same float arithmetic, so
        # next_due() is exact without reaching into the model.
        self._next_block = now + self._block_interval
        self._next_info = now + self._info_interval

    def _next_due(self) -> float:
        return min(self._next_block, self._next_info)

    def _advance(self, now: float) -> None:
        # One due event at a time, so that output the host has not read caps
        # what is produced, and a long gap costs a loop, not a burst of crypto.
        model = self._model
        while (due := self._next_due()) <= now:
            muted = model.mute
            model.mute = muted or len(self._out) >= MAX_BACKLOG
            try:
                model.advance(due)
            finally:
                model.mute = muted
            self._collect()
            while self._next_block <= due:
                self._next_block += self._block_interval
            while self._next_info <= due:
                self._next_info += self._info_interval

    def _collect(self) -> None:
        self._out += self._model.data_to_send()

    def _wake(self) -> None:
        self._cond.notify_all()
        for waker in self._wakers:
            waker()


# -- asyncio adapter ----------------------------------------------------------


async def aread(key: SimulatedKey, max_bytes: int) -> bytes:
    """
    Await output from ``key`` without blocking the loop; never returns ``b""``.

    The loop sleeps until the key's next block is due or a write or control
    wakes it. Producing a block costs ~15 ms of CPU, done inline.

    Raises:
        SimulatedUnplugged: the key is (or becomes) unplugged.
    """
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def wake() -> None:
        # A thread may wake us while the loop is shutting down; nobody is
        # waiting then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(woken.set)

    key.add_waker(wake)
    try:
        while True:
            woken.clear()
            data = key.read(max_bytes, 0.0)
            if data:
                return data
            delay = max(0.0, key.next_due() - key.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await woken.wait()
    finally:
        key.remove_waker(wake)


async def awrite(key: SimulatedKey, data: bytes) -> int:
    """
    Send host bytes to ``key`` (never blocks: the key accepts at once).

    Raises:
        SimulatedUnplugged: the key is unplugged.
    """
    return key.write(data)


# -- ekey-ulusbd-style Unix socket ----------------------------------------------


class UnixKeyServer:
    """
    Relay one client at a time between a Unix stream socket and ``key``, as
    ekey-ulusbd does: extra connections are closed at once; unread output is
    dropped when a client connects; the socket is mode 0600 and removed on
    close. An unplugged key closes the current client; later clients are
    closed as soon as they connect, until the key is replugged.
    """

    def __init__(self, key: SimulatedKey, path: str | Path) -> None:
        self.key = key
        self.path = Path(path)
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._client: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = log.bind(serial=key.serial_text, socket=str(self.path))

    @property
    def busy(self) -> bool:
        """
        Whether a client is connected.
        """
        return self._client is not None

    @property
    def inode(self) -> int | None:
        """
        The inode of the bound socket file (None before `start`).
        """
        return self._inode

    async def start(self) -> None:
        """
        Bind and listen.

        Raises:
            FileExistsError: ``path`` exists and is not a socket.
            OSError: the socket cannot be bound.
        """
        sock = _bind_private_unix(self.path)
        self._inode = os.stat(self.path).st_ino
        try:
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            self.path.unlink(missing_ok=True)
            raise
        self._log.info("simulator_listening")

    async def close(self) -> None:
        """
        Stop listening, drop the client and remove the socket file.
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel(msg="simulator closing")
        # Cancelled handlers end with CancelledError; nothing else to report.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 -- asyncio runs handlers as tasks
        self._tasks.add(task)
        try:
            if self._client is not None:
                self._log.info("client_refused", reason="another client is connected")
                return
            self._client = task
            try:
                await self._relay(reader, writer)
            except Exception:  # noqa: BLE001 -- one client's failure never ends the server
                self._log.error("client_failed", exc_info=True)
            finally:
                self._client = None
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        key = self.key
        dropped = key.discard_pending()
        if not key.plugged:
            self._log.info("client_refused", reason="key unplugged")
            return
        self._log.info("client_connected", dropped_bytes=dropped)

        async def to_client() -> None:
            while True:
                writer.write(await aread(key, _RELAY_CHUNK))
                await writer.drain()

        try:
            async with asyncio.TaskGroup() as tasks:
                down = tasks.create_task(to_client())
                while data := await reader.read(_RELAY_CHUNK):
                    await awrite(key, data)
                down.cancel(msg="client closed its end")
        except* SimulatedUnplugged:
            self._log.info("client_closed", reason="key unplugged")
        except* ConnectionError:
            self._log.info("client_closed", reason="connection lost")
        else:
            self._log.info("client_closed", reason="client disconnected")


async def serve_unix(
    key: SimulatedKey, path: str | Path, *, stop: asyncio.Event | None = None
) -> None:
    """
    Serve ``key`` on a Unix socket at ``path`` until ``stop`` is set (or, without
    one, until cancelled); the socket file is removed on the way out.

    Raises:
        FileExistsError: ``path`` exists and is not a socket.
        OSError: the socket cannot be bound.
    """
    async with UnixKeyServer(key, path):
        await (stop if stop is not None else asyncio.Event()).wait()


def _bind_private_unix(path: Path) -> socket.socket:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", str(path))
        # A socket file left by an earlier run, as asyncio itself assumes.
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Connections are refused until listen(), so the key is never
        # reachable through a socket with the umask's looser mode.
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# -- keys for tests and demos ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPair:
    """
    A serial number and its long-term key.
    """

    serial: bytes
    long_term_key: bytes

    @property
    def serial_text(self) -> str:
        """
        The 16-character PEM serial.
        """
        return pem_encode(self.serial).decode()

    def keyring_text(self) -> str:
        """
        A keyring file (header and one line) holding this key.
        """
        return format_keyring({self.serial: self.long_term_key})


def random_serial() -> bytes:
    """
    Return a random 12-byte serial number.
    """
    return os.urandom(12)


def new_key_pair() -> KeyPair:
    """
    Return a random serial with a random long-term key.
    """
    return KeyPair(random_serial(), os.urandom(32))


def write_keyring(path: str | Path, pairs: Iterable[KeyPair]) -> None:
    """
    Write a keyring file with mode 0600 (replacing any file at ``path``).
    """
    text = format_keyring({pair.serial: pair.long_term_key for pair in pairs})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        # O_CREAT's mode does not apply to a file that already existed.
        os.fchmod(file.fileno(), 0o600)
        file.write(text)
