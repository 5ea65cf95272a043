"""
What the kernel sink sends to and reads from the random driver, as bytes:
ioctl numbers, struct rand_pool_info, kernel uevents, poolsize.
"""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.kernel.wire import (
    GENERIC,
    POWERPC_LIKE,
    RandomIoctls,
    Semantics,
    layout_for,
    parse_uevent,
    rand_pool_info,
    semantics_from_poolsize,
)

# The vmgenid driver's uevent (drivers/virt/vmgenid.c, vmgenid_notify: a
# KOBJ_CHANGE with NEW_VMGENID=1) laid out as kobject_uevent_env builds every
# kernel uevent: "ACTION@DEVPATH", the standard fields, the driver's own,
# SEQNUM last. Since 6.10 the driver is a platform driver; QEMU's device
# (-device vmgenid) is the ACPI id QEMUVGID. Written from the kernel's code,
# not captured from a guest (no VMGenID device here).
VMGENID_UEVENT = (
    b"change@/devices/platform/QEMUVGID:00\0"
    b"ACTION=change\0"
    b"DEVPATH=/devices/platform/QEMUVGID:00\0"
    b"SUBSYSTEM=platform\0"
    b"NEW_VMGENID=1\0"
    b"MODALIAS=acpi:QEMUVGID:\0"
    b"SEQNUM=4242\0"
)
# 5.18-6.9: an ACPI driver, so the ACPI device's path and subsystem.
VMGENID_UEVENT_ACPI = (
    b"change@/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0"
    b"ACTION=change\0"
    b"DEVPATH=/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0"
    b"SUBSYSTEM=acpi\0"
    b"NEW_VMGENID=1\0"
    b"SEQNUM=977\0"
)
USB_ADD_UEVENT = (
    b"add@/devices/pci0000:00/0000:00:14.0/usb1/1-2\0"
    b"ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:14.0/usb1/1-2\0"
    b"SUBSYSTEM=usb\0DEVNAME=bus/usb/001/004\0DEVTYPE=usb_device\0"
    b"PRODUCT=20df/1/100\0SEQNUM=4243\0"
)
# udev's re-broadcast on group 2: a "libudev" magic and a binary header.
LIBUDEV_MESSAGE = (
    b"libudev\0\xfe\xed\xca\xfe\x28\x00\x00\x00\x28\x00\x00\x00\x9e\x00\x00\x00"
    b"ACTION=change\0NEW_VMGENID=1\0"
)


def test_ioctl_numbers_on_x86_arm_riscv_s390() -> None:
    """
    The asm-generic encoding gives the numbers of include/uapi/linux/random.h
    as compiled on x86, arm, arm64, riscv and s390.
    """
    ioctls = RandomIoctls.for_layout(GENERIC)
    assert (0x80045200, 0x40085203, 0x5207) == (
        ioctls.get_entropy_count,
        ioctls.add_entropy,
        ioctls.reseed_crng,
    )


def test_ioctl_numbers_on_powerpc_mips_sparc_alpha() -> None:
    """
    Those architectures swap the direction bits and have 13 size bits.
    """
    ioctls = RandomIoctls.for_layout(POWERPC_LIKE)
    assert (0x40045200, 0x80085203, 0x20005207) == (
        ioctls.get_entropy_count,
        ioctls.add_entropy,
        ioctls.reseed_crng,
    )


@pytest.mark.parametrize(
    ("machine", "layout"),
    [
        ("x86_64", GENERIC),
        ("aarch64", GENERIC),
        ("riscv64", GENERIC),
        ("s390x", GENERIC),
        ("ppc64le", POWERPC_LIKE),
        ("mips64", POWERPC_LIKE),
        ("sparc64", POWERPC_LIKE),
        ("alpha", POWERPC_LIKE),
    ],
)
def test_layout_follows_the_machine(machine: str, layout: object) -> None:
    """
    ``platform.machine()`` picks the encoding.
    """
    assert layout == layout_for(machine)


def test_rand_pool_info_layout_byte_for_byte() -> None:
    """
    struct rand_pool_info: entropy_count (int32), buf_size (int32), then the
    data bytes inline, not a pointer: 8 + len(data) bytes in all.
    """
    data = bytes(range(1, 65))
    packed = rand_pool_info(256, data)
    assert 72 == len(packed)
    assert b"\x00\x01\x00\x00" == packed[0:4]  # 256, little-endian here
    assert b"\x40\x00\x00\x00" == packed[4:8]  # 64 bytes
    assert data == packed[8:]
    assert (256, 64) == struct.unpack("ii", packed[:8])
    assert struct.pack("ii", 256, 64) + data == packed


