"""
A pyusb backend that presents `SimulatedKey` objects as Entropy Keys on a USB bus.

Pass a `SimulatedBus` wherever pyusb takes a backend::

    usb.core.find(backend=bus, idVendor=0x20DF, idProduct=0x0001, find_all=True)

Each plugged key shows the real identity (spec 2.1): CDC device, interface 0 =
communication (interrupt IN 0x82), interface 1 = data (bulk IN 0x81, bulk OUT
0x03), string descriptors with the PEM serial. Errors are what pyusb's libusb1
backend raises for the same libusb return codes on Linux:

* gone device (unplugged, or replugged since the handle was opened):
  ``USBError(errno=ENODEV, backend_error_code=-4)``;
* read timeout: ``USBTimeoutError(errno=ETIMEDOUT, backend_error_code=-7)``;
* claiming an interface cdc_acm still holds, or another handle has:
  ``EBUSY`` (-6); detaching an absent driver or releasing an unclaimed
  interface: ``ENOENT`` (-5, LIBUSB_ERROR_NOT_FOUND);
* bulk transfer on a wrong endpoint or an unclaimed interface: ``EIO`` (-1,
  what libusb reports for a failed usbfs submit);
* a read buffer that is not a whole number of 64-byte packets and cannot hold
  what the key has queued: ``EOVERFLOW`` (-8);
* unsupported control request: ``EPIPE`` (-9, a stall).

Kernel-driver state is per plug-in: cdc_acm is bound to both interfaces again
after every replug. Every detach is recorded in `SimulatedBus.detached`.
"""

import array
import errno
import math
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

import usb.backend
import usb.core

from .key import SimulatedKey, SimulatedUnplugged

VENDOR_ID: Final = 0x20DF
PRODUCT_ID: Final = 0x0001
EP_NOTIFY: Final = 0x82
EP_IN: Final = 0x81
EP_OUT: Final = 0x03
PACKET_SIZE: Final = 64
MANUFACTURER: Final = "Simtec Electronics"
PRODUCT: Final = "Entropy Key"
LANGID_EN_US: Final = 0x0409
SPEED_FULL: Final = 2  # LIBUSB_SPEED_FULL

_IO, _NOT_FOUND, _BUSY, _TIMEOUT, _OVERFLOW, _PIPE, _NO_DEVICE = (
    -1, -5, -6, -7, -8, -9, -4,
)  # fmt: skip
_ERRORS: Final = {
    _IO: ("Input/output error", errno.EIO),
    _NOT_FOUND: ("Entity not found", errno.ENOENT),
    _BUSY: ("Resource busy", errno.EBUSY),
    _TIMEOUT: ("Operation timed out", errno.ETIMEDOUT),
    _OVERFLOW: ("Overflow", errno.EOVERFLOW),
    _PIPE: ("Pipe error", errno.EPIPE),
    _NO_DEVICE: ("No such device (it may have been disconnected)", errno.ENODEV),
}

# CDC ACM functional descriptors of interface 0: header (CDC 1.10), call
# management, ACM capabilities, union (master 0, slave 1).
_CDC_FUNCTIONAL: Final = bytes.fromhex("0524001001 0524010001 04240202 0524060001")


def _error(code: int) -> usb.core.USBError:
    text, number = _ERRORS[code]
    if code == _TIMEOUT:
        return usb.core.USBTimeoutError(text, code, number)
    return usb.core.USBError(text, code, number)


