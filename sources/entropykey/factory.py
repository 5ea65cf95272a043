"""
Turn ``kind = "entropykey"`` config entries into driver objects.

One entry names one key, or with ``serial = "*"`` every key the keyring knows
that is on the bus (or, simulated, every key in the keyring). Simulated keys are
kept in a `SimulatedFleet` owned by the broker, so they outlive driver restarts
and can be unplugged and replugged by an operator trying failover.

A ``serial = "*"`` entry with no key present at start gets a stand-in source
(`sources.entropykey.waiting.AwaitedKey`) that says why and takes the first key
the rescan finds.
"""

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from broker.errors import SourceError

from .config import ANY_SERIAL, EntropyKeySourceConfig
from .driver import NOMINAL_RATE, EntropyKeySource
from .encoding import serial_from_text, serial_to_text
from .keyring import KeyringError, load_keyring
from .transport import (
    KeyTransport,
    SimulatedTransport,
    TtyTransport,
    UnixTransport,
    UsbTransport,
    find_usb_keys,
    usb_serial,
)
from .waiting import WAITING, AwaitedKey
from .wire import FailureMode

if TYPE_CHECKING:
    # Only the simulated transport needs the simulator; real keys never load it.
    from .sim.key import SimulatedKey

log = structlog.get_logger("ebroker.entropykey")


class SimulatedFleet:
    """
    The simulated keys of one broker, by serial.
    """

    def __init__(self) -> None:
        self.keys: dict[str, SimulatedKey] = {}

    def get(self, serial: str, long_term_key: bytes, rate: float) -> "SimulatedKey":
        """
        The key with ``serial``, made with ``long_term_key`` and ``rate`` the
        first time it is asked for.
        """
        from .sim.key import SimulatedKey

        key = self.keys.get(serial)
        if key is None:
            key = SimulatedKey(serial_from_text(serial), long_term_key, rate=rate)
            self.keys[serial] = key
        return key

    def control(self, serial: str, action: str) -> str:
        """
        Do to a simulated key what can happen to a real one.

        Args:
            serial: the key's 16-character serial.
            action: ``unplug``, ``replug``, ``fail`` (a latched generator
                failure) or ``heal`` (no faults, power-cycled).

        Returns:
            The action taken.

        Raises:
            KeyError: no simulated key has that serial.
            ValueError: unknown action.
        """
        key = self.keys[serial]
        if action == "unplug":
            key.unplug()
        elif action == "replug":
            key.replug()
        elif action == "fail":
            key.fail(FailureMode.RAW_XOR_BAD)
        elif action == "heal":
            key.heal()
        else:
            raise ValueError(f"unknown action {action!r} (unplug, replug, fail, heal)")
        log.warning("simulated_key_control", serial=serial, action=action)
        return action


class FleetTransport:
    """
    A simulated key's transport that takes its key from the fleet when it is
    first opened, not when the broker is built.

    The key's long-term key comes from the keyring, so a keyring that is
    missing, malformed or too widely readable makes this one source fail with
    the reason (and be retried) instead of stopping the whole broker at start.
    """

    def __init__(
        self, config: EntropyKeySourceConfig, serial: str, fleet: SimulatedFleet
    ) -> None:
        self.serial = serial
        self.description = f"simulated {serial}"
        self._config = config
        self._fleet = fleet
        self._inner: SimulatedTransport | None = None

    async def open(self) -> None:
        if self._inner is None:
            try:
                keyring = await asyncio.to_thread(load_keyring, self._config.keyring)
            except (KeyringError, OSError) as exc:
                raise SourceError(f"keyring: {exc}") from exc
            long_term_key = keyring.get(serial_from_text(self.serial))
            if long_term_key is None:
                raise SourceError(
                    f"keyring {self._config.keyring} has no key for {self.serial}"
                )
            key = self._fleet.get(
                self.serial, long_term_key, float(self._config.simulated_rate)
            )
            self._inner = SimulatedTransport(self.serial, key)
        await self._inner.open()

    def _transport(self) -> SimulatedTransport:
        if self._inner is None:
            raise SourceError(f"simulated key {self.serial} is not open")
        return self._inner

    async def read(self) -> bytes:
        return await self._transport().read()

    async def write(self, data: bytes) -> None:
        await self._transport().write(data)

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def source_name(config: EntropyKeySourceConfig, serial: str) -> str:
    """
    The name of one key's source: the entry's name, suffixed with the serial when
    the entry stands for every key.
    """
    if config.serial != ANY_SERIAL:
        return config.name
    # '/' and '+' are legal in serials but awkward in names and metric labels.
    return f"{config.name}-{serial.replace('/', '_').replace('+', '-')}"


def _transport(
    config: EntropyKeySourceConfig,
    serial: str,
    *,
    usb_backend: Any,
    fleet: SimulatedFleet,
) -> KeyTransport:
    if config.transport == "usb":
        return UsbTransport(serial, backend=usb_backend)
    if config.transport == "simulated":
        return FleetTransport(config, serial, fleet)
    if config.path is None:  # validated at load; kept for the type checker
        raise SourceError(f"transport {config.transport} needs a path")
    if config.transport == "tty":
        return TtyTransport(config.path)
    return UnixTransport(config.path)


def _nominal_rate(config: EntropyKeySourceConfig) -> float:
    if config.transport == "simulated":
        return float(config.simulated_rate)
    return NOMINAL_RATE