def test_rand_pool_info_without_data_is_the_bare_header() -> None:
    """
    The capability probe mixes nothing in: an 8-byte header, both counts zero.
    """
    assert bytes(8) == rand_pool_info(0, b"")


@pytest.mark.parametrize(("credit", "size"), [(-1, 8), (65, 8), (1, 0)])
def test_rand_pool_info_refuses_credit_beyond_8_bits_per_byte(
    credit: int, size: int
) -> None:
    """
    The kernel does not check the credit against the data; we do: never
    negative, never more than 8 bits per byte.
    """
    with pytest.raises(ValueError, match="outside"):
        rand_pool_info(credit, bytes(size))


@given(st.binary(max_size=512), st.integers(min_value=0, max_value=8))
def test_rand_pool_info_round_trips(data: bytes, per_byte: int) -> None:
    """
    Any data and credit within bounds unpack to what was packed.
    """
    credit = per_byte * len(data)
    packed = rand_pool_info(credit, data)
    assert (credit, len(data)) == struct.unpack("ii", packed[:8])
    assert data == packed[8:]


@pytest.mark.parametrize(
    ("text", "semantics"),
    [("4096\n", Semantics.CLASSIC), ("256\n", Semantics.NEW), ("256", Semantics.NEW)],
)
def test_poolsize_tells_the_generation(text: str, semantics: Semantics) -> None:
    """
    4096 is the classic input pool, 256 the BLAKE2s state of 5.18+.
    """
    assert semantics == semantics_from_poolsize(text)


@pytest.mark.parametrize("text", ["512\n", "", "big"])
def test_unknown_poolsize_is_an_error(text: str) -> None:
    """
    Neither value: the operator must say which generation it is.
    """
    with pytest.raises(ValueError):  # noqa: PT011 - int() or ours, both ValueError
        semantics_from_poolsize(text)


@pytest.mark.parametrize(
    ("datagram", "devpath", "subsystem"),
    [
        (VMGENID_UEVENT, "/devices/platform/QEMUVGID:00", "platform"),
        (
            VMGENID_UEVENT_ACPI,
            "/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00",
            "acpi",
        ),
    ],
)
def test_vmgenid_uevent_is_a_new_vm_generation(
    datagram: bytes, devpath: str, subsystem: str
) -> None:
    """
    The vmgenid driver's change event parses, and says the generation changed.
    """
    event = parse_uevent(datagram)
    assert event is not None
    assert "change" == event.action
    assert devpath == event.devpath
    assert subsystem == event.fields["SUBSYSTEM"]
    assert event.new_vm_generation


def test_other_uevents_are_not_a_new_vm_generation() -> None:
    """
    A USB device plugged in is a uevent, but no VM generation change.
    """
    event = parse_uevent(USB_ADD_UEVENT)
    assert event is not None
    assert ("add", "usb") == (event.action, event.fields["SUBSYSTEM"])
    assert not event.new_vm_generation


@pytest.mark.parametrize(
    "datagram",
    [
        LIBUDEV_MESSAGE,
        b"",
        b"\0\0\0",
        b"change\0NEW_VMGENID=1\0",
        b"@/devices/x\0NEW_VMGENID=1\0",
    ],
)
def test_udev_and_garbled_datagrams_are_ignored(datagram: bytes) -> None:
    """
    udev's own messages and datagrams without ``ACTION@DEVPATH`` are not
    kernel uevents.
    """
    assert parse_uevent(datagram) is None


def test_uevent_with_other_vmgenid_value_is_ignored() -> None:
    """
    Only ``NEW_VMGENID=1`` means a change.
    """
    event = parse_uevent(VMGENID_UEVENT.replace(b"NEW_VMGENID=1", b"NEW_VMGENID=0"))
    assert event is not None
    assert not event.new_vm_generation


def test_truncated_uevent_keeps_the_fields_it_has() -> None:
    """
    A datagram cut short (no trailing NUL, a field without ``=``) still parses.
    """
    event = parse_uevent(b"change@/devices/v\0JUNK\0NEW_VMGENID=1")
    assert event is not None
    assert {"NEW_VMGENID": "1"} == event.fields


@given(st.binary(max_size=300))
def test_any_datagram_parses_or_is_ignored(datagram: bytes) -> None:
    """
    Whatever arrives on the socket, parsing never raises.
    """
    parse_uevent(datagram)