@dataclass(frozen=True, slots=True)
class DeviceDescriptor:
    """
    The standard device descriptor plus the location fields pyusb reads.
    """

    bus: int
    address: int
    port_number: int
    port_numbers: tuple[int, ...]
    speed: int = SPEED_FULL
    bLength: int = 18
    bDescriptorType: int = 1
    bcdUSB: int = 0x0200
    bDeviceClass: int = 0x02
    bDeviceSubClass: int = 0
    bDeviceProtocol: int = 0
    bMaxPacketSize0: int = 8
    idVendor: int = VENDOR_ID
    idProduct: int = PRODUCT_ID
    bcdDevice: int = 0x0200
    iManufacturer: int = 1
    iProduct: int = 2
    iSerialNumber: int = 3
    bNumConfigurations: int = 1

    def pack(self) -> bytes:
        """
        The 18 bytes a GET_DESCRIPTOR(DEVICE) returns.
        """
        return struct.pack(
            "<BBHBBBBHHHBBBB",
            self.bLength, self.bDescriptorType, self.bcdUSB, self.bDeviceClass,
            self.bDeviceSubClass, self.bDeviceProtocol, self.bMaxPacketSize0,
            self.idVendor, self.idProduct, self.bcdDevice, self.iManufacturer,
            self.iProduct, self.iSerialNumber, self.bNumConfigurations,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class EndpointDescriptor:
    """
    A standard endpoint descriptor.
    """

    bEndpointAddress: int
    bmAttributes: int
    wMaxPacketSize: int
    bInterval: int
    bLength: int = 7
    bDescriptorType: int = 5
    bRefresh: int = 0
    bSynchAddress: int = 0
    extra_descriptors: tuple[int, ...] = ()

    def pack(self) -> bytes:
        """
        The descriptor's bytes inside a configuration descriptor.
        """
        return struct.pack(
            "<BBBBHB", self.bLength, self.bDescriptorType, self.bEndpointAddress,
            self.bmAttributes, self.wMaxPacketSize, self.bInterval,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class InterfaceDescriptor:
    """
    A standard interface descriptor with its endpoints (alternate setting 0).
    """

    bInterfaceNumber: int
    bInterfaceClass: int
    bInterfaceSubClass: int
    bInterfaceProtocol: int
    endpoints: tuple[EndpointDescriptor, ...]
    extra_descriptors: tuple[int, ...] = ()
    bLength: int = 9
    bDescriptorType: int = 4
    bAlternateSetting: int = 0
    iInterface: int = 0

    @property
    def bNumEndpoints(self) -> int:
        """
        How many endpoints follow.
        """
        return len(self.endpoints)

    def pack(self) -> bytes:
        """
        The interface descriptor, its class-specific extras and its endpoints.
        """
        head = struct.pack(
            "<BBBBBBBBB", self.bLength, self.bDescriptorType, self.bInterfaceNumber,
            self.bAlternateSetting, self.bNumEndpoints, self.bInterfaceClass,
            self.bInterfaceSubClass, self.bInterfaceProtocol, self.iInterface,
        )  # fmt: skip
        return b"".join(
            (head, bytes(self.extra_descriptors), *(e.pack() for e in self.endpoints))
        )


INTERFACES: Final = (
    InterfaceDescriptor(
        0, 0x02, 0x02, 0x01,  # CDC communication, ACM, AT commands
        (EndpointDescriptor(EP_NOTIFY, 0x03, 16, 255),),
        tuple(_CDC_FUNCTIONAL),
    ),
    InterfaceDescriptor(
        1, 0x0A, 0x00, 0x00,  # CDC data
        (
            EndpointDescriptor(EP_IN, 0x02, PACKET_SIZE, 0),
            EndpointDescriptor(EP_OUT, 0x02, PACKET_SIZE, 0),
        ),
    ),
)  # fmt: skip
_BODY: Final = b"".join(i.pack() for i in INTERFACES)


@dataclass(frozen=True, slots=True)
class ConfigurationDescriptor:
    """
    The key's single configuration: bus powered, 76 mA.
    """

    bLength: int = 9
    bDescriptorType: int = 2
    wTotalLength: int = 9 + len(_BODY)
    bNumInterfaces: int = len(INTERFACES)
    bConfigurationValue: int = 1
    iConfiguration: int = 0
    bmAttributes: int = 0x80
    bMaxPower: int = 38
    extra_descriptors: tuple[int, ...] = ()

    def pack(self) -> bytes:
        """
        The whole configuration as GET_DESCRIPTOR(CONFIGURATION) returns it.
        """
        head = struct.pack(
            "<BBHBBBBB", self.bLength, self.bDescriptorType, self.wTotalLength,
            self.bNumInterfaces, self.bConfigurationValue, self.iConfiguration,
            self.bmAttributes, self.bMaxPower,
        )  # fmt: skip
        return head + _BODY


CONFIGURATION: Final = ConfigurationDescriptor()


@dataclass(eq=False)
class SimulatedDevice:
    """
    One plug-in of a key: what pyusb's backend calls the device identification.
    """

    key: SimulatedKey
    generation: int
    descriptor: DeviceDescriptor
    kernel_driver: set[int] = field(default_factory=lambda: {0, 1})
    claimed_by: dict[int, "DeviceHandle"] = field(default_factory=dict)
    configuration: int = 1


@dataclass(eq=False)
class DeviceHandle:
    """
    An open device, as returned by `SimulatedBus.open_device`.
    """

    device: SimulatedDevice
    open: bool = True


class SimulatedBus(usb.backend.IBackend):  # type: ignore[misc]  # pyusb is untyped
    """
    A pyusb backend whose devices are simulated Entropy Keys.

    Args:
        keys: keys plugged in from the start.
        bus_number: the bus number every key reports.
    """

    def __init__(
        self, keys: Iterable[SimulatedKey] = (), *, bus_number: int = 1
    ) -> None:
        self.bus_number = bus_number
        self.detached: list[tuple[str, int]] = []
        """(serial, interface) for every kernel-driver detach, in order."""
        self._lock = threading.Lock()
        self._keys: dict[str, SimulatedKey] = {}
        self._ports: dict[str, int] = {}
        self._devices: dict[str, SimulatedDevice] = {}
        # Address 1 is the root hub; every plug-in takes a new address, as on
        # real hardware.
        self._next_address = 2
        for key in keys:
            self.plug(key)

    # -- the bus ------------------------------------------------------------

    @property
    def keys(self) -> Mapping[str, SimulatedKey]:
        """
        Every key ever plugged into this bus, by PEM serial (plugged in or not).
        """
        with self._lock:
            return MappingProxyType(dict(self._keys))

    def plug(self, key: SimulatedKey) -> None:
        """
        Plug ``key`` into the next free port (powering it up if it was unplugged).
        """
        with self._lock:
            self._keys[key.serial_text] = key
            self._ports.setdefault(key.serial_text, len(self._ports) + 1)
        if not key.plugged:
            key.replug()

    def unplug(self, serial_text: str) -> None:
        """
        Pull a key out: it leaves enumeration and open handles fail with ENODEV.
        """
        self._key(serial_text).unplug()

    def replug(self, serial_text: str) -> None:
        """
        Plug a key back in (power cycle); old handles stay dead.
        """
        self._key(serial_text).replug()

    def _key(self, serial_text: str) -> SimulatedKey:
        with self._lock:
            return self._keys[serial_text]

    def _device(self, key: SimulatedKey) -> SimulatedDevice | None:
        # Called with the lock held: one record per plug-in of the key.
        if not key.plugged:
            return None
        generation = key.generation
        device = self._devices.get(key.serial_text)
        if device is None or device.generation != generation:
            port = self._ports[key.serial_text]
            descriptor = DeviceDescriptor(
                self.bus_number, self._next_address, port, (port,)
            )
            self._next_address = 2 + (self._next_address - 1) % 126
            device = SimulatedDevice(key, generation, descriptor)
            self._devices[key.serial_text] = device
        return device

    # -- enumeration and descriptors ----------------------------------------

    def enumerate_devices(self) -> Iterator[SimulatedDevice]:
        with self._lock:
            devices = [self._device(k) for k in self._keys.values()]
        return iter([d for d in devices if d is not None])

    def get_parent(self, dev: SimulatedDevice) -> None:
        # The root hub is not simulated.
        return None

    def get_device_descriptor(self, dev: SimulatedDevice) -> DeviceDescriptor:
        return dev.descriptor

    def get_configuration_descriptor(
        self, dev: SimulatedDevice, config: int
    ) -> ConfigurationDescriptor:
        if config != 0:
            raise _error(_NOT_FOUND)
        return CONFIGURATION

    def get_interface_descriptor(
        self, dev: SimulatedDevice, intf: int, alt: int, config: int
    ) -> InterfaceDescriptor:
        self.get_configuration_descriptor(dev, config)
        if intf >= len(INTERFACES):
            raise IndexError(f"Invalid interface index {intf}")
        if alt != 0:
            raise IndexError(f"Invalid alternate setting index {alt}")
        return INTERFACES[intf]

    def get_endpoint_descriptor(
        self, dev: SimulatedDevice, ep: int, intf: int, alt: int, config: int
    ) -> EndpointDescriptor:
        endpoints = self.get_interface_descriptor(dev, intf, alt, config).endpoints
        if ep >= len(endpoints):
            raise IndexError(f"Invalid endpoint index {ep}")
        return endpoints[ep]

    # -- handles, configuration, interfaces ---------------------------------

    def open_device(self, dev: SimulatedDevice) -> DeviceHandle:
        self._present(dev)
        return DeviceHandle(dev)

    def close_device(self, dev_handle: DeviceHandle) -> None:
        with self._lock:
            dev_handle.open = False
            claimed = dev_handle.device.claimed_by
            for intf in [i for i, h in claimed.items() if h is dev_handle]:
                del claimed[intf]

    def set_configuration(self, dev_handle: DeviceHandle, config_value: int) -> None:
        device = self._live(dev_handle)
        if config_value not in (0, CONFIGURATION.bConfigurationValue):
            raise _error(_NOT_FOUND)
        with self._lock:
            # usbfs refuses while any driver, this handle included, has an
            # interface.
            if device.kernel_driver or device.claimed_by:
                raise _error(_BUSY)
            device.configuration = config_value

    def get_configuration(self, dev_handle: DeviceHandle) -> int:
        return self._live(dev_handle).configuration

    def set_interface_altsetting(
        self, dev_handle: DeviceHandle, intf: int, altsetting: int
    ) -> None:
        self._live(dev_handle)
        if intf >= len(INTERFACES) or altsetting != 0:
            raise _error(_NOT_FOUND)

    def claim_interface(self, dev_handle: DeviceHandle, intf: int) -> None:
        device = self._live(dev_handle)
        if intf >= len(INTERFACES) or device.configuration == 0:
            raise _error(_NOT_FOUND)
        with self._lock:
            owner = device.claimed_by.get(intf, dev_handle)
            if intf in device.kernel_driver or owner is not dev_handle:
                raise _error(_BUSY)
            device.claimed_by[intf] = dev_handle

    def release_interface(self, dev_handle: DeviceHandle, intf: int) -> None:
        device = self._live(dev_handle)
        with self._lock:
            if device.claimed_by.get(intf) is not dev_handle:
                raise _error(_NOT_FOUND)
            del device.claimed_by[intf]

    def is_kernel_driver_active(self, dev_handle: DeviceHandle, intf: int) -> bool:
        device = self._live(dev_handle)
        with self._lock:
            return intf in device.kernel_driver

    def detach_kernel_driver(self, dev_handle: DeviceHandle, intf: int) -> None:
        device = self._live(dev_handle)
        with self._lock:
            if intf not in device.kernel_driver:
                raise _error(_NOT_FOUND)
            device.kernel_driver.discard(intf)
            self.detached.append((device.key.serial_text, intf))

    def attach_kernel_driver(self, dev_handle: DeviceHandle, intf: int) -> None:
        device = self._live(dev_handle)
        with self._lock:
            if intf >= len(INTERFACES):
                raise _error(_NOT_FOUND)
            if intf in device.kernel_driver or intf in device.claimed_by:
                raise _error(_BUSY)
            device.kernel_driver.add(intf)

    # -- transfers ----------------------------------------------------------

    def bulk_write(
        self,
        dev_handle: DeviceHandle,
        ep: int,
        intf: int,
        data: "array.array[int]",
        timeout: int,
    ) -> int:
        device = self._claimed(dev_handle, ep, intf, EP_OUT)
        try:
            return device.key.write(data.tobytes())
        except SimulatedUnplugged:
            raise _error(_NO_DEVICE) from None

    def bulk_read(
        self,
        dev_handle: DeviceHandle,
        ep: int,
        intf: int,
        buff: "array.array[int]",
        timeout: int,
    ) -> int:
        device = self._claimed(dev_handle, ep, intf, EP_IN)
        size = len(buff) * buff.itemsize
        # libusb: a timeout of 0 means wait for ever.
        wait = timeout / 1000 if timeout > 0 else math.inf
        try:
            # The host takes whole 64-byte packets from the key; one that does
            # not fit the buffer is lost and the transfer overflows.
            data = device.key.read(-(-size // PACKET_SIZE) * PACKET_SIZE, wait)
        except SimulatedUnplugged:
            raise _error(_NO_DEVICE) from None
        if len(data) > size:
            raise _error(_OVERFLOW)
        if not data:
            raise _error(_TIMEOUT)
        buff[: len(data)] = array.array("B", data)
        return len(data)

    def intr_read(
        self,
        dev_handle: DeviceHandle,
        ep: int,
        intf: int,
        buff: "array.array[int]",
        timeout: int,
    ) -> int:
        device = self._claimed(dev_handle, ep, intf, EP_NOTIFY)
        # The key never sends a CDC notification: wait for the timeout or a
        # disconnect.
        if device.key.wait_unplugged(timeout / 1000 if timeout > 0 else math.inf):
            raise _error(_NO_DEVICE)
        raise _error(_TIMEOUT)

    def ctrl_transfer(
        self,
        dev_handle: DeviceHandle,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: "array.array[int]",
        timeout: int,
    ) -> int:
        device = self._live(dev_handle)
        if (bmRequestType, bRequest) == (0x80, 0x06):  # GET_DESCRIPTOR
            reply = self._descriptor(device, wValue >> 8, wValue & 0xFF)
            count = min(len(reply), len(data) * data.itemsize)
            data[:count] = array.array("B", reply[:count])
            return count
        if (bmRequestType, bRequest) == (0x80, 0x08):  # GET_CONFIGURATION
            data[:1] = array.array("B", [device.configuration])
            return 1
        if bmRequestType == 0x21 and bRequest in (0x20, 0x22):
            # CDC SET_LINE_CODING / SET_CONTROL_LINE_STATE: accepted, no effect
            # (the key ignores line settings, spec 2.2).
            return len(data) * data.itemsize
        raise _error(_PIPE)

    def clear_halt(self, dev_handle: DeviceHandle, ep: int) -> None:
        self._live(dev_handle)

    def reset_device(self, dev_handle: DeviceHandle) -> None:
        device = self._live(dev_handle)
        try:
            device.key.usb_reset()
        except SimulatedUnplugged:
            raise _error(_NO_DEVICE) from None

    # -- checks -------------------------------------------------------------

    def _present(self, device: SimulatedDevice) -> None:
        key = device.key
        # A replugged key is a new device; handles to the old one stay dead.
        if not key.plugged or key.generation != device.generation:
            raise _error(_NO_DEVICE)

    def _live(self, dev_handle: DeviceHandle) -> SimulatedDevice:
        self._present(dev_handle.device)
        if not dev_handle.open:
            raise _error(_IO)
        return dev_handle.device

    def _claimed(
        self, dev_handle: DeviceHandle, ep: int, intf: int, expected: int
    ) -> SimulatedDevice:
        device = self._live(dev_handle)
        with self._lock:
            owner = device.claimed_by.get(intf)
        wanted_intf = 0 if expected == EP_NOTIFY else 1
        if ep != expected or intf != wanted_intf or owner is not dev_handle:
            raise _error(_IO)
        return device

    def _descriptor(self, device: SimulatedDevice, kind: int, index: int) -> bytes:
        if kind == 1:
            return device.descriptor.pack()
        if kind == 2 and index == 0:
            return CONFIGURATION.pack()
        if kind == 3:
            if index == 0:
                return struct.pack("<BBH", 4, 3, LANGID_EN_US)
            strings = {1: MANUFACTURER, 2: PRODUCT, 3: device.key.serial_text}
            if index in strings:
                text = strings[index].encode("utf-16-le")
                return bytes((2 + len(text), 3)) + text
        raise _error(_PIPE)