def _make(
    config: EntropyKeySourceConfig,
    serial: str,
    *,
    usb_backend: Any,
    fleet: SimulatedFleet,
) -> EntropyKeySource:
    nominal = _nominal_rate(config)
    return EntropyKeySource(
        name=source_name(config, serial),
        serial=serial,
        keyring=config.keyring,
        transport=_transport(config, serial, usb_backend=usb_backend, fleet=fleet),
        priority=config.priority,
        credit=config.credit,
        response_timeout=config.response_timeout,
        nominal_rate=nominal,
    )


def provision_simulated(config: EntropyKeySourceConfig) -> bool:
    """
    Give a simulated key a long-term key when the keyring has none for it, so a
    demo config works out of the box. Real keys are never provisioned: their
    long-term key must come from `ebroker rekey` and the master key.

    Returns:
        True when a key was added (the keyring is created with mode 0600).

    Raises:
        KeyringError: the existing keyring is malformed or too widely readable.
    """
    if config.transport != "simulated" or config.serial == ANY_SERIAL:
        return False
    from .rekey import store_long_term_key

    serial = serial_from_text(config.serial)
    if config.keyring.exists() and serial in load_keyring(config.keyring):
        return False
    config.keyring.parent.mkdir(parents=True, exist_ok=True)
    store_long_term_key(config.keyring, serial, os.urandom(32))
    return True


def _read_keyring(path: Path) -> dict[bytes, bytes]:
    try:
        return load_keyring(path)
    except (KeyringError, OSError):
        # The driver reports keyring problems with their reason when it opens.
        return {}


def _present_serials(config: EntropyKeySourceConfig, usb_backend: Any) -> list[str]:
    keyring = _read_keyring(config.keyring)
    known = {serial_to_text(serial) for serial in keyring}
    if config.transport == "simulated":
        return sorted(known)
    present = []
    for device in find_usb_keys(usb_backend):
        serial = usb_serial(device)
        if serial is not None and serial in known:
            present.append(serial)
    return sorted(present)


def build_sources(
    config: EntropyKeySourceConfig,
    *,
    usb_backend: Any = None,
    fleet: SimulatedFleet,
    exclude: Iterable[str] = (),
) -> list[EntropyKeySource]:
    """
    Drivers for one config entry (for ``serial = "*"``: the keys present now,
    minus ``exclude``).
    """
    try:
        if provision_simulated(config):
            log.warning(
                "simulated_key_provisioned",
                serial=config.serial,
                keyring=str(config.keyring),
            )
    except (KeyringError, OSError) as exc:
        log.error("simulated_key_not_provisioned", serial=config.serial, error=str(exc))
    if config.serial != ANY_SERIAL:
        return [_make(config, config.serial, usb_backend=usb_backend, fleet=fleet)]
    skip = set(exclude)
    try:
        serials = _present_serials(config, usb_backend)
    except SourceError:
        serials = []
    return [
        _make(config, serial, usb_backend=usb_backend, fleet=fleet)
        for serial in serials
        if serial not in skip
    ]


class ClaimedSerials(set[str]):
    """
    The serials of one ``serial = "*"`` entry that have a driver, and the
    stand-in waiting for the entry's first key, if it has none yet.
    """

    def __init__(self, serials: Iterable[str] = (), stand_in: AwaitedKey | None = None):
        super().__init__(serials)
        self.stand_in = stand_in


def waiting_reason(config: EntropyKeySourceConfig) -> str:
    """
    Why a ``serial = "*"`` entry has no key to drive, for status, health and
    the log.
    """
    try:
        keyring = load_keyring(config.keyring)
    except (KeyringError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return f"{WAITING} (keyring {config.keyring}: {detail})"
    if not keyring:
        return f"{WAITING} (keyring {config.keyring} lists no keys)"
    if config.transport == "usb":
        return f"{WAITING} (none that keyring {config.keyring} knows is on the bus)"
    return WAITING


def stand_in(config: EntropyKeySourceConfig) -> AwaitedKey:
    """
    The source a ``serial = "*"`` entry has while none of its keys is present.
    """
    reason = waiting_reason(config)
    log.warning(
        "entropy_key_missing",
        source=config.name,
        reason=reason,
        hint="plug in a key the keyring knows; it is picked up within "
        f"{config.rescan_interval:g} s",
    )
    return AwaitedKey(config, reason=reason, nominal_rate=_nominal_rate(config))


async def watch_for_keys(
    config: EntropyKeySourceConfig,
    *,
    usb_backend: Any,
    fleet: SimulatedFleet,
    known: set[str],
    add: Any,
) -> None:
    """
    For ``serial = "*"``: every ``rescan_interval`` seconds, add a driver for each
    newly plugged key the keyring knows. A key that comes back after an unplug
    is already known: its own driver reconnects it. When ``known`` is a
    `ClaimedSerials` whose stand-in still waits, the first new key goes to the
    stand-in instead of getting a source of its own.
    """
    while True:
        await asyncio.sleep(config.rescan_interval)
        sources = await asyncio.to_thread(
            build_sources, config, usb_backend=usb_backend, fleet=fleet, exclude=known
        )
        waiting = known.stand_in if isinstance(known, ClaimedSerials) else None
        for source in sources:
            known.add(source.serial)
            if waiting is not None and waiting.waiting:
                log.info(
                    "entropy_key_arrived", source=waiting.name, serial=source.serial
                )
                waiting.adopt(source)
            else:
                add(source)
