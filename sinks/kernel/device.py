"""
The kernel sink's system calls: /dev/random ioctls, the readiness probe,
/proc/sys/kernel/random, and the uevent socket. Everything else in the sink
is decided without I/O (`sinks.kernel.plan`).
"""

import errno
import fcntl
import os
import platform
import socket
from pathlib import Path
from typing import Protocol

from broker.errors import BrokerError
from sinks.kernel.plan import KernelState
from sinks.kernel.wire import (
    NETLINK_KOBJECT_UEVENT,
    UEVENT_KERNEL_GROUP,
    RandomIoctls,
    Semantics,
    layout_for,
    rand_pool_info,
    semantics_from_poolsize,
)

RANDOM_DEVICE = Path("/dev/random")
POOLSIZE = Path("/proc/sys/kernel/random/poolsize")
IOCTLS = RandomIoctls.for_layout(layout_for(platform.machine()))

NO_CAPABILITY = (
    "the kernel sink needs CAP_SYS_ADMIN to feed the kernel (RNDADDENTROPY): "
    "run ebroker as root, or grant the capability (systemd: "
    "AmbientCapabilities=CAP_SYS_ADMIN and CapabilityBoundingSet=CAP_SYS_ADMIN)"
)


class Kernel(Protocol):
    """
    The random driver as the sink sees it: the real one or a recording stand-in.
    """

    semantics: Semantics
    description: str
    """Where writes go, for status and logs (``/dev/random``, ``record:PATH``)."""

    def state(self) -> KernelState: ...

    def add(self, data: bytes, credit: int, reason: str) -> None:
        """
        RNDADDENTROPY: mix ``data`` in and credit ``credit`` bits.

        Raises:
            OSError: the kernel refused it.
        """
        ...

    def reseed(self, reason: str) -> None:
        """
        RNDRESEEDCRNG: fold what was mixed in into the CRNG now.

        Raises:
            OSError: the kernel refused it (ENODATA before ready; EINVAL
                before Linux 4.17).
        """
        ...

    def pollable_fd(self) -> int | None:
        """
        A descriptor whose POLLOUT means "the kernel wants input", or None.
        """
        ...

    def close(self) -> None: ...


def crng_ready() -> bool:
    """
    Whether the kernel's CRNG is initialised: getrandom(GRND_NONBLOCK) gives a
    byte instead of EAGAIN. (No GRND_RANDOM: on classic kernels that probes
    the blocking pool, not readiness.)
    """
    try:
        os.getrandom(1, os.GRND_NONBLOCK)
    except BlockingIOError:
        return False
    except OSError as exc:
        # Before 3.17 there is no getrandom: a classic kernel, where only the
        # entropy count matters.
        if exc.errno != errno.ENOSYS:
            raise
    return True


def detect_semantics(poolsize: Path = POOLSIZE) -> Semantics:
    """
    The random driver generation, by behaviour.

    Raises:
        BrokerError: poolsize cannot be read or has neither known value.
    """
    try:
        return semantics_from_poolsize(poolsize.read_text())
    except (OSError, ValueError) as exc:
        raise BrokerError(
            f"kernel sink: cannot tell the random driver's generation from "
            f'{poolsize}: {exc}; set semantics = "classic" or "new"'
        ) from exc


class RandomDevice:
    """
    The real random driver, through /dev/random.
    """

    def __init__(self, semantics: Semantics, path: Path = RANDOM_DEVICE) -> None:
        """
        Open the device and check that this process may feed it.

        Raises:
            BrokerError: the device cannot be opened, or CAP_SYS_ADMIN is missing.
        """
        self.semantics = semantics
        self.description = str(path)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BrokerError(
                f"kernel sink: cannot open {path}: {exc.strerror or exc}"
            ) from exc
        try:
            # Mixing nothing in with no credit changes nothing, and needs the
            # same capability as every real write.
            self.add(b"", 0, "probe")
        except PermissionError as exc:
            self.close()
            raise BrokerError(NO_CAPABILITY) from exc
        except OSError as exc:
            self.close()
            raise BrokerError(
                f"kernel sink: RNDADDENTROPY on {path} fails: {exc.strerror or exc}"
            ) from exc

    def state(self) -> KernelState:
        count = fcntl.ioctl(self._fd, IOCTLS.get_entropy_count, b"\0\0\0\0")
        return KernelState(
            ready=crng_ready(), entropy=int.from_bytes(count, "little", signed=True)
        )

    def add(self, data: bytes, credit: int, reason: str) -> None:
        fcntl.ioctl(self._fd, IOCTLS.add_entropy, rand_pool_info(credit, data))

    def reseed(self, reason: str) -> None:
        fcntl.ioctl(self._fd, IOCTLS.reseed_crng)

    def pollable_fd(self) -> int | None:
        return self._fd if self.semantics is Semantics.CLASSIC else None

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def open_uevent_socket() -> socket.socket:
    """
    A non-blocking socket receiving the kernel's uevents.

    Raises:
        OSError: netlink is not available (an address-family filter, a
            kernel without it).
    """
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
        NETLINK_KOBJECT_UEVENT,
    )
    try:
        sock.bind((0, UEVENT_KERNEL_GROUP))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def receive_all(sock: socket.socket) -> list[bytes]:
    """
    Every datagram waiting on a non-blocking socket.
    """
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(16384))
        except (BlockingIOError, InterruptedError):
            return datagrams
        except OSError as exc:
            # ENOBUFS: uevents were dropped while we were busy; the ones that
            # follow are still worth reading.
            if exc.errno != errno.ENOBUFS:
                raise
