"""
The pyusb backend that presents simulated keys as USB devices.
"""

import array
import errno

import pytest
import usb.control
import usb.core
import usb.util

from sources.entropykey.sim.usb_bus import EP_IN, EP_OUT, SimulatedBus
from sources.entropykey.wire import (
    FrameType,
    parse_packet,
)
from tests.sources.entropykey.sim.support import (
    slow_key,
)


@pytest.fixture
def bus() -> SimulatedBus:
    """
    A bus with three quiet keys.
    """
    keys = [slow_key(bytes([n]) * 12) for n in (1, 2, 3)]
    return SimulatedBus(keys)


def find(bus: SimulatedBus) -> list[usb.core.Device]:
    """
    Every Entropy Key pyusb sees on ``bus``.
    """
    return list(
        usb.core.find(backend=bus, idVendor=0x20DF, idProduct=0x0001, find_all=True)
    )


def open_data(dev: usb.core.Device) -> None:
    """
    Take the key from cdc_acm and claim its data interface, as a driver would.
    """
    for interface in (0, 1):
        if dev.is_kernel_driver_active(interface):
            dev.detach_kernel_driver(interface)
    dev.set_configuration()
    usb.util.claim_interface(dev, 1)


def test_pyusb_enumerates_keys_with_their_identity(bus: SimulatedBus) -> None:
    """
    find() lists each key with its PEM serial, Simtec strings, bus position,
    and the CDC layout with bulk endpoints 0x81/0x03 on interface 1.
    """
    devices = find(bus)
    assert sorted(bus.keys) == sorted(d.serial_number for d in devices)
    dev = devices[0]
    assert dev.serial_number == usb.util.get_string(dev, dev.iSerialNumber)
    assert ("Simtec Electronics", "Entropy Key") == (dev.manufacturer, dev.product)
    assert (0x0200, 0x0200, 1) == (dev.bcdUSB, dev.bcdDevice, dev.bus)
    assert [(1,), (2,), (3,)] == sorted(d.port_numbers for d in devices)
    assert 3 == len({d.address for d in devices})
    cfg = dev[0]
    layout = [
        (i.bInterfaceNumber, i.bInterfaceClass, [e.bEndpointAddress for e in i])
        for i in cfg
    ]
    assert [(0, 0x02, [0x82]), (1, 0x0A, [EP_IN, EP_OUT])] == layout
    data_eps = [(e.bmAttributes, e.wMaxPacketSize) for e in cfg[(1, 0)]]
    assert [(2, 64), (2, 64)] == data_eps
    raw = usb.control.get_descriptor(dev, 255, usb.util.DESC_TYPE_CONFIG, 0)
    assert cfg.wTotalLength == len(raw)


def test_pyusb_claim_needs_cdc_acm_detached(bus: SimulatedBus) -> None:
    """
    cdc_acm holds both interfaces until detached (EBUSY before); every
    detach is recorded.
    """
    dev = find(bus)[0]
    assert [True, True] == [dev.is_kernel_driver_active(i) for i in (0, 1)]
    with pytest.raises(usb.core.USBError) as busy:
        usb.util.claim_interface(dev, 1)
    assert errno.EBUSY == busy.value.errno
    open_data(dev)
    assert [(dev.serial_number, 0), (dev.serial_number, 1)] == bus.detached
    assert [False, False] == [dev.is_kernel_driver_active(i) for i in (0, 1)]


def test_pyusb_reset_returns_serial_frame_and_reads_time_out(
    bus: SimulatedBus,
) -> None:
    """
    Writing ^C to 0x03 makes the key answer S! on 0x81; a read with nothing
    to deliver raises USBTimeoutError (ETIMEDOUT), and a buffer that cannot
    hold a whole packet overflows.
    """
    dev = find(bus)[0]
    open_data(dev)
    assert 1 == dev.write(EP_OUT, b"\x03")
    packet = parse_packet(bytes(dev.read(EP_IN, 64, timeout=1000)))
    assert (FrameType.SERIAL, bus.keys[dev.serial_number].serial) == (
        packet.type,
        packet.data,
    )
    with pytest.raises(usb.core.USBTimeoutError) as timeout:
        dev.read(EP_IN, 64, timeout=10)
    assert (errno.ETIMEDOUT, -7) == (
        timeout.value.errno,
        timeout.value.backend_error_code,
    )
    dev.write(EP_OUT, b"\x03")
    buffer = array.array("B", bytes(10))
    with pytest.raises(usb.core.USBError) as overflow:
        dev.read(EP_IN, buffer, timeout=1000)
    assert errno.EOVERFLOW == overflow.value.errno


def test_pyusb_unplug_and_replug(bus: SimulatedBus) -> None:
    """
    An unplugged key leaves enumeration and its handle fails with ENODEV;
    after a replug it is back with a new address and cdc_acm bound again,
    while the old handle stays dead.
    """
    dev = find(bus)[0]
    serial = dev.serial_number
    open_data(dev)
    bus.unplug(serial)
    assert serial not in {d.serial_number for d in find(bus)}
    with pytest.raises(usb.core.USBError) as gone:
        dev.read(EP_IN, 64, 100)
    assert (errno.ENODEV, -4) == (gone.value.errno, gone.value.backend_error_code)
    with pytest.raises(usb.core.USBError) as gone:
        dev.write(EP_OUT, b"R")
    assert errno.ENODEV == gone.value.errno
    bus.replug(serial)
    (again,) = [d for d in find(bus) if d.serial_number == serial]
    assert again.address != dev.address
    assert again.is_kernel_driver_active(1)
    with pytest.raises(usb.core.USBError) as stale:
        dev.read(EP_IN, 64, 100)
    assert errno.ENODEV == stale.value.errno
    open_data(again)
    packet = parse_packet(bytes(again.read(EP_IN, 64, timeout=1000)))
    assert FrameType.SERIAL == packet.type  # the power-on announcement
