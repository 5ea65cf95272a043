"""
A simulated Entropy Key running in real time.

`SimulatedKey` wraps one sans-I/O `DeviceModel` with a lock and a clock so that
threads (a pyusb backend, see `usb_bus`) and asyncio (`aread` / `awrite`, and
through them `unix_server.UnixKeyServer`) can talk to it as if it were the
hardware. Output accumulates as FIPS blocks fall due; a reader takes it. Like
a real key whose host stops reading, it buffers only about two blocks and
drops the rest, so a reader that comes back after an hour gets fresh frames,
not an hour's backlog. Status bursts (three frames every ten seconds) have
room of their own above that: a host that reads slower than the key, which
keeps the buffer at its limit, still sees every status record, and with them
a latched generator failure.

Controls mimic what can happen to a key: `unplug` / `replug` (power cycle:
clears a latched failure, keeps the serial and the possibly re-keyed LTK),
`fail` (latched generator failure), `set_fault` (hardware defects that survive
a replug) and `heal` (no faults, power cycle).
"""

import asyncio
import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Self, TypedDict, Unpack

from ..encoding import serial_from_text, serial_to_text
from ..keyring import KeyringError, load_keyring
from ..wire import FailureMode
from .model import BLOCKS_PER_FIPS, DeviceModel, PlaintextFault

FRAME_SIZE: Final = 64
BLOCK_BYTES: Final = BLOCKS_PER_FIPS * 32
"""Entropy bytes per FIPS block (78 ``E!`` frames of 32 bytes)."""
MAX_BACKLOG: Final = 2 * BLOCKS_PER_FIPS * FRAME_SIZE
"""Unread device output above which further blocks are dropped."""
STATUS_BYTES: Final = 3 * FRAME_SIZE
"""One ``I>`` status burst."""
MAX_STATUS_BACKLOG: Final = (
    MAX_BACKLOG + BLOCKS_PER_FIPS * FRAME_SIZE + 2 * STATUS_BYTES
)
"""Unread output above which status bursts are dropped too: past a full
entropy backlog and the block that crossed it."""


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
        self._serial_text = serial_to_text(serial)
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
            serial = serial_from_text(serial_text)
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
            unread = len(self._out)
            model.advance(
                due,
                send_blocks=unread < MAX_BACKLOG,
                send_status=unread < MAX_STATUS_BACKLOG,
            )
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
