"""
Simtec Entropy Key (UDEKEY01): the pure, I/O-free core of the driver.

Written from the Entropy Key's published protocol ("the spec"; section numbers
below are its sections): a host talks to the key over a CDC serial stream; the
key sends fixed 64-byte frames, each MAC'd with Skein-256 under the current
session key (a zero key until the host negotiates one from the key's long-term
key); the host sends short commands (a reset byte, session keying, long-term
re-keying). Nothing here opens files (except `keyring.load_keyring`), sockets
or reads a clock.

Modules and what a driver or simulator needs from them:

``session``
    `Session(keyring, *, expected_serial=None, random_bytes=os.urandom,
    response_timeout=5.0, stall_after=3, max_mac_failures=50)`: the host state
    machine (spec section 9). Call ``start(now)``, then feed device bytes with
    ``receive_data(data, now)`` (``b""`` = end of stream), write
    ``data_to_send()`` to the key, drain ``events()`` / ``next_event()``
    (returns `NEED_DATA` when empty), and call ``handle_timer(now)`` at
    ``get_timer()``. Events: `EntropyBlock` (``data``, ``sequence``,
    ``creditable``), `StatusReport` (``info``), `SerialNumber`,
    `StateChanged` (``old``/``new`` `Status`), `Anomaly` (``kind``, ``detail``).
    ``status`` is a `Status` with ``health`` (`Health`: starting, healthy,
    quarantined, stalled, failed, stopped: the broker's source states),
    ``reason`` and ``creditable``. Also ``state``, ``serial``,
    ``failure_mode``, ``counters``, ``close(reason)``.

``sim.model``
    `DeviceModel(serial, long_term_key, *, master_key=None, random_bytes,
    now=0.0, block_interval=0.75, info_interval=10.0)`: the key itself.
    ``receive_data(host_bytes)``, ``advance(now)``, ``produce_entropy_frames(n)``,
    ``data_to_send()``, ``power_cycle(now)``, ``fail_generator(mode)``; fault
    attributes ``plaintext_fault`` (`PlaintextFault`), ``corrupt_macs``,
    ``garbage``, ``mute``.

``keyring``
    `parse_keyring(text)`, `format_keyring(keys)`, `load_keyring(path)`,
    `check_keyring_permissions(path)` (raises `KeyringPermissionError`, a
    `ValueError`), `parse_master_key(text)`.

``wire``
    `FrameSynchroniser`, `parse_packet`, `verify_mac`, `parse_info` (`Info`,
    `FipsCounters`, `GeneratorStats`, `FailureMode`), frame builders and the
    host command encoders (`RESET`, `encode_session_rekey`, `encode_lt_mac`,
    `encode_lt_rekey`).

``skein``
    Skein-256 with the 2008 constants, the key's prepared states, and the
    derivations of spec section 8 (`SessionCrypto`, `derive_session_key`,
    `derive_long_term_key`, `lt_nonce_mac`).

``encoding``
    PEM64 (`pem_encode`, `pem_decode`), serial numbers (`serial_to_text`,
    `serial_from_text`), 12-bit sub-codes, CRC-8.
"""

from .events import (
    NEED_DATA,
    Anomaly,
    EntropyBlock,
    Event,
    Health,
    SerialNumber,
    SessionState,
    StateChanged,
    Status,
    StatusReport,
)
from .keyring import (
    KeyringError,
    KeyringPermissionError,
    check_keyring_permissions,
    format_keyring,
    load_keyring,
    parse_keyring,
    parse_master_key,
)
from .session import Session
from .sim.model import DeviceModel, PlaintextFault
from .wire import FailureMode, Info

__all__ = [
    "NEED_DATA",
    "Anomaly",
    "DeviceModel",
    "EntropyBlock",
    "Event",
    "FailureMode",
    "Health",
    "Info",
    "KeyringError",
    "KeyringPermissionError",
    "PlaintextFault",
    "SerialNumber",
    "Session",
    "SessionState",
    "StateChanged",
    "Status",
    "StatusReport",
    "check_keyring_permissions",
    "format_keyring",
    "load_keyring",
    "parse_keyring",
    "parse_master_key",
]
