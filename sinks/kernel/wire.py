"""
What the kernel sink says to the Linux random driver, and what it hears back,
as bytes: ioctl request numbers, ``struct rand_pool_info``, kernel uevents.

No I/O here: `sinks.kernel.device` does the system calls.

``struct rand_pool_info`` (include/uapi/linux/random.h) is two 32-bit ints,
the bits to credit and the number of data bytes, followed by the data bytes
themselves, inline (declared ``__u32 buf[0]``), not a pointer to them. The
kernel does not check the credit against ``8 x buf_size``: the caller must.

Kernel uevents arrive on a NETLINK_KOBJECT_UEVENT socket bound to multicast
group 1 as one datagram each: ``ACTION@DEVPATH`` then ``KEY=VALUE`` fields,
each NUL-terminated. The vmgenid driver of current kernels sends a
``change`` event carrying ``NEW_VMGENID=1`` when the VM generation changes
(snapshot restore, clone), after it has made the kernel reseed itself (5.18+);
a kernel or hypervisor without it leaves the sink to its timer. udev's
re-broadcasts (group 2) start with ``libudev`` and a binary header; they are
not kernel uevents and are ignored.
"""

import enum
import struct
from dataclasses import dataclass

NETLINK_KOBJECT_UEVENT = 15
"""Netlink protocol of kernel uevents (linux/netlink.h); the socket module
does not name it."""
UEVENT_KERNEL_GROUP = 1
"""Multicast group the kernel sends uevents to (udev re-sends on group 2)."""


class Semantics(enum.StrEnum):
    """
    Which generation of the random driver the kernel runs.
    """

    CLASSIC = "classic"
    """Input pool of 4096 bits whose count rises with credit and falls with
    reads of /dev/random (up to 5.17, and unpatched stable kernels)."""
    NEW = "new"
    """One 256-bit BLAKE2s state; credit counts only until the CRNG is ready
    (5.18+, and the 2022 stable backports)."""


def semantics_from_poolsize(text: str) -> Semantics:
    """
    Tell the driver generation by behaviour, not version: the contents of
    /proc/sys/kernel/random/poolsize are 4096 on classic kernels and 256 on
    new ones (stable backports make version numbers useless).

    Raises:
        ValueError: the text is not one of the two sizes.
    """
    size = int(text.strip())
    if size == 4096:
        return Semantics.CLASSIC
    if size == 256:
        return Semantics.NEW
    raise ValueError(f"poolsize {size} is neither 4096 (classic) nor 256 (new)")


# ---- ioctl request numbers --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IocLayout:
    """
    How an architecture encodes ioctl numbers (``_IOC`` in asm/ioctl.h).
    """

    none: int
    write: int
    read: int
    size_bits: int

    def ioc(self, direction: int, kind: str, number: int, size: int) -> int:
        dir_shift = 16 + self.size_bits
        return (direction << dir_shift) | (size << 16) | (ord(kind) << 8) | number


GENERIC = IocLayout(none=0, write=1, read=2, size_bits=14)
"""asm-generic: x86, arm, arm64, riscv, s390, loongarch."""
POWERPC_LIKE = IocLayout(none=1, write=4, read=2, size_bits=13)
"""powerpc, mips, sparc and alpha: other direction bits, 13 size bits."""

_POWERPC_LIKE_MACHINES = ("ppc", "powerpc", "mips", "sparc", "alpha")


def layout_for(machine: str) -> IocLayout:
    """
    The ioctl encoding of ``platform.machine()``.
    """
    if machine.lower().startswith(_POWERPC_LIKE_MACHINES):
        return POWERPC_LIKE
    return GENERIC


_INT = 4


@dataclass(frozen=True, slots=True)
class RandomIoctls:
    """
    The random driver's ioctl numbers on one architecture.
    """

    get_entropy_count: int
    add_entropy: int
    reseed_crng: int

    @classmethod
    def for_layout(cls, layout: IocLayout) -> "RandomIoctls":
        return cls(
            # _IOR('R', 0x00, int)
            get_entropy_count=layout.ioc(layout.read, "R", 0x00, _INT),
            # _IOW('R', 0x03, int[2])
            add_entropy=layout.ioc(layout.write, "R", 0x03, 2 * _INT),
            # _IO('R', 0x07)
            reseed_crng=layout.ioc(layout.none, "R", 0x07, 0),
        )


def rand_pool_info(credit_bits: int, data: bytes) -> bytes:
    """
    The RNDADDENTROPY argument: ``struct rand_pool_info`` with ``data`` inline.

    Raises:
        ValueError: the credit is negative or more than 8 bits per byte.
    """
    if not 0 <= credit_bits <= 8 * len(data):
        raise ValueError(
            f"credit {credit_bits} bits is outside 0..{8 * len(data)} for "
            f"{len(data)} bytes"
        )
    return struct.pack("=ii", credit_bits, len(data)) + data


# ---- uevents ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Uevent:
    """
    One kernel uevent.
    """

    action: str
    devpath: str
    fields: dict[str, str]

    @property
    def new_vm_generation(self) -> bool:
        """
        The VM generation changed: the VM was restored from a snapshot or cloned.
        """
        return self.fields.get("NEW_VMGENID") == "1"


def parse_uevent(datagram: bytes) -> Uevent | None:
    """
    A kernel uevent datagram, or None for anything else (udev's own messages,
    truncated or garbled datagrams).
    """
    if datagram.startswith(b"libudev"):
        return None
    parts = datagram.split(b"\0")
    head, _, devpath = parts[0].partition(b"@")
    if not head or not devpath:
        return None
    fields: dict[str, str] = {}
    for part in parts[1:]:
        key, separator, value = part.partition(b"=")
        if separator and key:
            fields[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    return Uevent(
        action=head.decode("ascii", "replace"),
        devpath=devpath.decode("utf-8", "replace"),
        fields=fields,
    )
